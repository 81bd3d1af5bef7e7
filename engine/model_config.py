"""``ModelConfig``: where one model's files come from, and how it is placed, with the seed's fields."""
from __future__ import annotations

import glob
import os
import pathlib
from dataclasses import dataclass, field
from typing import Optional, Union

from .downloads import download, local_dir_for, models_base_path

PathLike = Union[str, os.PathLike]


@dataclass
class ModelConfig:
    model_id: Optional[str] = None
    origin_file_pattern: Optional[Union[str, list]] = None
    path: Optional[Union[PathLike, list]] = None
    offload_dtype: object = None
    offload_device: object = None
    onload_dtype: object = None
    onload_device: object = None
    preparing_dtype: object = None
    preparing_device: object = None
    computation_dtype: object = None
    computation_device: object = None
    # Where the model_id's files live; None = DIFFSYNTH_MODEL_BASE_PATH or ./models at resolve time.
    local_model_path: Optional[PathLike] = field(default=None, repr=False)

    def vram_fields(self) -> dict:
        names = ("offload_dtype", "offload_device", "onload_dtype", "onload_device", "preparing_dtype",
                 "preparing_device", "computation_dtype", "computation_device")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.model_id}:{self.origin_file_pattern}"

    def resolve(self, models_dir: Optional[PathLike] = None, allow_download: bool = True) -> list[pathlib.Path]:
        """The local files (or folder) this config names, downloading what is missing.

        A file already in ``<models>/<model_id>/`` is used as is without any network access, so a script runs
        offline once its files are in place. Raises ``ModelNotFoundError`` with the file, model and folder.
        """
        if self.path is not None:
            paths = self.path if isinstance(self.path, (list, tuple)) else [self.path]
            out = [pathlib.Path(p).expanduser() for p in paths]
            missing = [str(p) for p in out if not p.exists()]
            if missing:
                from .errors import ModelNotFoundError
                raise ModelNotFoundError(f"Model file not found: {', '.join(missing)}. Check the path.")
            return out
        if not self.model_id or not self.origin_file_pattern:
            raise ValueError("ModelConfig needs either path=... or model_id=... with origin_file_pattern=...")
        base = pathlib.Path(models_dir or self.local_model_path or models_base_path())
        patterns = self.origin_file_pattern if isinstance(self.origin_file_pattern, (list, tuple)) else [self.origin_file_pattern]
        found = match_local_files(local_dir_for(base, self.model_id), patterns)
        if found is None:
            download(self.model_id, patterns, base, allow_download=allow_download)
            found = match_local_files(local_dir_for(base, self.model_id), patterns)
            if found is None:
                from .errors import ModelNotFoundError
                raise ModelNotFoundError(
                    f"Downloaded {self.model_id} but nothing matches {patterns} in {local_dir_for(base, self.model_id)}.")
        return found


def match_local_files(folder: pathlib.Path, patterns) -> Optional[list[pathlib.Path]]:
    """Every pattern must match something (a folder pattern such as ``tokenizer/`` matches the folder)."""
    out: list[pathlib.Path] = []
    for pattern in patterns:
        if pattern.endswith("/"):
            target = folder / pattern.rstrip("/")
            if not (target.is_dir() and any(target.iterdir())):
                return None
            out.append(target)
            continue
        matches = sorted(pathlib.Path(p) for p in glob.glob(str(folder / pattern)))
        matches = [m for m in matches if m.is_file() and not m.name.endswith((".part", ".incomplete", ".tmp"))]
        if not matches:
            return None
        out.extend(matches)
    return out
