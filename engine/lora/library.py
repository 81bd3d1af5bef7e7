"""The studio's LoRA folder (``<models>/loras/``) and keeping a transformer's LoRAs in step with a request.

A request names LoRAs by their path relative to the folder, each with a weight. ``sync`` attaches what is new,
changes only the weight of what is already attached (no re-reading), and detaches what the request dropped, so
LoRAs are applied once and kept across generations. Each file is listed with the family it is for (FLUX.1 /
FLUX.2), and attaching one to the other family's transformer is refused naming both. How a request names them
(``normalize``, ``check_name``) is ``engine.lora.names``, which has no torch, so the web app checks its input with the
same rules.
"""
from __future__ import annotations

import pathlib

from ..errors import EngineError
from ..fingerprints import fingerprint
from .errors import LoraError
from .family import file_family
from .names import SUFFIXES, check_name, lora_dir, normalize

__all__ = ["list_loras", "resolve", "sync", "normalize", "check_name", "lora_dir"]


def list_loras(models_dir) -> list[dict]:
    """[{"name" (relative to the LoRA folder), "path", "size_mb", "family"}]: ``family`` is "FLUX.1", "FLUX.2" or None
    (fits either as far as its names and widths say; ``engine.lora.family``), read from the header only."""
    root = lora_dir(models_dir)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in SUFFIXES:
            out.append({"name": p.relative_to(root).as_posix(), "path": str(p),
                        "size_mb": round(p.stat().st_size / 2 ** 20, 2), "family": file_family(p)})
    return out


def resolve(models_dir, name: str) -> pathlib.Path:
    """The file of a LoRA named relative to the LoRA folder (never outside it)."""
    root = lora_dir(models_dir).resolve()
    path = (root / check_name(name)).resolve()
    if root != path and root not in path.parents:
        raise EngineError(f"LoRA {name!r} is outside the LoRA folder {root}.")
    if not path.is_file():
        raise EngineError(f"LoRA {name!r} was not found in {root}. Put LoRA .safetensors files in that folder.")
    return path


def sync(dit, models_dir, wanted, extra=()) -> list[dict]:
    """Make ``dit`` carry exactly the LoRAs in ``wanted`` (names in the LoRA folder) plus ``extra`` ([{"name",
    "weight", "path"}]: LoRAs a feature needs, such as EliGen's, from the models folder); returns what is attached,
    for the recipe."""
    from .attach import active_loras, attach_lora, detach_loras   # torch: here, not in the page's start-up (listing)
    wanted = normalize(wanted) + [dict(e) for e in extra]
    names = {w["name"] for w in wanted}
    stale = [a["name"] for a in active_loras(dit) if a["name"] not in names]
    if stale:
        detach_loras(dit, stale)
    for item in wanted:
        path = pathlib.Path(item["path"]) if item.get("path") else resolve(models_dir, item["name"])
        try:
            attach_lora(dit, path, weight=item["weight"], name=item["name"])
        except LoraError as exc:
            raise EngineError(str(exc)) from exc
    active = {a["name"]: a for a in active_loras(dit)}
    return [{"file": item["name"], "fingerprint": fingerprint(active[item["name"]]["path"]),
             "weight": item["weight"], "format": active[item["name"]]["format"],
             **({"feature": True} if item.get("path") else {})} for item in wanted]
