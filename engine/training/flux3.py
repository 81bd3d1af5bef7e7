"""Training FLUX 3 Image Klein LoRAs on its base model (``flux-3-image-klein-base``), text to image and editing.

``train.py`` takes FLUX 3 files as it takes FLUX.2's (``--model_paths`` / ``--model_id_with_origin_paths``, with
``--tokenizer_path`` or the tokenizer in ``text_encoder/``); the family is read from the files
(``engine.training.families``). DiffSynth-Studio's FLUX 3 trainer is not visible offline, so each choice below follows
its FLUX.2 trainer (``engine.training.flux2``) carried over to FLUX 3's sampler:

- The model: the base model only. The step-distilled klein is a flow map (told where each step lands, through
  ``ref_time_in``): the flow-matching objective does not train it, and LoRAs trained on the base apply to it (the same
  module names). It is refused with that advice.
- Objective: 1000 sigmas, ``u = linspace(1, 1/1000)`` under FLUX 3's own shift ``sigma = a*u / (1 + (a - 1)*u)``
  (a = 6.93, no resolution shift: the sampler's formula at 1000 steps, as FLUX.2's trainer uses FLUX.2's); an index
  drawn uniformly, its timestep rounded to the compute dtype as FLUX 3's sampler rounds it (``dtype(1000 sigma) /
  1000``), the noise level and weight those of the nearest schedule timestep; the seed's bell weighting (mean 1).
  ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, MSE on the image's tokens times the weight. No guidance.
- Inputs: the image's 128-channel tokens (the FLUX.2 VAE's normalised mean, 2x2 patches), the prompt's Qwen3-VL
  hidden states (layers 4, 8, ..., 32 as the pipeline reads them), and with ``--extra_inputs edit_image`` the
  references as their own stream (``image_cond_hidden_states`` with ids at index -(i + 1), sized as the pipeline sizes
  them: ``Flux3ImagePipeline.encode_references``) -- so an edit LoRA learns what the studio's Edit tab runs.
- Targets: diffusers' module names (``to_q,to_k,to_v,to_out.0,linear_in,linear_out`` in every stream, or a stream's
  path such as ``mode_blocks.image_cond.N.attn.to_q``); empty: every block linear (the seed's automatic choice).
- The LoRA file: DiffSynth-Studio's keys over its Flux3DiT's names, which are BFL's
  (``content_mode_blocks.image.0.q_proj.lora_A.default.weight``, no alpha), or diffusers'
  (``transformer.mode_blocks.image.0.attn.to_q.lora_A.weight``) with ``--align_to_opensource_format
  --opensource_format diffusers``. ``engine.lora`` reads both (and every other published FLUX 3 format) back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import EngineError
from . import flux2
from .args import TrainConfig

FAMILY = "FLUX 3"
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_TARGETS = "to_q,to_k,to_v,to_out.0,linear_in,linear_out"
TARGET_EXAMPLES = (f"e.g. {DEFAULT_TARGETS} (every stream), or one stream's layers by path: "
                   f"mode_blocks.image_cond.N.attn.to_q, txt_mode_blocks.N.ff.linear_in, single_transformer_blocks.N...")
KLEIN_BASE = "black-forest-labs/flux-3-image-klein-base"


# --------------------------------------------------------------------------------------------------- loading
def load_pipeline(config: TrainConfig, device, dtype: torch.dtype, log: Callable[[str], None] = print):
    """The FLUX 3 pipeline of the run (the base model), every component resident, the preset LoRA fused and the
    ``--fp8_models`` stored in fp8."""
    from ..flux3.pipeline import Flux3ImagePipeline
    from .model import parse_model_configs
    configs = parse_model_configs(config)
    pipe = Flux3ImagePipeline.from_pretrained(torch_dtype=dtype, device=str(device),
                                              model_configs=[c for c, _ in configs],
                                              tokenizer_config=flux2.tokenizer_config(config))
    if pipe.dit is None:
        raise EngineError("None of the model files is a FLUX 3 transformer (model.safetensors or transformer/).")
    if pipe.is_distilled:
        raise EngineError(f"This is the step-distilled FLUX 3 Image Klein: it is a flow map (each step is told where "
                          f"it lands), which flow-matching training does not train. Train on the base model "
                          f"({KLEIN_BASE}:model.safetensors); its LoRAs apply to the distilled model too.")
    return flux2.finish_loading(pipe, config, configs, dtype, log, family=FAMILY)


def load_encoders(config: TrainConfig, device, dtype: torch.dtype):
    """Split training's stage 1: the Qwen3-VL text encoder and the VAE (no transformer)."""
    from ..flux3.pipeline import Flux3ImagePipeline
    from .model import parse_model_configs
    return Flux3ImagePipeline.from_pretrained(torch_dtype=dtype, device=str(device),
                                              model_configs=[c for c, _ in parse_model_configs(config)],
                                              tokenizer_config=flux2.tokenizer_config(config),
                                              vram_limit=getattr(config, "vram_limit", None))


def detect(keys) -> tuple[str, str, str]:
    from ..flux3.loading import detect_flux3
    return detect_flux3(keys)


# ---------------------------------------------------------------------------------------------- LoRA layers
def resolve_targets(dit, spec) -> tuple[list[str], list[str]]:
    return flux2.resolve_targets(dit, spec, family=FAMILY, examples=TARGET_EXAMPLES)


def known_layer_paths() -> tuple[str, ...]:
    from .lora_targets import known_layer_paths as known
    return known(FAMILY)


def load_lora_weights(dit, path, rank: int) -> int:
    return flux2.load_lora_weights(dit, path, rank, family=FAMILY)


def fuse_lora(dit, path, weight: float = 1.0) -> int:
    return flux2.fuse_lora(dit, path, weight, family=FAMILY)


