"""The studio's LoRA folder (``<models>/loras/``) and keeping a transformer's LoRAs in step with a request.

A request names LoRAs by their path relative to the folder, each with a weight. ``sync`` attaches what is new,
changes only the weight of what is already attached (no re-reading), and detaches what the request dropped, so
LoRAs are applied once and kept across generations.
"""
from __future__ import annotations

import os
import pathlib

from ..errors import EngineError
from ..fingerprints import fingerprint
from .attach import active_loras, attach_lora, detach_loras
from .errors import LoraError

SUFFIXES = (".safetensors",)
MAX_NAME_PART, MAX_NAME = 255, 1024      # the file-system limits (a file name, a relative path), checked up front


def check_name(name) -> str:
    """A LoRA name as a request may give it: text without null bytes or control characters, at most MAX_NAME_PART
    characters a part and MAX_NAME in all (else the operating system's own error would surface)."""
    if not isinstance(name, str):
        raise EngineError(f"A LoRA name is text (a file in the LoRA folder), got {type(name).__name__}.")
    shown = repr(name[:60]) + ("…" if len(name) > 60 else "")
    if "\x00" in name:
        raise EngineError(f"LoRA name {shown} contains a null byte; pick the LoRA from the list.")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        raise EngineError(f"LoRA name {shown} contains control characters; pick the LoRA from the list.")
    try:
        parts = [os.fsencode(part) for part in name.replace("\\", "/").split("/")]   # the limits are in bytes
    except UnicodeError:
        raise EngineError(f"LoRA name {shown} is not valid text for a file name; pick the LoRA from the list.") \
            from None
    if sum(len(p) + 1 for p in parts) - 1 > MAX_NAME or any(len(p) > MAX_NAME_PART for p in parts):
        raise EngineError(f"LoRA name {shown} is too long ({len(name)} characters; at most {MAX_NAME_PART} bytes a "
                          f"folder or file name and {MAX_NAME} in all); pick the LoRA from the list.")
    return name


def lora_dir(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / "loras"


def list_loras(models_dir) -> list[dict]:
    root = lora_dir(models_dir)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in SUFFIXES:
            out.append({"name": p.relative_to(root).as_posix(), "path": str(p),
                        "size_mb": round(p.stat().st_size / 2 ** 20, 2)})
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


def normalize(wanted) -> list[dict]:
    """``[{"name", "weight"}]`` from what a request may carry: dicts, (name, weight) pairs or bare names."""
    out, seen = [], set()
    for item in wanted or []:
        if isinstance(item, str):
            name, weight = item, 1.0
        elif isinstance(item, dict):
            name, weight = item.get("name"), item.get("weight", 1.0)
        elif isinstance(item, (list, tuple)) and item:
            name, weight = item[0], (item[1] if len(item) > 1 else 1.0)
        else:
            raise EngineError(f"Each LoRA is a file name, {{\"name\": ..., \"weight\": ...}} or [name, weight]; "
                              f"got {item!r:.60}.")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise EngineError(f"The weight of LoRA {name!r} must be a number, got {weight!r}.") from None
        name = str(name) if isinstance(name, pathlib.PurePath) else name
        if not name or name in seen:
            continue
        seen.add(check_name(name))
        out.append({"name": name, "weight": weight})
    return out


def sync(dit, models_dir, wanted, extra=()) -> list[dict]:
    """Make ``dit`` carry exactly the LoRAs in ``wanted`` (names in the LoRA folder) plus ``extra`` ([{"name",
    "weight", "path"}]: LoRAs a feature needs, such as EliGen's, from the models folder); returns what is attached,
    for the recipe."""
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
