"""Direct distillation: the seed's ``--task direct_distill`` (DiffSynth-Studio's ``DirectDistillLoss``).

Each training image was made by the teacher (the base model, many steps, its own CFG) from a known seed; its row in
the metadata names that seed and the few-step setting the student must learn (the seed's columns ``seed``,
``rand_device``, ``num_inference_steps``, ``cfg_scale``). One training step draws exactly the initial noise the
pipeline draws for that seed (``engine.latents.initial_noise``), runs the student's few-step FLUX.1 sampler on it
*with gradients* (the seed's FLUX.1 schedule, ``engine.scheduler.flux_sigmas``: a static shift of 3, the same for
every image size; Euler steps in float32 as ``engine.pipeline.Denoiser`` takes them), and returns
``mse(final latents, teacher image's VAE latents)``. (The seed steps its latents in the pipeline's dtype, bf16 on a
GPU; here the sampler is the engine's, so a distilled LoRA is trained on exactly what the studio will run.)

As in the seed's loss, the transformer reads the training guidance (``embedded_guidance=1``, the seed's training
inputs) and only the positive prompt: ``cfg_scale`` 1 is the seed's only path. Any other ``cfg_scale`` is ours: true CFG
against the negative prompt's encoding (the seed's training negative is the empty prompt), exactly the pipeline's
``v_neg + cfg * (v - v_neg)``, two transformer passes per step, both with gradients. The seed ignores the column
(its ``model_fn`` never combines passes); ignoring it silently here would train a different sampler than the row
names, so without a negative encoding such a row is refused.

Memory: the graph of every step is kept for the backward pass, so activations grow with ``num_inference_steps``;
gradient checkpointing of the transformer (``--use_gradient_checkpointing``) keeps only each block's inputs per step.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .. import latents as lat
from ..conditions import kontext as kontext_mod
from ..errors import EngineError
from ..scheduler import euler_step, flux_sigmas
from .objective import TRAINING_GUIDANCE, TrainingInputs

DISTILL_COLUMNS = ("seed", "rand_device", "num_inference_steps", "cfg_scale")
DEFAULT_RAND_DEVICE = "cpu"     # the seed's docs (its example metadata.csv) and the pipeline's default
DEFAULT_CFG_SCALE = 1.0
_FIX = ("add the missing column(s) to the metadata (the seed's direct-distill metadata.csv has image,prompt,seed,"
        "rand_device,num_inference_steps,cfg_scale) with the values the training image was generated with")


# ------------------------------------------------------------------------------------------------- settings
def _cell(item: Mapping, name: str):
    """The column's value, None when absent or empty (CSV gives '' for an empty cell, pandas NaN)."""
    value = item.get(name)
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _row_name(item: Mapping) -> str:
    """The row in words: its image path when the record still holds it (a loaded record holds the image itself),
    else its prompt."""
    image = item.get("image")
    if isinstance(image, str) and image.strip():
        return image.strip()
    name = getattr(image, "filename", "")
    if name:
        return str(name)
    return f"the row with prompt {str(item.get('prompt') or '')[:60]!r}"


def _integer(name: str, value) -> int:
    """An integer from an int, an integral float or its text ("4", "4.0"); anything else is refused."""
    try:
        number = float(value)
        if number.is_integer():
            return int(number)
    except (TypeError, ValueError, OverflowError):
        pass
    raise EngineError(f"Metadata column {name!r}: {value!r} is not a whole number; write it as e.g. 4.")


def distill_settings(item: Mapping) -> dict:
    """``{"seed", "rand_device", "num_inference_steps", "cfg_scale"}`` of one record, from its metadata columns.

    CSV cells arrive as text and JSON as numbers; both are parsed. ``seed`` and ``num_inference_steps`` are required
    (the seed's loss reads both and has no default for them); ``rand_device`` defaults to cpu and ``cfg_scale`` to 1,
    as in the seed's docs."""
    missing = [name for name in ("seed", "num_inference_steps") if _cell(item, name) is None]
    if missing:
        names = " and ".join(repr(m) for m in missing)
        raise EngineError(f"--task direct_distill needs the {names} column{'s' if len(missing) > 1 else ''} in every "
                          f"metadata row ({_row_name(item)} has none): {_FIX}.")
    seed = _integer("seed", _cell(item, "seed"))
    try:
        torch.Generator().manual_seed(seed)
    except (RuntimeError, OverflowError, ValueError):
        raise EngineError(f"Metadata column 'seed': {seed} is out of range; use a number from 0 to 2**64 - 1."
                          ) from None
    steps = _integer("num_inference_steps", _cell(item, "num_inference_steps"))
    if steps < 1:
        raise EngineError(f"Metadata column 'num_inference_steps': {steps}; the student needs at least 1 step "
                          f"(the seed's example distills to 4).")
    rand_device = str(_cell(item, "rand_device") or DEFAULT_RAND_DEVICE)
    try:
        torch.device(rand_device)
    except RuntimeError:
        raise EngineError(f"Metadata column 'rand_device': {rand_device!r} is not a device; use cpu (the seed's "
                          f"default) or the device the image's noise was drawn on, e.g. cuda.") from None
    cfg = _cell(item, "cfg_scale")
    try:
        cfg_scale = DEFAULT_CFG_SCALE if cfg is None else float(cfg)
    except (TypeError, ValueError):
        raise EngineError(f"Metadata column 'cfg_scale': {cfg!r} is not a number; write e.g. 1.") from None
    if not math.isfinite(cfg_scale) or cfg_scale <= 0:
        raise EngineError(f"Metadata column 'cfg_scale': {cfg!r}; use a positive number (1: no CFG, the seed's).")
    return {"seed": seed, "rand_device": rand_device, "num_inference_steps": steps, "cfg_scale": cfg_scale}


