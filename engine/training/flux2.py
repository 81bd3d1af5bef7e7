"""Training FLUX.2 LoRAs ([klein] 4B / 9B, their base models, [dev]): DiffSynth-Studio's FLUX.2 ``train.py`` on
this engine. The same ``train.py`` takes every family; which one a run trains is read from its model files
(``engine.training.families``). FLUX 3 (``engine.training.flux3``) reuses this module's LoRA functions.

What differs from FLUX.1 (``model`` / ``objective`` / ``export``), each as DiffSynth-Studio's FLUX.2 trainer does it:

- Loading: ``Flux2ImagePipeline.from_pretrained`` with ``--tokenizer_path`` (``model_id:pattern`` or a folder; without
  it the ``tokenizer/`` folder beside ``text_encoder/``); ``--fp8_models`` stores those models in fp8 (diffusers'
  layerwise casting: computed in the run's dtype); ``--preset_lora_path`` and ``--lora_checkpoint`` take any FLUX.2
  LoRA format ``engine.lora`` reads.
- Targets: DiffSynth's FLUX.2 DiT has diffusers' module names, so ``--lora_target_modules`` names diffusers' layers
  (``to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj`` and
  ``single_transformer_blocks.N.attn.to_out`` in its scripts), matched as PEFT matches: the whole path or its end after
  a dot; empty: the seed's automatic choice.
- Objective (``FlowMatchScheduler("FLUX.2").set_timesteps(1000, training=True)`` + ``FlowMatchSFTLoss``): 1000 sigmas
  ``linspace(1, 1/1000)`` warped by the exponential shift with mu = 0.8 (``e^mu / (e^mu + 1/s - 1)``); an index drawn
  uniformly, its timestep ``1000 sigma`` rounded to the compute dtype (the transformer gets that over 1000), and the
  noise level and weight those of the schedule's timestep nearest the rounded one, as the seed looks them up; the
  same bell weighting as FLUX.1 (mean 1). ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, MSE on the image's
  tokens times the weight. Embedded guidance 1 (read only by [dev]).
- Inputs: the image's 128-channel tokens (``engine.flux2.vae.Flux2VaeCodec``: VAE mean, 2x2 patches, ``bn`` statistics), the prompt's
  Qwen3 (or Mistral) hidden states, and with ``--extra_inputs edit_image`` the reference images' tokens after the
  image's, at t = 10, 20, ... (``Flux2ImagePipeline.encode_references``; resized to about 1 MP as the seed does unless
  ``--no_edit_image_auto_resize``); the loss reads the image's tokens only.
- The LoRA file: the seed's keys, ``<module>.lora_A.default.weight`` / ``lora_B.default.weight`` (diffusers module
  paths, ``--remove_prefix_in_ckpt`` applied to "pipe.dit."), no alpha (alpha = rank). ``--align_to_opensource_format
  --opensource_format diffusers`` writes diffusers' ``transformer.<module>.lora_A.weight`` instead.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import EngineError
from ..model_config import ModelConfig
from .args import TrainConfig

FAMILY = "FLUX.2"
SUPPORTED_EXTRA_INPUTS = ("edit_image",)
TRAINING_GUIDANCE = 1.0      # the seed's training inputs: embedded_guidance=1.0
TRAINING_MU = 0.8            # FlowMatchScheduler("FLUX.2") with no dynamic_shift_len (training)
NUM_TRAIN_TIMESTEPS = 1000
# DiffSynth-Studio's FLUX.2 LoRA scripts (lora/FLUX.2-klein-*.sh), without the per-block single to_out names.
DIFFSYNTH_FLUX2_TARGETS = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,"
                           "to_qkv_mlp_proj")
LORA_SUFFIXES = {"native": (".lora_A.default.weight", ".lora_B.default.weight"),
                 "diffusers": (".lora_A.weight", ".lora_B.weight")}


def diffsynth_targets(num_single_layers: int) -> str:
    """The seed's FLUX.2 ``--lora_target_modules`` for a transformer with this many single blocks (klein 4B: 20,
    9B: 24, [dev]: 48): the attention and MLP layers, and each single block's output projection by its path."""
    singles = ",".join(f"single_transformer_blocks.{i}.attn.to_out" for i in range(int(num_single_layers)))
    return DIFFSYNTH_FLUX2_TARGETS + ("," + singles if singles else "")


