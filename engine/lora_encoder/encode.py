"""LoRA files -> LoRA Encoder tokens, as the seed's ``FluxImageUnit_LoRAEncode`` makes them.

Each LoRA is read by ``engine.lora.read_lora`` (any of the engine's formats, in diffusers' module names with each
pair's ``alpha / rank`` scale), its pairs gathered per encoder layer (``layer_pieces``), and encoded to one token;
several LoRAs' tokens are concatenated in order and multiplied by ``lora_encoder_scale``.

The encoder needs a LoRA on every one of its layers (304 for FLUX.1-dev). A LoRA that leaves some out (trained on
attention only, say) is refused with the layers it lacks, grouped by kind. Scale: the seed folds the FIRST alpha it
finds into every pair; here each pair keeps its own ``alpha / rank`` (the same for the usual one-alpha files; the
LayerNorm after each layer makes a common factor vanish anyway).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import EngineError
from .model import OPTIONAL, ROLE

MODEL_ID = "DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev"
MISSING = f'ModelConfig(model_id="{MODEL_ID}", origin_file_pattern="model.safetensors")'


def check_loaded(pipe) -> None:
    if getattr(pipe, ROLE, None) is None:
        raise EngineError(f"lora_encoder_inputs needs DiffSynth-Studio's LoRA Encoder, which is not loaded: add "
                          f"{MISSING} to from_pretrained's model_configs.")


def _blocks(names) -> str:
    nums = sorted({int(n.split(".")[1]) for n in names})
    return ", ".join(map(str, nums[:8])) + (f" ... ({len(nums)} blocks)" if len(nums) > 8 else "")


def missing_message(label: str, specs, missing: dict) -> str:
    """``missing``: {layer name: [diffusers modules it lacks]}."""
    by_kind: dict = {}
    for name in missing:
        kind = name.split(".", 2)[2]
        where = "single" if name.startswith("single_") else "double"
        by_kind.setdefault((where, kind), []).append(name)
    lines = "; ".join(f"{kind} of {where} blocks {_blocks(names)}" for (where, kind), names in by_kind.items())
    example = next(iter(missing.items()))
    return (f"The LoRA Encoder reads a LoRA on all {len(specs)} transformer layers, and {label} has none on "
            f"{len(missing)} of them: {lines} (e.g. {example[0]} needs {', '.join(example[1])}). A LoRA trained on "
            f"some layers only cannot be encoded: load it on the transformer alone (pipe.load_lora), or pick a LoRA "
            f"trained on every linear layer of the transformer.")


def layer_pieces(lora, specs, label: str, dtype=torch.float32, device="cpu") -> dict:
    """{layer name: [(A, B, scale) or a zero width]} for every encoder layer, in each fused layer's row order."""
    targets = lora.targets
    out, missing, wrong = {}, {}, []
    for s in specs:
        pieces, lacking = [], []
        for t in s.targets:
            if t in targets:
                A, B, scale = targets[t]
                pieces.append((A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype), float(scale)))
            elif t.rsplit(".", 1)[-1] in OPTIONAL:
                pieces.append(None)
            else:
                lacking.append(t)
        if lacking:
            missing[s.name] = lacking
            continue
        known = sum(int(p[1].shape[0]) for p in pieces if p is not None)
        rows_fit = known < s.dim_out if None in pieces else known == s.dim_out
        pieces = [s.dim_out - known if p is None else p for p in pieces]
        if not rows_fit or any(not isinstance(p, int) and p[0].shape[1] != s.dim_in for p in pieces):
            wrong.append(s.name)
        out[s.name] = pieces
    if missing:
        raise EngineError(missing_message(label, specs, missing))
    if wrong:
        s = next(x for x in specs if x.name == wrong[0])
        raise EngineError(f"{label} does not fit the LoRA Encoder: {len(wrong)} layer(s), e.g. {s.name}, have other "
                          f"widths than the encoder's ({s.dim_in} in, {s.dim_out} out). The encoder reads FLUX.1-dev "
                          f"LoRAs; this one is for another model.")
    return out


def _source(item):
    """A path (or state dict) of one ``lora_encoder_inputs`` entry: a path, a ModelConfig or a state dict."""
    from ..model_config import ModelConfig
    if isinstance(item, ModelConfig):
        return item.resolve()[0]
    if isinstance(item, (str, os.PathLike, dict)):
        return item
    raise EngineError(f"lora_encoder_inputs takes LoRA file paths or ModelConfigs (one or a list); got a "
                      f"{type(item).__name__}.")


def read(item):
    """(LoraFile, label) of one input."""
    from ..lora import LoraError, read_lora
    source = _source(item)
    label = "<state dict>" if isinstance(source, dict) else str(Path(source))
    try:
        return read_lora(source), label
    except LoraError as e:
        raise EngineError(str(e)) from e


def _place(pipe):
    place = getattr(pipe, "placements", {}).get(ROLE)
    if place is None:
        return pipe.device, pipe.torch_dtype
    return place.compute_device, place.compute_dtype


def encode_loras(pipe, items, scale: float = 1.0) -> torch.Tensor:
    """(1, len(items), width) float32 tokens on the CPU, times ``scale``."""
    check_loaded(pipe)
    encoder = getattr(pipe, ROLE)
    device, dtype = _place(pipe)
    out = []
    for item in items:
        lora, label = read(item)
        pieces = layer_pieces(lora, encoder.specs, label, dtype=dtype, device=device)
        out.append(pipe.run_model(ROLE, encoder, lambda m: m(pieces)).float().cpu())
    return torch.cat(out, dim=1) * float(scale)


__all__ = ["MODEL_ID", "check_loaded", "encode_loras", "layer_pieces", "missing_message", "read"]
