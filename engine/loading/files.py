"""Reading safetensors files, shard sets and their index, with a clear error for every way a file can be wrong.

Tensors are memory-mapped through ``safetensors.safe_open``: reading a state dict touches no tensor data, so a
24 GB file costs nothing until its tensors are used (and then page cache, not a private copy). The header is
parsed and checked here first, so that a truncated download, an HTML error page, a Git LFS pointer or a JSON file
is named as such instead of surfacing as a parser traceback.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelFileError, few

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
AGAIN = "Download it again."


def _what_is_it(head: bytes) -> str | None:
    """A guess at what a file that is not a safetensors is, from its first bytes."""
    s = head.lstrip()
    if s.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (a few bytes of text), not the weights: fetch the real file (git lfs pull or a hub download)"
    if s[:1] in (b"{", b"["):
        return "a JSON file, not a .safetensors weights file"
    if s[:9].lower().startswith((b"<!doctype", b"<html")):
        return "an HTML page (a failed or redirected download), not a .safetensors weights file"
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (.bin/.pt/.ckpt), not a .safetensors file: use the .safetensors release"
    if head.startswith(b"GGUF"):
        return "a GGUF file (quantized weights), not a .safetensors file: only a FLUX transformer loads from GGUF"
    if head[:1] == b"\x80":
        return "a Python pickle (.bin/.pt), not a .safetensors file: use the .safetensors release"
    return None


def read_header(path) -> dict:
    """The tensors of a safetensors file as {key: {"dtype", "shape", "data_offsets"}}, checked against the file size.

    Raises ModelFileError for a missing, empty, truncated, padded or non-safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist.", path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a .safetensors file.", path)
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{path} is empty (0 bytes): the download did not finish. {AGAIN}", path)
    with open(path, "rb") as f:
        head = f.read(min(size, 64))
        kind = _what_is_it(head)
        if size < 8:
            raise ModelFileError(f"{path} is {size} bytes long, too short to be a .safetensors file. {AGAIN}", path)
        (n,) = struct.unpack("<Q", head[:8])
        if kind is not None and (n > size - 8 or n > MAX_HEADER):
            raise ModelFileError(f"{path} is {kind}.", path)
        if n > size - 8 or n > MAX_HEADER or n < 2:
            raise ModelFileError(
                f"{path} is not a valid .safetensors file (its first 8 bytes give a header of {n} bytes, the file "
                f"has {size}): it is corrupt, truncated or another kind of file. {AGAIN}", path)
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(f"{path} is not a valid .safetensors file (its header is not readable: {e}). "
                             f"The file is corrupt. {AGAIN}", path) from e
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            nbytes = math.prod(shape) * ITEMSIZE[dtype]
        except Exception as e:
            raise ModelFileError(f"{path} has a malformed header entry for {key!r} ({info!r}): the file is corrupt "
                                 f"or uses an unsupported dtype. {AGAIN}", path) from e
        if b - a != nbytes or a < 0:
            raise ModelFileError(f"{path} has inconsistent offsets for {key!r}: the file is corrupt. {AGAIN}", path)
        end = max(end, b)
    data = size - 8 - n
    if data < end:
        raise ModelFileError(
            f"{path} is truncated: its header describes {end:,} bytes of tensor data but only {data:,} are "
            f"present ({size:,} bytes in all). The download did not finish. {AGAIN}", path)
    if data > end:
        raise ModelFileError(f"{path} has {data - end:,} bytes after the tensor data its header describes: the file "
                             f"is corrupt. {AGAIN}", path)
    return header