# ------------------------------------------------------------------------------------------------ loading
def tokenizer_config(config: TrainConfig) -> Optional[ModelConfig]:
    """``--tokenizer_path`` as the seed reads it: an existing path, else ``model_id:origin_file_pattern``."""
    value = (config.tokenizer_path or "").strip()
    if not value:
        return None
    if pathlib.Path(value).expanduser().exists():
        return ModelConfig(path=value)
    if ":" not in value:
        raise EngineError(f"--tokenizer_path {value!r} is neither a folder nor model_id:pattern (e.g. "
                          f"black-forest-labs/FLUX.2-klein-4B:tokenizer/).")
    cut = value.rfind(":")
    return ModelConfig(model_id=value[:cut], origin_file_pattern=value[cut + 1:])


def load_pipeline(config: TrainConfig, device, dtype: torch.dtype, log: Callable[[str], None] = print):
    """The FLUX.2 pipeline of the run, every component resident on the training device, the preset LoRA fused and
    the ``--fp8_models`` stored in fp8."""
    from ..flux2.pipeline import Flux2ImagePipeline
    from .model import parse_model_configs
    configs = parse_model_configs(config)
    pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=dtype, device=str(device),
                                              model_configs=[c for c, _ in configs],
                                              tokenizer_config=tokenizer_config(config))
    if pipe.dit is None:
        raise EngineError("None of the model files is a FLUX.2 transformer (transformer/*.safetensors).")
    return finish_loading(pipe, config, configs, dtype, log)


def finish_loading(pipe, config: TrainConfig, configs, dtype: torch.dtype, log: Callable[[str], None] = print,
                   family: str = FAMILY):
    """The preset LoRA (``--preset_lora_path``) fused into the loaded transformer and the ``--fp8_models`` stored in
    fp8 (FLUX.2 and FLUX 3 alike)."""
    from .model import roles_of
    if config.preset_lora_path:
        if (config.preset_lora_model or "dit") != "dit":
            raise EngineError(f"--preset_lora_model {config.preset_lora_model}: a preset LoRA can only be fused into "
                              f"the dit here.")
        n = fuse_lora(pipe.dit, config.preset_lora_path, family=family)
        log(f"Preset LoRA {config.preset_lora_path} fused into the {family} transformer ({n} layers).")
    fp8_roles = sorted({r for c, is_fp8 in configs if is_fp8 for r in roles_of(pipe, c)})
    if fp8_roles:
        clash = set(config.trainable()) & set(fp8_roles)
        if clash:
            raise EngineError(f"--fp8_models: {', '.join(sorted(clash))} is trained in full; fp8 storage is only for "
                              f"models whose weights are not updated (frozen, or trained through a LoRA).")
        for role in fp8_roles:
            store_in_fp8(getattr(pipe, role), dtype)
        log(f"Stored in fp8: {', '.join(fp8_roles)}.")
    return pipe


def store_in_fp8(module, compute_dtype: torch.dtype) -> None:
    """Weights kept in float8_e4m3fn, each layer cast to ``compute_dtype`` for its call (diffusers' layerwise
    casting; norms, embeddings and rotary tables stay as they are)."""
    from diffusers.hooks import apply_layerwise_casting
    apply_layerwise_casting(module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                            skip_modules_pattern=("pos_embed", "norm", "embed", "rotary"))


# ------------------------------------------------------------------------------------------------ LoRA layers
_BLOCK_LIST = re.compile(r"^(single_transformer_blocks|transformer_blocks|txt_mode_blocks|mode_blocks\.image_cond|"
                         r"mode_blocks\.image)\.(\d+)\.")


def _block_list(dit, name: str):
    """The module list ``name`` ("mode_blocks.image", "single_transformer_blocks", ...) of the transformer, or None."""
    module = dit
    for part in name.split("."):
        module = getattr(module, part, None)   # a ModuleDict's entries are attributes too
        if module is None:
            return None
    return module


def _depths(dit) -> str:
    lists = [(n, _block_list(dit, n)) for n in ("transformer_blocks", "mode_blocks.image", "single_transformer_blocks")]
    return " and ".join(f"{len(m)} {n}" for n, m in lists if m is not None)


