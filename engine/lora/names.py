"""LoRAs as a request names them: files in the LoRA folder (``<models>/loras/``), each with a weight.

Plain Python (no torch), so the web app checks its ``loras`` input with the same rules the engine applies:

```python
normalize('[{"name": "style/ink.safetensors", "weight": 0.8}]')   # JSON text, a list or one dict
# -> [{"name": "style/ink.safetensors", "weight": 0.8}]
normalize([["a.safetensors", "1.5"], "b.safetensors"])            # [name, weight] pairs, bare names (weight 1)
```
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from ..errors import EngineError

FOLDER = "loras"                         # <models>/loras/
SUFFIXES = (".safetensors",)
MAX_NAME_PART, MAX_NAME = 255, 1024      # the file-system limits (a file name, a relative path), checked up front


def lora_dir(models_dir) -> pathlib.Path:
    return pathlib.Path(models_dir) / FOLDER


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


def check_weight(value: Any, name: Any) -> float:
    """A LoRA's weight as a finite float, or an EngineError naming the LoRA."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise EngineError(f"The weight of LoRA {name!r} must be a number, got {value!r}.") from None
    if weight != weight or abs(weight) == float("inf"):
        raise EngineError(f"The weight of LoRA {name!r} must be a finite number, got {value!r}.")
    return weight


def _entry(item: Any) -> tuple[Any, Any]:
    """(name, weight) of one entry: a name, {"name" or "file", "weight"} or [name, weight]."""
    if isinstance(item, (str, pathlib.PurePath)):
        return item, 1.0
    if isinstance(item, dict):
        return item.get("name") or item.get("file"), item.get("weight", 1.0)
    if isinstance(item, (list, tuple)) and len(item) in (1, 2):
        return item[0], (item[1] if len(item) == 2 else 1.0)
    raise EngineError(f"Each LoRA is a file name, {{\"name\": ..., \"weight\": ...}} or [name, weight]; "
                      f"got {item!r:.60}.")


def _as_list(wanted: Any) -> list:
    if wanted is None:
        return []
    if isinstance(wanted, str):
        text = wanted.strip()
        if not text:
            return []
        try:
            wanted = json.loads(text)
        except json.JSONDecodeError:
            raise EngineError("loras must be JSON: a list of {\"name\": file, \"weight\": number} (or [file, weight] "
                              f"pairs), got {text[:80]!r}.") from None
    if isinstance(wanted, dict):
        return [wanted]
    if not isinstance(wanted, (list, tuple)):
        raise EngineError(f"loras must be a list of {{\"name\", \"weight\"}}, got {type(wanted).__name__}.")
    return list(wanted)


def flagged(wanted: Any, flag: str) -> list[str]:
    """The names of the entries that carry ``flag`` as true (``{"name": ..., "encode": true}``: the LoRA picker's
    per-LoRA options), in order; entries without it, and bare names, are not flagged."""
    return [str(item.get("name") or item.get("file")).strip() for item in _as_list(wanted)
            if isinstance(item, dict) and item.get(flag) is True and (item.get("name") or item.get("file"))]


def normalize(wanted: Any) -> list[dict]:
    """``[{"name", "weight"}]`` from what a request may carry (see the module's docstring); a LoRA named twice is
    kept once (the first). Bad entries, names and weights are EngineErrors saying what was expected."""
    out, seen = [], set()
    for item in _as_list(wanted):
        name, weight = _entry(item)
        name = str(name) if isinstance(name, pathlib.PurePath) else name
        if name is None or (isinstance(name, str) and not name.strip()):
            raise EngineError(f"A LoRA without a file name: {item!r:.60}.")
        name = check_name(name).strip()
        weight = check_weight(weight, name)
        if name not in seen:
            seen.add(name)
            out.append({"name": name, "weight": weight})
    return out