def distill_noise(settings: Mapping, latents_shape) -> torch.Tensor:
    """The initial noise ``FluxImagePipeline`` draws for ``settings``' seed and rand_device at this latent shape
    ((1, 16, H/8, W/8)): float32, on the rand_device (move it to the training device)."""
    shape = tuple(latents_shape)
    if len(shape) != 4 or shape[0] != 1 or shape[1] != lat.LATENT_CHANNELS:
        raise EngineError(f"distill_noise: latents of shape {shape}; FLUX.1 latents are "
                          f"(1, {lat.LATENT_CHANNELS}, height/8, width/8).")
    device = torch.device(settings["rand_device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"rand_device {settings['rand_device']!r}: this machine has no CUDA device. The noise "
                          f"must be drawn where the training image's was; train on a CUDA machine, or regenerate "
                          f"the images with rand_device cpu (the seed's default, the same noise on any machine).")
    return lat.initial_noise(shape[2] * lat.VAE_FACTOR, shape[3] * lat.VAE_FACTOR, settings["seed"],
                             settings["rand_device"])


# --------------------------------------------------------------------------------------------------- module
class DistillTrainingModule(torch.nn.Module):
    """The trained transformer and the direct-distillation loss, as one module (what DDP / DeepSpeed wrap).

    ``dtype``: the transformer's compute dtype; ``guidance``: the embedded guidance of the student's passes (the
    seed's training inputs set 1)."""

    def __init__(self, dit, dtype: torch.dtype, guidance: float = TRAINING_GUIDANCE):
        super().__init__()
        self.dit = dit
        self.dtype = dtype
        self.guidance = float(guidance)

    def forward(self, inputs: TrainingInputs, noise: torch.Tensor, num_inference_steps: int, cfg_scale: float = 1.0,
                negative: Optional[TrainingInputs] = None) -> torch.Tensor:
        """``mse(student's final latents, inputs.latents)``, differentiable through every step.

        ``negative``: the negative prompt's encoding (its ``prompt_emb`` and ``pooled``), needed when cfg_scale != 1."""
        final = self.sample(inputs, noise, num_inference_steps, cfg_scale, negative)
        return F.mse_loss(final.float(), inputs.latents.float())

    def sample(self, inputs: TrainingInputs, noise: torch.Tensor, num_inference_steps: int, cfg_scale: float = 1.0,
               negative: Optional[TrainingInputs] = None) -> torch.Tensor:
        """The few-step sampler from ``noise``: final latents (1, 16, H/8, W/8), float32 (gradients as the caller's
        grad mode allows)."""
        device = inputs.latents.device
        if tuple(noise.shape) != tuple(inputs.latents.shape):
            raise EngineError(f"Distill noise of shape {tuple(noise.shape)} does not match the image latents "
                              f"{tuple(inputs.latents.shape)}; draw it with distill_noise(settings, latents.shape).")
        use_cfg = float(cfg_scale) != 1.0
        if use_cfg and negative is None:
            raise EngineError(f"cfg_scale {cfg_scale} in the metadata: the student would sample with true CFG, which "
                              f"needs the negative prompt's encoding (pass negative=...). The seed samples the "
                              f"student with the positive prompt only; set the column to 1 to train as it does.")
        sigmas = flux_sigmas(int(num_inference_steps), schedule="seed")
        texts = [self._text(inputs, device)] + ([self._text(negative, device)] if use_cfg else [])
        img_ids = lat.image_ids(inputs.height, inputs.width, device=device)
        tokens = lat.pack(noise.to(device)).float()
        for i in range(int(num_inference_steps)):
            t = sigmas[i].expand(1).to(device=device, dtype=self.dtype)
            velocities = [self._velocity(tokens, t, text, img_ids, inputs.kontext) for text in texts]
            v = velocities[0]
            if use_cfg:   # the pipeline's true CFG, in the same order of operations
                v = velocities[1] + float(cfg_scale) * (v - velocities[1])
            tokens = euler_step(tokens, v, float(sigmas[i]), float(sigmas[i + 1]))
        return lat.unpack(tokens, inputs.height, inputs.width)

    def _text(self, inputs: TrainingInputs, device) -> tuple:
        emb = inputs.prompt_emb.to(device=device, dtype=self.dtype)
        return emb, inputs.pooled.to(device=device, dtype=self.dtype), lat.text_ids(emb.shape[1], device=device)

    def _velocity(self, tokens, t, text, img_ids, kontext) -> torch.Tensor:
        """One pass of the transformer: the generated tokens' velocity, float32 (references' part dropped)."""
        emb, pooled, txt_ids = text
        hidden, ids = kontext_mod.join(tokens.to(self.dtype), img_ids, kontext)
        g = (torch.full((1,), self.guidance, device=tokens.device, dtype=torch.float32)
             if self.dit.config.guidance_embeds else None)
        pred = self.dit(hidden_states=hidden, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t,
                        img_ids=ids, txt_ids=txt_ids, guidance=g, return_dict=False)[0]
        return kontext_mod.generated_part(pred.float(), tokens.shape[1])
