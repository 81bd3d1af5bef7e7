"""Reading a LoRA file: its tensors and its metadata, with a clear error naming the file for every way it can be bad.

``.safetensors`` files are checked with the loader's header reader first (truncated downloads, HTML pages, Git LFS
pointers and pickles are named as such), then memory-mapped. ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` files are read
with ``torch.load(weights_only=True)`` (old diffusers ``pytorch_lora_weights.bin``). A folder is accepted when it
holds one obvious LoRA file (diffusers' ``pytorch_lora_weights.safetensors``, PEFT's ``adapter_model.safetensors``,
or a single ``.safetensors``); PEFT's ``adapter_config.json`` beside the weights supplies ``lora_alpha``.

``device="meta"`` reads only the header: shape/dtype-only tensors, except scalars (kohya's ``.alpha``), which are read
for real because the scale depends on them.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import LoraError, few

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FOLDER_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                "adapter_model.bin")


def resolve_file(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise LoraError(f"LoRA file {p} does not exist.", p)
    if p.is_dir():
        for name in FOLDER_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        if not found:
            raise LoraError(f"{p} is a folder with no LoRA weights in it (no .safetensors file).", p)
        raise LoraError(f"{p} holds several .safetensors files ({few(f.name for f in found)}): pick the LoRA file "
                        f"itself.", p)
    return p


def _adapter_config(p: Path) -> dict:
    cfg = p.parent / "adapter_config.json"
    if not cfg.is_file():
        return {}
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _read_pickle(p: Path) -> dict:
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoraError(f"{p} could not be read as a PyTorch checkpoint ({type(e).__name__}: {e}): the file is corrupt "
                        f"or not a LoRA. Download it again, or use its .safetensors release.", p) from e
    for key in ("state_dict", "module", "model"):  # some trainers wrap the weights
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping) and len(sd) <= 4:
            sd = sd[key]
    if not isinstance(sd, Mapping):
        raise LoraError(f"{p} holds a {type(sd).__name__}, not a dictionary of tensors: it is not a LoRA file.", p)
    return {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_safetensors(p: Path, device) -> tuple[dict, dict]:
    from engine.loading.errors import ModelFileError
    from engine.loading.files import DTYPES, read_header

    try:
        header = read_header(p)
    except ModelFileError as e:
        msg = str(e)
        raise LoraError(msg if str(p) in msg else f"{p}: {msg}", p) from e
    from safetensors import safe_open

    meta = device is not None and torch.device(device).type == "meta"
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            out = {}
            for k, info in header.items():
                shape = info["shape"]
                if meta and torch.Size(shape).numel() > 1:
                    out[k] = torch.empty(shape, dtype=DTYPES[info["dtype"]], device="meta")
                else:
                    out[k] = f.get_tensor(k)
    except LoraError:
        raise
    except Exception as e:  # the header passed the checks; anything else is still a broken file
        raise LoraError(f"{p} could not be read as safetensors ({type(e).__name__}: {e}): the file is corrupt. "
                        f"Download it again.", p) from e
    if device is not None and not meta:
        out = {k: v.to(device) for k, v in out.items()}
    return out, metadata


def read_tensors(path, device=None) -> tuple[Path, dict, dict]:
    """(file, {key: tensor}, metadata) of a LoRA file or folder. Metadata values are strings (safetensors'),
    plus ``adapter_config`` (a dict) when PEFT's adapter_config.json sits beside the file."""
    p = resolve_file(path)
    if p.stat().st_size == 0:
        raise LoraError(f"LoRA file {p} is empty (0 bytes): the download did not finish. Download it again.", p)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        tensors, metadata = _read_pickle(p), {}
        if device is not None and torch.device(device).type == "meta":
            tensors = {k: v if v.numel() <= 1 else torch.empty(v.shape, dtype=v.dtype, device="meta")
                       for k, v in tensors.items()}
        elif device is not None:
            tensors = {k: v.to(device) for k, v in tensors.items()}
    else:
        tensors, metadata = _read_safetensors(p, device)
    cfg = _adapter_config(p)
    if cfg:
        metadata = {**metadata, "adapter_config": cfg}
    if not tensors:
        raise LoraError(f"LoRA file {p} holds no tensors at all: it is empty or not a LoRA.", p)
    return p, tensors, metadata