def _native_name(module: str) -> str:
    from ..lora.flux3_names import bfl_module
    try:
        return bfl_module(module)
    except KeyError:
        raise EngineError(f"The LoRA on {module} has no name in DiffSynth-Studio's FLUX 3 keys: leave it out of "
                          f"--lora_target_modules, or write diffusers' keys (--align_to_opensource_format "
                          f"--opensource_format diffusers).") from None


def save_lora(dit, path, fmt: str = "native", dtype: torch.dtype = torch.bfloat16, info: Optional[dict] = None,
              prefix: str = ""):
    """The trained LoRA in DiffSynth-Studio's FLUX 3 keys (BFL module names, ``native``) or diffusers'."""
    return flux2.save_lora(dit, path, fmt, dtype, info, prefix, family=FAMILY, native_name=_native_name,
                           base_model="flux3")


# ------------------------------------------------------------------------------------------------ objective
class Flux3TrainingSchedule(flux2.Flux2TrainingSchedule):
    """1000 sigmas under FLUX 3's shift, their timesteps and loss weights; sampled as FLUX.2's (its ``sample``)."""

    def __init__(self, dtype: torch.dtype = torch.float32, num_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 alpha: Optional[float] = None):
        from ..flux3.schedule import ALPHA
        from .objective import bell_weights
        a = float(ALPHA if alpha is None else alpha)
        u = torch.linspace(1.0, 1 / num_timesteps, num_timesteps)
        self.sigmas = (a * u / (1 + (a - 1) * u)).to(torch.float32)
        self.timesteps = self.sigmas * num_timesteps
        self.weights = bell_weights(self.timesteps)
        self.dtype = dtype


def schedule(dtype: torch.dtype) -> Flux3TrainingSchedule:
    return Flux3TrainingSchedule(dtype)


@dataclass
class Flux3TrainingInputs:
    """One step's inputs, already encoded (no gradient through the encoders)."""
    latents: torch.Tensor             # (1, N, 128) the image's clean tokens x0, float32
    prompt_emb: torch.Tensor          # (1, L, 20480 at full size)
    text_ids: torch.Tensor            # (L, 4)
    img_ids: torch.Tensor             # (N, 4)
    height: int
    width: int
    references: Optional[torch.Tensor] = None      # (1, M, 128) the edit images' tokens (their own stream)
    reference_ids: Optional[torch.Tensor] = None   # (M, 4), reference i at index -(i + 1)


def flow_matching_loss(dit, inputs: Flux3TrainingInputs, sigma: float, weight: float, noise: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """The weighted flow-matching MSE of the FLUX 3 base transformer on one image (and its references)."""
    from ..flux3 import schedule as sch
    device = inputs.latents.device
    x0 = inputs.latents.float()
    noise = noise.to(device).float()
    noisy = (1 - sigma) * x0 + sigma * noise
    t = sch.model_timestep(torch.tensor([sigma]), dtype).to(device)
    extra = {}
    if inputs.references is not None:
        extra = {"image_cond_hidden_states": inputs.references.to(device=device, dtype=dtype),
                 "image_cond_ids": inputs.reference_ids.to(device)}
    pred = dit(hidden_states=noisy.to(dtype), encoder_hidden_states=inputs.prompt_emb.to(dtype), timestep=t,
               img_ids=inputs.img_ids.to(device), txt_ids=inputs.text_ids.to(device), return_dict=False, **extra)[0]
    return F.mse_loss(pred.float(), (noise - x0).float()) * weight


class Flux3TrainingModule(torch.nn.Module):
    """The trained FLUX 3 transformer and its loss, as one module (what DDP / DeepSpeed wrap)."""

    def __init__(self, dit, dtype: torch.dtype):
        super().__init__()
        self.dit = dit
        self.dtype = dtype

    def forward(self, inputs: Flux3TrainingInputs, sigma: float, weight: float, noise: torch.Tensor) -> torch.Tensor:
        return flow_matching_loss(self.dit, inputs, sigma, weight, noise, self.dtype)


def training_module(pipe, kind: str) -> torch.nn.Module:
    return Flux3TrainingModule(pipe.dit, pipe.dit_dtype)


@torch.no_grad()
def encode(pipe, item: dict, config: TrainConfig, device) -> Flux3TrainingInputs:
    """A dataset record as the transformer's inputs: image tokens, prompt states, position ids, references."""
    from ..flux3 import schedule as sch
    image = item["image"][0] if isinstance(item["image"], list) else item["image"]
    width, height = image.size
    tokens = sch.to_tokens(pipe.encode_image(image).to(device))
    prompt_emb = pipe.encode_prompt(item.get("prompt") or "").to(device)
    inputs = Flux3TrainingInputs(latents=tokens.float(), prompt_emb=prompt_emb,
                                 text_ids=sch.text_ids(prompt_emb.shape[1], device),
                                 img_ids=sch.image_ids(height // sch.CELL, width // sch.CELL, device=device),
                                 height=height, width=width)
    edit = item.get("edit_image")
    if "edit_image" in config.extra_input_names() and edit is not None and not (isinstance(edit, list) and not edit):
        references, ids = pipe.encode_references(edit, config.edit_image_auto_resize)
        inputs.references, inputs.reference_ids = references.to(device).float(), ids.to(device)
    return inputs


def fixed_loss(dit, inputs: list, dtype: torch.dtype, sigmas=(0.2, 0.4, 0.6, 0.8), seed: int = 1234) -> float:
    """The unweighted loss averaged over ``inputs`` at fixed sigmas with fixed noise: a steady measure of fit."""
    from .objective import fixed_loss as fixed
    return fixed(dit, inputs, dtype, sigmas, seed, loss=flow_matching_loss)