def _missing_block(dit, name: str) -> bool:
    """Whether ``name`` is a path into a block this transformer does not have (``single_transformer_blocks.23...``
    on a model with 20): the seed's per-block lists are written for one size, and PEFT passes over such names."""
    m = _BLOCK_LIST.match(name)
    blocks = _block_list(dit, m.group(1)) if m else None
    return blocks is not None and int(m.group(2)) >= len(blocks)


def resolve_targets(dit, spec, family: str = FAMILY, examples: str = "") -> tuple[list[str], list[str]]:
    """``(module paths, one line per requested name)`` for ``--lora_target_modules`` on a FLUX.2 (or, with
    ``family`` and its ``examples``, FLUX 3) transformer: each
    name matches a linear layer's whole path or its end after a dot (as PEFT matches); empty: the seed's automatic
    choice. Paths into blocks the model does not have are passed over (said in the report); any other name that
    matches no linear layer is an EngineError naming it."""
    from .lora_targets import auto_targets, linear_layers
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    layers = linear_layers(dit)
    if not names:
        targets = auto_targets(dit)
        return targets, [f"(automatic) {len(targets)} linear layers of the transformer blocks"]
    chosen, report, unknown, absent = [], [], [], []
    for name in names:
        hits = [p for p in layers if p == name or p.endswith("." + name)]
        if not hits:
            (absent if _missing_block(dit, name) else unknown).append(name)
            continue
        report.append(f"{name} -> {len(hits)} layers")
        chosen += [h for h in hits if h not in chosen]
    if absent:
        report.append(f"{len(absent)} names of blocks this transformer does not have passed over (it has "
                      f"{_depths(dit)}): {absent[0]}{' ...' if len(absent) > 1 else ''}")
    if unknown or not chosen:
        unknown = unknown or absent
        shown = ", ".join(unknown[:6]) + (f" (and {len(unknown) - 6} more)" if len(unknown) > 6 else "")
        examples = examples or (f"as DiffSynth-Studio's FLUX.2 scripts do: {DIFFSYNTH_FLUX2_TARGETS}, "
                                f"single_transformer_blocks.N.attn.to_out")
        raise EngineError(f"--lora_target_modules: {shown} match no linear layer of the {family} transformer. Use "
                          f"its module names, {examples}.")
    return chosen, report


