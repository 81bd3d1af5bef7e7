"""A replica's images carried back to the page's studio, which saves them in its own outputs folder.

A replica runs on its machine, maybe not this one: it saves each image as any job does (with its recipe), in a
scratch folder of its own, then sends the PNG's bytes and the input copies saved beside it (``<stem>.ref0.png``
...; the recipe names them by suffix only) and removes them. This studio saves the image under the next free name of
its outputs folder (``recipes.save_image``: the same pixels and the same recipe, so History, restore and the seed
work as for a local job) and writes the copies beside it. No ray here.
"""
from __future__ import annotations

import glob
import io
import pathlib
from typing import Any, Optional

from PIL import Image

from engine import safe_files

from .. import recipes


def pack_results(results: list[dict]) -> list[dict]:
    """(On the replica.) The job's results with their files' bytes instead of their paths: {"png", "copies":
    {suffix: bytes}, and every other key of the result}; the files are removed from the replica's folder."""
    packed = []
    for result in results:
        path = pathlib.Path(result["path"])
        copies = {}
        for copy in sorted(path.parent.glob(glob.escape(path.stem) + ".*")):
            if copy != path:
                copies[copy.name[len(path.stem):]] = copy.read_bytes()
                copy.unlink()
        item = {key: value for key, value in result.items() if key != "path"}
        item.update(png=path.read_bytes(), copies=copies)
        path.unlink()
        packed.append(item)
    return packed


def save_results(packed: list[dict], outputs_dir: Any, replica: Optional[dict] = None) -> list[dict]:
    """(On the page's studio.) Each packed image saved in ``outputs_dir`` with its copies beside it; returns the
    results as a local job's ({"path", "seed", "width", "height", "recipe", "info", "notes" when any}), each with
    ``"replica"``: which replica made it ({"pid", "actor_id", "actor_name", "node"})."""
    results = []
    for item in packed:
        with Image.open(io.BytesIO(item["png"])) as image:
            image.load()
            path = recipes.save_image(image, item["recipe"], outputs_dir)
        for suffix, data in item["copies"].items():
            if _plain_suffix(suffix):          # a name beside the image, never a path elsewhere
                safe_files.write_bytes(recipes.beside(path, suffix), data)
        result = {key: value for key, value in item.items() if key not in ("png", "copies")}
        result["path"] = str(path)
        if replica is not None:
            result["replica"] = dict(replica)
        results.append(result)
    return results


def _plain_suffix(suffix: Any) -> bool:
    return isinstance(suffix, str) and suffix.startswith(".") and not any(c in suffix for c in "/\\\0") \
        and ".." not in suffix