def read_index(path) -> dict[str, Path]:
    """The ``weight_map`` of a ``*.safetensors.index.json`` as {key: shard path}."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist.", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        assert isinstance(weight_map, dict) and weight_map
    except Exception as e:
        raise ModelFileError(f"{path} is not a valid *.safetensors.index.json (no weight_map): the file is corrupt. "
                             f"{AGAIN}", path) from e
    return {k: path.parent / v for k, v in weight_map.items()}


@dataclass
class FileGroup:
    """The files of one model: a single file, or the shards of one folder (with their index when present)."""

    label: str                      # how the person named it (file, folder or index), for messages
    files: list[Path]               # the .safetensors files, in order
    index: Path | None = None       # the *.index.json the shards came from
    inputs: list[str] = field(default_factory=list)  # every path given that resolved to this group

    @property
    def folder(self) -> Path:
        return self.files[0].parent

    def config(self) -> dict | None:
        """The ``config.json`` beside the files, if there is one and it parses."""
        p = self.folder / "config.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except Exception as e:
            raise ModelFileError(f"{p} (beside {self.label}) is not valid JSON: fix or delete it.", p) from e


def _pick_index(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.safetensors.index.json"))
    if len(found) <= 1:
        return found[0] if found else None
    plain = [p for p in found if p.name.count(".") == 3]  # name.safetensors.index.json, no variant like .fp16
    if len(plain) == 1:
        return plain[0]
    raise ModelFileError(f"{folder} holds several shard indexes ({few(p.name for p in found)}): pass the one to use.",
                         folder)


def _group_from_index(index: Path, label: str) -> FileGroup:
    weight_map = read_index(index)
    files = sorted(set(weight_map.values()))
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise ModelFileError(f"{label}: the shard(s) {few(p.name for p in missing)} listed in {index.name} are "
                             f"missing from {index.parent}. Download them again.", index)
    return FileGroup(label=label, files=files, index=index)


def _group_from_shard(path: Path, m: re.Match) -> FileGroup:
    index = path.parent / f"{m['stem']}.safetensors.index.json"
    if index.is_file():
        return _group_from_index(index, str(path.parent))
    n = int(m["n"])
    files = [path.parent / f"{m['stem']}-{i:05d}-of-{m['n']}.safetensors" for i in range(1, n + 1)]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise ModelFileError(f"{path} is shard {int(m['i'])} of {n}, but {few(p.name for p in missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}. "
                             f"Download the whole set (or its index) again.", path)
    return FileGroup(label=str(path.parent), files=files)


def resolve_group(item) -> FileGroup:
    """One path as given (file, shard, index json, folder) -> the group of files that make up its model."""
    path = Path(item)
    label = str(item)
    if path.is_dir():
        index = _pick_index(path)
        if index is not None:
            g = _group_from_index(index, label)
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ModelFileError(f"{path} is a folder with no .safetensors files in it.", path)
            g = FileGroup(label=label, files=files)
    elif path.name.endswith(".json"):
        if not path.exists():
            raise ModelFileError(f"{path} does not exist.", path)
        try:
            is_index = "weight_map" in json.loads(path.read_text(encoding="utf-8"))
        except Exception:
            is_index = False
        if not is_index:
            raise ModelFileError(f"{path} is a JSON file, not a .safetensors weights file (nor a "
                                 f"*.safetensors.index.json shard index).", path)
        g = _group_from_index(path, label)
    else:
        m = SHARD_RE.match(path.name)
        if m and path.is_file():
            g = _group_from_shard(path, m)
        else:
            if not path.exists():
                raise ModelFileError(f"{path} does not exist.", path)
            g = FileGroup(label=label, files=[path])
    g.inputs.append(label)
    return g


def resolve_groups(items) -> list[FileGroup]:
    """Paths as given -> one group per model; the same files named twice are one group."""
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    groups: list[FileGroup] = []
    for item in items:
        add_group(groups, resolve_group(item))
    return groups


def add_group(groups: list, g: FileGroup) -> None:
    """Add ``g`` to ``groups``, merging it into a group of the very same files; a partial overlap is an error."""
    mine = {p.resolve() for p in g.files}
    for other in groups:
        theirs = {p.resolve() for p in other.files}
        if mine == theirs:
            other.inputs.extend(g.inputs)
            return
        if mine & theirs:
            raise ModelFileError(f"{g.label} and {other.label} share the file(s) "
                                 f"{few(p.name for p in mine & theirs)}: pass each model once.", g.label)
    groups.append(g)


def _as_group(paths) -> FileGroup:
    if isinstance(paths, FileGroup):
        return paths
    if isinstance(paths, (str, os.PathLike)):
        return resolve_group(paths)
    paths = list(paths)
    if len(paths) == 1:
        return resolve_group(paths[0])
    groups = [resolve_group(p) for p in paths]
    files = []
    for g in groups:
        files += [p for p in g.files if p not in files]
    return FileGroup(label=", ".join(g.label for g in groups), files=files)


def read_headers(paths) -> tuple[FileGroup, dict[str, tuple[Path, dict]]]:
    """{key: (file, header entry)} over all files of a group; a key in two files is an error naming both."""
    group = _as_group(paths)
    where: dict[str, tuple[Path, dict]] = {}
    for p in group.files:
        for key, info in read_header(p).items():
            if key in where:
                raise ModelFileError(f"{key!r} is in both {where[key][0]} and {p}: these files are not one model "
                                     f"(pass them separately, or remove the duplicate file).", p)
            where[key] = (p, info)
    if group.index is not None:
        weight_map = read_index(group.index)
        lost = [k for k, p in weight_map.items() if k not in where or where[k][0].resolve() != p.resolve()]
        if lost:
            raise ModelFileError(f"{group.index} lists tensors its shards do not hold ({few(lost)}): the index and "
                                 f"the shards do not match. Download the set again.", group.index)
    return group, where


def read_state_dict(paths, device=None) -> dict[str, torch.Tensor]:
    """All tensors of a file, shard set, index json or folder (or a list of them, as one model).

    Tensors are memory-mapped views of the files (no data is read until used). ``device="meta"`` gives
    shape/dtype-only tensors straight from the headers.
    """
    group, where = read_headers(paths)
    if device is not None and torch.device(device).type == "meta":
        return {k: torch.empty(info["shape"], dtype=DTYPES[info["dtype"]], device="meta")
                for k, (_, info) in where.items()}
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for p in group.files:
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except ModelFileError:
            raise
        except Exception as e:  # the header passed our checks; anything else is still a broken file
            raise ModelFileError(f"{p} could not be read as safetensors ({type(e).__name__}: {e}). {AGAIN}", p) from e
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