def read_lora_pairs(path, family: str = FAMILY) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{diffusers module path: (A, B, scale)} of a FLUX.2 (or FLUX 3) LoRA in any format the engine reads (the
    seed's, diffusers / PEFT, kohya / ComfyUI, ai-toolkit: ``engine.lora.read_lora(family=...)``)."""
    from ..lora import LoraError, read_lora
    try:
        return dict(read_lora(path, family=family).targets)
    except LoraError as exc:
        raise EngineError(str(exc)) from exc


@torch.no_grad()
def fuse_lora(dit, path, weight: float = 1.0, family: str = FAMILY) -> int:
    """Add a FLUX.2 (or FLUX 3) LoRA into the transformer's weights (``W += weight * scale * B @ A``); returns how
    many layers changed."""
    layers = dict(dit.named_modules())
    pairs = read_lora_pairs(path, family)
    missing = [name for name in pairs if not isinstance(layers.get(name), torch.nn.Linear)]
    if missing:
        raise EngineError(f"{path}: {len(missing)} of its layers are no linear layer of this {family} transformer "
                          f"(e.g. {missing[0]}).")
    for name, (A, B, scale) in pairs.items():
        module = layers[name]
        delta = (B.float() @ A.float()) * (scale * weight)
        module.weight.data = (module.weight.float() + delta.to(module.weight.device)).to(module.weight.dtype)
    return len(pairs)


def load_lora_weights(dit, path, rank: int, family: str = FAMILY) -> int:
    """Start the injected LoRA from a file (``--lora_checkpoint``); returns the number of layers set."""
    from .model import set_lora_pairs
    return set_lora_pairs(dit, read_lora_pairs(path, family), rank, path)


def save_lora(dit, path, fmt: str = "native", dtype: torch.dtype = torch.bfloat16, info: Optional[dict] = None,
              prefix: str = "", family: str = FAMILY, native_name: Callable[[str], str] = str,
              base_model: str = "flux2") -> pathlib.Path:
    """The PEFT LoRA of ``dit`` as the seed's FLUX.2 file (``native``: its DiT's module names, diffusers' for FLUX.2,
    ``native_name`` of them otherwise) or diffusers' (``diffusers``)."""
    from . import export
    if fmt not in LORA_SUFFIXES:
        raise EngineError(f"{family} LoRAs are written in DiffSynth-Studio's keys (the default) or diffusers' "
                          f"(--align_to_opensource_format --opensource_format diffusers), not {fmt!r}.")
    pairs = export.peft_pairs(dit)
    if not pairs:
        raise ValueError("The transformer carries no trained LoRA layers.")
    down, up = LORA_SUFFIXES[fmt]
    lead = prefix if fmt == "native" else "transformer."
    tensors = {}
    for module, (A, B, scale) in pairs.items():
        name = native_name(module) if fmt == "native" else module
        tensors[f"{lead}{name}{down}"] = A.to(dtype)
        tensors[f"{lead}{name}{up}"] = (B * scale).to(dtype)
    rank = next(iter(pairs.values()))[0].shape[0]
    meta = export.header(dict(info or {}, rank=rank, alpha=rank, lora_format=fmt), rank, fmt)
    meta.update(flux_studio_family=family, ss_base_model_version=base_model)
    return export.atomic_save(tensors, path, meta)


# ------------------------------------------------------------------------------------------------ the objective
class Flux2TrainingSchedule:
    """The seed's FLUX.2 training schedule: 1000 sigmas, their timesteps and loss weights."""

    def __init__(self, dtype: torch.dtype = torch.float32, num_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 mu: float = TRAINING_MU):
        from .objective import bell_weights
        sigma_min, sigma_max = 1 / num_timesteps, 1.0
        start = sigma_min + (sigma_max - sigma_min) * 1.0
        base = torch.linspace(start, sigma_min, num_timesteps)
        self.sigmas = (math.exp(mu) / (math.exp(mu) + (1 / base - 1))).to(torch.float32)
        self.timesteps = self.sigmas * num_timesteps
        self.weights = bell_weights(self.timesteps)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.sigmas)

    def sample(self, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> tuple[int, float, float]:
        """(index, sigma, weight): an index drawn uniformly from [low, high), its timestep rounded to the compute
        dtype, and the sigma and weight of the schedule's timestep nearest to that (the seed's lookup)."""
        lo, hi = int(low * len(self)), int(high * len(self))
        j = self.lookup(int(torch.randint(lo, hi, (1,), generator=generator)))
        return j, float(self.sigmas[j]), float(self.weights[j])

    def lookup(self, i: int) -> int:
        """The index whose sigma and weight go with drawn index ``i``: the timestep nearest to ``i``'s rounded to
        the compute dtype (``i`` itself in float32)."""
        t = self.timesteps[i].to(self.dtype).float()
        return int(torch.argmin((self.timesteps - t).abs()))


@dataclass
class Flux2TrainingInputs:
    """One step's inputs, already encoded (no gradient through the encoders)."""
    latents: torch.Tensor             # (1, N, 128) the image's clean tokens x0, float32
    prompt_emb: torch.Tensor          # (1, L, context width)
    text_ids: torch.Tensor            # (L, 4)
    img_ids: torch.Tensor             # (N + M, 4): the image's, then the references'
    height: int
    width: int
    references: Optional[torch.Tensor] = None   # (1, M, 128) the edit images' tokens


def flow_matching_loss(dit, inputs: Flux2TrainingInputs, sigma: float, weight: float, noise: torch.Tensor,
                       dtype: torch.dtype, guidance: float = TRAINING_GUIDANCE) -> torch.Tensor:
    """The weighted flow-matching MSE of a FLUX.2 transformer on one image (and its references)."""
    from ..flux2 import schedule as sch
    device = inputs.latents.device
    x0 = inputs.latents.float()
    noise = noise.to(device).float()
    noisy = (1 - sigma) * x0 + sigma * noise
    hidden = noisy if inputs.references is None else torch.cat([noisy, inputs.references.to(device).float()], 1)
    t = sch.model_timestep(torch.tensor([sigma]), dtype).to(device)
    g = torch.full((1,), guidance, device=device, dtype=torch.float32) if dit.config.guidance_embeds else None
    pred = dit(hidden_states=hidden.to(dtype), encoder_hidden_states=inputs.prompt_emb.to(dtype), timestep=t,
               img_ids=inputs.img_ids, txt_ids=inputs.text_ids, guidance=g, return_dict=False)[0]
    pred = pred[:, :x0.shape[1]]
    return F.mse_loss(pred.float(), (noise - x0).float()) * weight


class Flux2TrainingModule(torch.nn.Module):
    """The trained FLUX.2 transformer and its loss, as one module (what DDP / DeepSpeed wrap)."""

    def __init__(self, dit, dtype: torch.dtype):
        super().__init__()
        self.dit = dit
        self.dtype = dtype

    def forward(self, inputs: Flux2TrainingInputs, sigma: float, weight: float, noise: torch.Tensor) -> torch.Tensor:
        return flow_matching_loss(self.dit, inputs, sigma, weight, noise, self.dtype)


@torch.no_grad()
def encode(pipe, item: dict, config: TrainConfig, device) -> Flux2TrainingInputs:
    """A dataset record as the transformer's inputs: image tokens, prompt states, position ids, references."""
    from ..flux2 import schedule as sch
    image = item["image"][0] if isinstance(item["image"], list) else item["image"]
    width, height = image.size
    tokens = sch.to_tokens(pipe.encode_image(image).to(device))
    prompt_emb = pipe.encode_prompt(item.get("prompt") or "").to(device)
    text_ids = sch.text_ids(prompt_emb.shape[1], device)
    img_ids = sch.image_ids(height, width, device=device)
    references = None
    edit = item.get("edit_image")
    if "edit_image" in config.extra_input_names() and edit is not None and not (isinstance(edit, list) and not edit):
        references, ref_ids = pipe.encode_references(edit, config.edit_image_auto_resize)
        references = references.to(device).float()
        img_ids = torch.cat([img_ids, ref_ids.to(device)], dim=0)
    return Flux2TrainingInputs(latents=tokens.float(), prompt_emb=prompt_emb, text_ids=text_ids, img_ids=img_ids,
                               height=height, width=width, references=references)


def fixed_loss(dit, inputs: list, dtype: torch.dtype, sigmas=(0.2, 0.4, 0.6, 0.8), seed: int = 1234) -> float:
    """The unweighted loss averaged over ``inputs`` at fixed sigmas with fixed noise (``objective.fixed_loss`` with
    FLUX.2's loss): a steady measure of fit."""
    from .objective import fixed_loss as fixed
    return fixed(dit, inputs, dtype, sigmas, seed, loss=flow_matching_loss)


def num_single_layers(transformer_folder) -> Optional[int]:
    """``num_single_layers`` from a diffusers ``transformer/config.json`` (None when it is not there)."""
    try:
        return int(json.loads((pathlib.Path(transformer_folder) / "config.json").read_text())["num_single_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------ the family interface
def load_encoders(config: TrainConfig, device, dtype: torch.dtype):
    """Split training's stage 1: the text encoder and the VAE (no transformer)."""
    from ..flux2.pipeline import Flux2ImagePipeline
    from .model import parse_model_configs
    return Flux2ImagePipeline.from_pretrained(torch_dtype=dtype, device=str(device),
                                              model_configs=[c for c, _ in parse_model_configs(config)],
                                              tokenizer_config=tokenizer_config(config),
                                              vram_limit=getattr(config, "vram_limit", None))


def schedule(dtype: torch.dtype) -> Flux2TrainingSchedule:
    return Flux2TrainingSchedule(dtype)


def training_module(pipe, kind: str) -> torch.nn.Module:
    return Flux2TrainingModule(pipe.dit, pipe.dit_dtype)


def detect(keys) -> tuple[str, str, str]:
    from ..flux2.loading import detect_flux2
    return detect_flux2(keys)


def known_layer_paths() -> tuple[str, ...]:
    from .lora_targets import known_layer_paths as known
    return known(FAMILY)
