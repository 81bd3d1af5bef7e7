"""Loading the models for training and making the transformer trainable, with the engine's own loaders.

Order, as the seed's ``switch_pipe_to_training_mode``: load (``FluxImagePipeline.from_pretrained``; every component
resident on the training device, as the seed moves the whole training module there), fuse the preset LoRA into the
base (differential LoRA), store the ``--fp8_models`` in fp8 (after the fusion, so the base is rounded once), freeze,
then add the trained LoRA (PEFT, on the modules ``lora_targets`` resolves) or unfreeze the fully trained models.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

import torch

from ..errors import EngineError
from ..model_config import ModelConfig
from .args import TrainConfig

FP8 = torch.float8_e4m3fn
TRAINABLE_ROLES = ("dit",)   # what --trainable_models / --lora_base_model may name here
ALL_RESIDENT_GB = 1e6        # a VRAM budget no plan exceeds: everything resident, as the seed trains


def resolve_dtype(name: str, device) -> torch.dtype:
    if name in (None, "", "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def parse_model_configs(config: TrainConfig) -> list[tuple[ModelConfig, bool]]:
    """``[(ModelConfig, stored in fp8)]`` from ``--model_paths`` (JSON) and ``--model_id_with_origin_paths``, with
    ``--fp8_models`` matched against the same strings, as the seed does."""
    fp8 = {s.strip() for s in (config.fp8_models or "").split(",") if s.strip()}
    out = []
    if config.model_paths:
        try:
            paths = json.loads(config.model_paths)
        except json.JSONDecodeError as exc:
            raise EngineError(f"--model_paths must be a JSON list of paths: {exc}.") from None
        for path in paths if isinstance(paths, list) else [paths]:
            key = path if isinstance(path, str) else json.dumps(path)
            out.append((ModelConfig(path=path), key in fp8 or (isinstance(path, str) and path in fp8)))
    for entry in (s.strip() for s in (config.model_id_with_origin_paths or "").split(",")):
        if not entry:
            continue
        if os.path.exists(entry):
            out.append((ModelConfig(path=entry), entry in fp8))
            continue
        if ":" not in entry:
            raise EngineError(f"--model_id_with_origin_paths: {entry!r} is neither a path nor "
                              f"model_id:file_pattern (e.g. black-forest-labs/FLUX.1-dev:flux1-dev.safetensors).")
        model_id, pattern = entry[: entry.rfind(":")], entry[entry.rfind(":") + 1:]
        out.append((ModelConfig(model_id=model_id, origin_file_pattern=pattern), entry in fp8))
    if not out:
        raise EngineError("No models to train: pass --model_paths or --model_id_with_origin_paths.")
    return out


def roles_of(pipe, config: ModelConfig) -> list[str]:
    files = {str(p) for p in config.resolve()}
    return [role for role, paths in pipe.model_files.items() if files & set(paths) or
            any(str(p).startswith(tuple(f + os.sep for f in files)) for p in paths)]


def fp8_fields(device, compute_dtype) -> dict:
    """The seed's vram_config for an fp8-stored model (stored, moved and prepared in fp8, computed in bf16)."""
    return {"offload_dtype": FP8, "offload_device": device, "onload_dtype": FP8, "onload_device": device,
            "preparing_dtype": FP8, "preparing_device": device, "computation_dtype": compute_dtype,
            "computation_device": device}


def load_pipeline(config: TrainConfig, device, dtype: torch.dtype, log: Callable[[str], None] = print, plan=None):
    """The pipeline holding every model of the run, placed for training, preset LoRA fused and fp8 applied. Under a
    training memory ``plan`` (``engine.training.memory``) every model loads into CPU RAM and is then placed as the
    plan says (the transformer by ``offload.apply_training_plan`` once its LoRA is added)."""
    import dataclasses

    from ..pipeline import FluxImagePipeline
    from .memory import training_memory_plan
    from .offload import plan_fields, rest_on_cpu_fields
    configs = parse_model_configs(config)
    plan = plan or training_memory_plan(config, device)   # None unless --vram_limit or the seed's offload flags
    for line in plan.lines() if plan is not None else ():
        log(line)
    if plan is not None:
        configs = [(dataclasses.replace(c, **rest_on_cpu_fields(device, dtype)), f) for c, f in configs]
    tok1 = ModelConfig(path=config.tokenizer_1_path) if config.tokenizer_1_path else None
    tok2 = ModelConfig(path=config.tokenizer_2_path) if config.tokenizer_2_path else None
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=dtype, device=str(device),
                                             model_configs=[c for c, _ in configs], tokenizer_1_config=tok1,
                                             tokenizer_2_config=tok2, vram_limit=ALL_RESIDENT_GB)
    if pipe.dit is None:
        raise EngineError("None of the model files is a FLUX transformer (flux1-dev.safetensors or similar).")
    if config.preset_lora_path:
        target = config.preset_lora_model or "dit"
        if target != "dit":
            raise EngineError(f"--preset_lora_model {target}: a preset LoRA can only be fused into the dit here.")
        report = fuse_lora(pipe.dit, config.preset_lora_path)
        log(f"Preset LoRA {config.preset_lora_path} fused into the transformer ({report['bound']} layers).")
    fp8_roles = sorted({r for c, is_fp8 in configs if is_fp8 for r in roles_of(pipe, c)})
    if fp8_roles:
        trained = set(config.trainable())
        clash = trained & set(fp8_roles)
        if clash:
            raise EngineError(f"--fp8_models: {', '.join(sorted(clash))} is trained in full; fp8 storage is only for "
                              f"models whose weights are not updated (frozen, or trained through a LoRA).")
    if plan is not None:
        pipe.set_models({}, plan_fields(plan, pipe.installed_models(), fp8_roles, device, dtype))
    elif fp8_roles:
        pipe.set_models({}, {r: fp8_fields(str(device), dtype) for r in fp8_roles})
    if fp8_roles:
        log(f"Stored in fp8: {', '.join(fp8_roles)}.")
    pipe.training_plan = plan
    return pipe


