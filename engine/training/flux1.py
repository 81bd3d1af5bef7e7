"""Training FLUX.1 (dev, Krea, Kontext, ...): the family's functions for the loop (``engine.training.families``).

The work is done where it always was -- ``model`` (loading, LoRA injection), ``tasks`` (inputs), ``objective`` (the
seed's FLUX.1 schedule and loss), ``distill`` (direct distillation), ``export`` (LoRA files in the seed's, kohya's or
diffusers' keys), ``lora_targets`` (DiffSynth's and diffusers' module names); this module gives them the family
interface the other families have. Functions are looked up on their modules at call time (tests replace them there).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import export, model, objective, tasks
from .args import TrainConfig

FAMILY = "FLUX.1"


def load_pipeline(config: TrainConfig, device, dtype: torch.dtype, log: Callable[[str], None] = print):
    return model.load_pipeline(config, device, dtype, log=log)


def load_encoders(config: TrainConfig, device, dtype: torch.dtype):
    """Split training's stage 1: the text encoders and the VAE, resident (or placed under ``--vram_limit``)."""
    from ..pipeline import FluxImagePipeline
    configs = [c for c, _ in model.parse_model_configs(config)]
    tok = [model.ModelConfig(path=p) if p else None for p in (config.tokenizer_1_path, config.tokenizer_2_path)]
    return FluxImagePipeline.from_pretrained(torch_dtype=dtype, device=str(device), model_configs=configs,
                                             tokenizer_1_config=tok[0], tokenizer_2_config=tok[1],
                                             vram_limit=getattr(config, "vram_limit", None) or model.ALL_RESIDENT_GB)


def resolve_targets(dit, spec):
    from .lora_targets import resolve_targets as resolve
    return resolve(dit, spec)


def encode(pipe, item: dict, config: TrainConfig, device):
    return tasks.encode_flux1(pipe, item, config, device)


def schedule(dtype: torch.dtype):
    return objective.TrainingSchedule()


def training_module(pipe, kind: str) -> torch.nn.Module:
    dtype = pipe.placements["dit"].compute_dtype
    if kind == "direct_distill":
        from .distill import DistillTrainingModule
        return DistillTrainingModule(pipe.dit, dtype)
    return tasks.FluxTrainingModule(pipe.dit, dtype)


def load_lora_weights(dit, path, rank: int) -> int:
    return model.load_lora_weights(dit, path, rank)


def save_lora(dit, path, fmt: str = "native", dtype: torch.dtype = torch.bfloat16, info=None, prefix: str = ""):
    return export.save_lora(dit, path, fmt, dtype, info, prefix=prefix)


def detect(keys) -> tuple[str, str, str]:
    from ..loading.detect import detect_component
    return detect_component(keys)


def known_layer_paths() -> tuple[str, ...]:
    from .lora_targets import known_layer_paths as known
    return known("FLUX.1")
