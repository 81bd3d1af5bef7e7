"""The one writer of the random-weight demos: once, atomically, one process at a time.

A demo file or folder is built under a hidden temporary name beside its real one and renamed into place, so an
interrupted write never leaves a half model under the real name; a lock file serialises concurrent writers (two
studio processes, parallel tests); leftovers of interrupted writes are removed under the lock. Files are made
world-readable (safetensors writes 0600; models folders are normally shared).

A single-file demo carries its stamp (demo name, version, seed) in the safetensors header (``write_safetensors_once``);
a folder demo ends with a JSON completion marker (``write_json`` last, ``read_marker`` to check).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Callable, Optional


def _temporary(path: pathlib.Path) -> pathlib.Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def save_safetensors(sd: dict, path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or {"format": "pt"})


def write_json(path, obj) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_marker(path) -> dict:
    """The completion marker at ``path``; an empty dict when it is missing or unreadable (the folder is not whole)."""
    try:
        marker = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def demo_stamp(demo: str, version: int, seed: int) -> dict:
    """Header metadata of a single-file demo: which demo, which version of its writer, which seed."""
    return {"format": "pt", "flux_studio_demo": demo, "demo_version": str(version), "seed": str(int(seed))}


def has_stamp(path, stamp: dict) -> bool:
    """Whether the safetensors file at ``path`` carries every ``stamp`` entry in its header metadata (a demo file
    written for this version and seed); a missing, truncated or foreign file has none, and is written again."""
    path = pathlib.Path(path)
    if not path.is_file():
        return False
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a finished demo
        return False
    return all(meta.get(k) == v for k, v in stamp.items())


def write_file_once(path, complete: Callable[[], bool], write: Callable[[pathlib.Path], None],
                    readme: Optional[str] = None) -> pathlib.Path:
    """``write(tmp)`` writes the file's content to ``tmp``, then it becomes ``path``; nothing happens while
    ``complete()`` is true. ``readme`` is written beside it (README.md) when there is none."""
    path = pathlib.Path(path)
    if complete():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(path.parent / f".{path.name}.lock")):
        if complete():                            # another process wrote it while we waited
            return path
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = _temporary(path)
        try:
            write(tmp)
            tmp.chmod(0o644)
            if readme is not None and not (path.parent / "README.md").exists():
                (path.parent / "README.md").write_text(readme)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def write_folder_once(target, complete: Callable[[], bool], write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """``write(tmp)`` fills the empty folder ``tmp`` (its completion marker last), which then replaces ``target``
    (an older or broken folder is moved aside and removed); nothing happens while ``complete()`` is true."""
    target = pathlib.Path(target)
    if complete():
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(parent / f".{target.name}.lock")):
        if complete():
            return target
        for stale in parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = _temporary(target)
        tmp.mkdir()
        try:
            write(tmp)
            for f in tmp.rglob("*"):
                if f.is_file():
                    f.chmod(0o644)
            if target.exists() or target.is_symlink():
                trash = parent / f".{target.name}.tmp-old-{uuid.uuid4().hex[:8]}"
                target.rename(trash)
                tmp.rename(target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def write_safetensors_once(path, state_dict: Callable[[], dict], stamp: dict,
                           readme: Optional[str] = None) -> pathlib.Path:
    """Write ``state_dict()`` to ``path`` with ``stamp`` as its header metadata, unless a file with that stamp is
    already there; ``readme`` goes beside it when there is none."""
    path = pathlib.Path(path)
    return write_file_once(path, lambda: has_stamp(path, stamp),
                           lambda tmp: save_safetensors(state_dict(), tmp, metadata=stamp), readme=readme)


def write_pickle_once(path, state: Callable[[], dict], stamp: dict, readme: Optional[str] = None) -> pathlib.Path:
    """``torch.save(state())`` to ``path`` (a demo in a pickle layout: ip-adapter.bin, image_proj_model.bin), unless
    it is there with ``stamp``. A pickle has no header for the stamp, so it lies beside it in ``.<name>.stamp.json``,
    removed before and written after the file (a torn write leaves no stamp, and is written again)."""
    path = pathlib.Path(path)
    marker = path.with_name(f".{path.name}.stamp.json")

    def complete() -> bool:
        return path.is_file() and read_marker(marker) == stamp

    if not complete():
        import torch
        marker.unlink(missing_ok=True)
        write_file_once(path, complete, lambda tmp: torch.save(state(), str(tmp)), readme)
        write_json(marker, stamp)
    return path