@torch.no_grad()
def fuse_lora(dit, path, weight: float = 1.0) -> dict:
    """Add a LoRA (any format the engine reads) into the transformer's weights: ``W += weight * scale * B @ A``."""
    from ..lora import LoraError, bind, read_lora
    try:
        bound, report = bind(dit, read_lora(path))
    except LoraError as exc:
        raise EngineError(str(exc)) from exc
    for _target, (module, A, B, bias, scale) in bound.items():
        delta = (B.float() @ A.float()) * (scale * weight)
        module.weight.data = (module.weight.float() + delta.to(module.weight.device)).to(module.weight.dtype)
        if bias is not None:
            if module.bias is None:
                raise EngineError(f"{path}: the LoRA has an up bias for {_target}, which has no bias.")
            module.bias.data = (module.bias.float() + bias.float().to(module.bias.device) * scale * weight
                                ).to(module.bias.dtype)
    return report


def add_lora(dit, config: TrainConfig, log: Callable[[str], None] = print, resolve=None) -> list[str]:
    """Inject a PEFT LoRA (rank = alpha = ``--lora_rank``, as the seed) on the resolved targets; only its matrices
    train. ``resolve(dit, spec)`` reads ``--lora_target_modules`` (FLUX.1's ``lora_targets.resolve_targets`` unless
    given). Returns the target module paths."""
    import re

    from peft import LoraConfig, inject_adapter_in_model

    from .lora_targets import resolve_targets
    targets, report = (resolve or resolve_targets)(dit, config.lora_target_modules)
    for line in report:
        log(f"LoRA target {line}")
    dit.requires_grad_(False)
    torch.manual_seed(config.seed)   # PEFT initialises the down matrices from the global generator
    pattern = "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"   # exact paths (a list would match suffixes)
    inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank, target_modules=pattern), dit)
    lora_dtype = getattr(torch, config.lora_dtype)
    for name, p in dit.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.data = p.data.to(lora_dtype)
            p.requires_grad_(True)
    # fp8-stored base layers (diffusers' layerwise casting, applied before the LoRA, so the LoRA's own matrices stay
    # in --lora_dtype): PEFT keeps casting each layer's input to its LoRA matrices' dtype, and the output back.
    # (diffusers turns that cast off for models whose LoRA layers are stored in fp8 too; here it would hand bf16
    # inputs to float32 LoRA matrices and fail.)
    return targets


@torch.no_grad()
def load_lora_weights(dit, path, rank: int) -> int:
    """Start the injected LoRA from a file in any format the engine reads (``--lora_checkpoint``). Returns the
    number of layers set."""
    from ..lora import read_lora
    lf = read_lora(path)
    return set_lora_pairs(dit, lf.targets, rank, path, f" ({lf.describe()})")


@torch.no_grad()
def set_lora_pairs(dit, pairs: dict, rank: int, path, described: str = "") -> int:
    """Copy ``pairs`` ({layer name: (A, B, scale)}, as read from a LoRA file) into the injected PEFT LoRA of the
    same rank, so that B @ A * scale is what the layer adds (PEFT's own scaling divided out). Returns the number of
    layers set; a rank that differs, or no layer in common, is refused naming the file."""
    from .export import peft_pairs
    layers = dict(dit.named_modules())
    set_count, wrong = 0, []
    for name in peft_pairs(dit):
        if name not in pairs:
            continue
        A, B, scale = pairs[name]
        if A.shape[0] != rank:
            wrong.append(f"{name} (rank {A.shape[0]})")
            continue
        layer = layers[name]
        layer.lora_A["default"].weight.copy_(A.to(layer.lora_A["default"].weight.dtype))
        layer.lora_B["default"].weight.copy_((B.float() * scale / layer.scaling["default"]).to(
            layer.lora_B["default"].weight.dtype))
        set_count += 1
    if wrong:
        raise EngineError(f"{path}: its rank differs from --lora_rank {rank} on {', '.join(wrong[:3])}; pass the "
                          f"LoRA's own rank.")
    if not set_count:
        raise EngineError(f"{path}: none of its layers is among the LoRA targets being trained{described}; check "
                          f"--lora_target_modules.")
    return set_count


def load_full_weights(dit, path) -> int:
    """The seed's --resume_from_checkpoint for full training: weights (diffusers key names) from a file."""
    from ..loading.files import read_state_dict
    sd = read_state_dict(pathlib.Path(path))
    sd = {k[len("pipe.dit."):] if k.startswith("pipe.dit.") else k: v for k, v in sd.items()}
    missing, unexpected = dit.load_state_dict(sd, strict=False)
    if unexpected:
        raise EngineError(f"Cannot load {path}: {len(unexpected)} keys are not the transformer's "
                          f"(e.g. {unexpected[0]}).")
    return len(sd)


def enable_checkpointing(dit, offload: bool) -> None:
    """diffusers' gradient checkpointing of every block; ``offload`` keeps the saved block inputs in CPU memory
    (the seed's --use_gradient_checkpointing_offload)."""
    if not offload:
        dit.enable_gradient_checkpointing()
        return

    def checkpoint_offloaded(module, *args):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    dit.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_offloaded)


def trainable_parameters(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}
