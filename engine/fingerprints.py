"""Cheap, stable fingerprints of model files for image recipes.

Hashing a 24 GB checkpoint for every image is too slow, so a file's fingerprint is the sha256 of its size,
its first and its last 4 MiB (the header plus weights at both ends: fine-tunes of one architecture share a
header but not their weights). Computed once per (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import os
import pathlib

CHUNK = 4 * 1024 * 1024
_cache: dict = {}


def fingerprint(path) -> str:
    path = pathlib.Path(path)
    if path.is_dir():
        parts = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".model", ".txt"))
        h = hashlib.sha256()
        for p in parts:
            h.update(p.relative_to(path).as_posix().encode() + fingerprint(p).encode())
        return h.hexdigest()[:16]
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256(str(st.st_size).encode())
        with open(path, "rb") as f:
            h.update(f.read(CHUNK))
            if st.st_size > CHUNK:
                f.seek(max(CHUNK, st.st_size - CHUNK), os.SEEK_SET)
                h.update(f.read(CHUNK))
        _cache[key] = h.hexdigest()[:16]
    return _cache[key]
