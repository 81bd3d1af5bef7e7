"""``Flux3ImagePipeline``: the seed-compatible FLUX 3 Image Klein pipeline (the step-distilled model and its base).

DiffSynth-Studio's FLUX 3 scripts port by changing the import::

    from engine import Flux3ImagePipeline, ModelConfig
    pipe = Flux3ImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=[
        ModelConfig(model_id="black-forest-labs/flux-3-image-klein", origin_file_pattern="model.safetensors"),
        ModelConfig(model_id="black-forest-labs/flux-3-image-klein",
                    origin_file_pattern="text_encoder/*.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B",
                    origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ])   # the tokenizer is read from text_encoder/ (tokenizer_config=... names another folder)
    image = pipe(prompt, seed=0)                                    # 16 steps, alpha 6.93
    image = pipe("put the cat on the sofa", edit_image=[cat, sofa], seed=0)   # up to 10 references

The flow: noise drawn as (tokens, 128) (or the noised input image's tokens) -> the prompt (and, with
``cfg_scale != 1``, the negative prompt) through Qwen3-VL (``engine.flux3.text``) -> Euler steps of the transformer's
velocity over sigma = a*u/(1+(a-1)*u) (``engine.flux3.schedule``) -> the VAE's ``bn`` statistics undone,
unpatchified, decoded (FLUX.2's VAE and codec). References (``edit_image``) are VAE-encoded and go to the transformer as
their own stream (``engine.flux3.references``). The step-distilled model (a ``flow_map`` transformer: BFL's
``ref_time_in``) is also told the sigma each step jumps to and runs without CFG (``cfg_scale`` must be 1, as the seed
requires); the base model takes true CFG with the negative prompt.

``schedule="seed"`` (default) is DiffSynth-Studio's conventions; ``schedule="diffusers"`` is diffusers' modular FLUX 3
pipelines' (noise drawn as a grid, text padding positions, timestep rounding): the differences are listed in the
docs of ``schedule`` and ``text``. Tokens are held in float32 between steps; the transformer computes in the
pipeline's dtype.
"""
from __future__ import annotations

import importlib
import pathlib
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ..acceleration.prompt_cache import cached, encoder_identity
from ..errors import EngineError
from ..flux2.pipeline import fit
from ..flux2.vae import Flux2VaeMethods
from ..model_config import ModelConfig
from ..lora.pipeline_methods import RuntimeLoraMethods
from ..placed import PlacedPipeline
from ..roles import FLUX3_ROLE_NAMES
from . import references as refs
from . import schedule as sch
from .text import Flux3PromptEncoder, load_tokenizer

FLUX3_KLEIN = "black-forest-labs/flux-3-image-klein"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_models(files, torch_dtype, device) -> dict:
    """``engine.flux3.loading.load_flux3_models(files, torch_dtype, device) -> {role: module}``, looked up by name."""
    loading = importlib.import_module(".loading", __package__)
    return loading.load_flux3_models(files, torch_dtype=torch_dtype, device=device)


class Flux3ImagePipeline(Flux2VaeMethods, RuntimeLoraMethods, PlacedPipeline):
    ROLE_NAMES = FLUX3_ROLE_NAMES        # the same three slots as FLUX.2: text_encoder (Qwen3-VL here), dit, vae
    PLAN_LABELS = "flux3"
    WHOSE = "FLUX 3 "
    VAE_MISSING = ("No FLUX 3 VAE is loaded: add the ModelConfig of the FLUX.2 VAE "
                   "(vae/diffusion_pytorch_model.safetensors).")

    def __init__(self, device: Optional[str] = None, torch_dtype=torch.bfloat16):
        self.device = torch.device(device or default_device())
        self.torch_dtype = torch_dtype
        self.init_placement()             # the component slots, their memory plan and speed settings (engine.placed)
        self.tokenizer = None
        self.text_layers = None           # hidden states the DiT reads (None: the encoder's, else 4, 8, ..., 32)

    @classmethod
    def from_modules(cls, dit=None, vae=None, text_encoder=None, tokenizer=None, device: Optional[str] = None,
                     torch_dtype=torch.bfloat16, text_layers=None) -> "Flux3ImagePipeline":
        """A pipeline from modules already built (tests, the demo): placed like loaded ones."""
        pipe = cls(device=device, torch_dtype=torch_dtype)
        pipe.tokenizer, pipe.text_layers = tokenizer, text_layers
        pipe.set_models({r: m for r, m in (("dit", dit), ("vae", vae), ("text_encoder", text_encoder))
                         if m is not None})
        return pipe

    @staticmethod
    def from_pretrained(torch_dtype=torch.bfloat16, device: Optional[str] = None,
                        model_configs: Sequence[ModelConfig] = (), tokenizer_config: Optional[ModelConfig] = None,
                        vram_limit: Optional[float] = None, models_dir=None, compile=False,
                        attention_backend: str = "auto", fp8_compute: bool = False) -> "Flux3ImagePipeline":
        """Load the FLUX 3 components named by ``model_configs`` (which one each file is comes from its contents:
        ``engine.flux3.loading``). ``tokenizer_config`` defaults to the text encoder's own folder when it holds the
        tokenizer (the official layout), else a ``tokenizer/`` folder beside it. Memory and speed settings as
        ``Flux2ImagePipeline.from_pretrained``'s."""
        pipe = Flux3ImagePipeline(device=device, torch_dtype=torch_dtype)
        pipe.vram_limit = vram_limit
        modules, vram_fields = {}, {}
        for config in model_configs:
            files = config.resolve(models_dir)
            loaded = load_models(files, torch_dtype=config.computation_dtype or torch_dtype, device="cpu")
            for role, module in loaded.items():
                if role in modules:
                    raise EngineError(f"Two model files both hold the FLUX 3 {role}: "
                                      f"{getattr(modules[role], 'flux_studio_files', '?')} and "
                                      f"{[str(f) for f in files]}. Pass only one.")
                modules[role] = module
                vram_fields[role] = config.vram_fields()
        if "text_encoder" in modules:
            pipe.tokenizer = load_tokenizer(tokenizer_folder(modules["text_encoder"], tokenizer_config, models_dir))
        pipe.set_models(modules, vram_fields)
        pipe.set_acceleration(compile=compile, attention_backend=attention_backend, fp8_compute=fp8_compute)
        return pipe

    @property
    def is_distilled(self) -> bool:
        """The step-distilled model (a flow map with ``ref_time_in``); the base model is not."""
        return bool(self.dit is not None and self.dit.config.get("flow_map", False))

    # ---------------------------------------------------------------------------------------- encoding
    @property
    def prompt_encoder(self) -> Flux3PromptEncoder:
        if self._prompt_encoder is None:
            if self.text_encoder is None or self.tokenizer is None:
                raise EngineError("No FLUX 3 text encoder is loaded: add the ModelConfig of text_encoder/*.safetensors "
                                  "(Qwen3-VL-4B-Instruct) and tokenizer_config for its tokenizer.")
            self._prompt_encoder = Flux3PromptEncoder(self.tokenizer, self.text_encoder, self.text_layers)
        return self._prompt_encoder

    def encode_prompt(self, prompt: str, max_sequence_length=None, schedule: str = "seed") -> torch.Tensor:
        """(1, L, 8 x hidden) in the transformer's dtype on the device, L a multiple of 80. Cached across jobs in
        ``prompt_cache`` (``engine.acceleration.prompt_cache``)."""
        enc = self.prompt_encoder
        key = ("flux3", prompt, max_sequence_length, schedule, enc.layers, encoder_identity(enc.text_encoder),
               getattr(self.tokenizer, "name_or_path", id(self.tokenizer)))
        emb = cached(self.prompt_cache, key, lambda: enc.encode(
            prompt, max_sequence_length, schedule, run_model=lambda m, fn: self.run_model("text_encoder", m, fn)))
        return emb.to(device=self.device, dtype=self.dit_dtype)

    def encode_references(self, edit_image, auto_resize: bool = True):
        """The references' tokens (1, N, 128) float32 and position ids (N, 4), or (None, None) for none."""
        images = refs.as_list(edit_image)
        if not images:
            return None, None
        grids = [self.encode_pixels(x).to(self.device) for x in refs.pixels(images, auto_resize)]
        return refs.layout(grids, self.device)

    # --------------------------------------------------------------------------------------- sampling
    def velocity(self, tokens, sigma, next_sigma, text, text_ids, img_ids, references=None, reference_ids=None,
                 schedule: str = "seed") -> torch.Tensor:
        """The transformer's velocity for ``tokens`` (float32 out); ``next_sigma`` reaches a flow-map model only."""
        dtype, n = self.dit_dtype, tokens.shape[0]
        t = sch.model_timestep(sigma, dtype, schedule).to(self.device).expand(n)
        extra = {}
        if self.is_distilled:
            extra["target_timestep"] = sch.model_timestep(next_sigma, dtype, schedule).to(self.device).expand(n)
        if references is not None:
            extra.update(image_cond_hidden_states=references.to(device=self.device, dtype=dtype),
                         image_cond_ids=reference_ids)
        out = self.run_model("dit", self.dit, lambda m: m(
            hidden_states=tokens.to(device=self.device, dtype=dtype), encoder_hidden_states=text, timestep=t,
            img_ids=img_ids, txt_ids=text_ids, return_dict=False, **extra)[0])
        return out.float()

    def _start(self, height, width, seed, rand_device, initial_noise, schedule) -> torch.Tensor:
        """The starting noise as (1, tokens, 128) float32 on the device."""
        rows, cols = height // sch.CELL, width // sch.CELL
        if initial_noise is None:
            noise = sch.initial_noise(height, width, seed, rand_device, self.torch_dtype, schedule)
        elif tuple(initial_noise.shape) == (1, sch.CHANNELS, rows, cols):
            noise = sch.to_tokens(initial_noise)
        elif tuple(initial_noise.shape) == (1, rows * cols, sch.CHANNELS):
            noise = initial_noise
        else:
            raise EngineError(f"initial_noise has shape {list(initial_noise.shape)}; a {width}x{height} image needs "
                              f"[1, {rows * cols}, {sch.CHANNELS}] (tokens) or [1, {sch.CHANNELS}, {rows}, {cols}].")
        return noise.to(self.device).float()

    def _check_call(self, cfg_scale, schedule) -> None:
        if self.dit is None:
            raise EngineError("No FLUX 3 transformer is loaded: add the ModelConfig of model.safetensors "
                              "(or transformer/*.safetensors).")
        sch.check_schedule(schedule)
        if self.is_distilled and cfg_scale != 1.0:
            raise EngineError(f"The step-distilled FLUX 3 Image Klein samples without CFG: cfg_scale must be 1 (got "
                              f"{cfg_scale}). Use flux-3-image-klein-base for CFG and negative prompts.")

    @torch.no_grad()
    def __call__(self, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                 input_image: Optional[Image.Image] = None, denoising_strength: float = 1.0, edit_image=None,
                 edit_image_auto_resize: bool = True, height: int = 1024, width: int = 1024,
                 seed: Optional[int] = None, rand_device: str = "cpu", initial_noise: Optional[torch.Tensor] = None,
                 num_inference_steps: int = sch.STEPS, alpha: float = sch.ALPHA, progress_bar_cmd=tqdm,
                 schedule: str = "seed", max_sequence_length: Optional[int] = None,
                 step_callback: Optional[Callable[[int, int], None]] = None,
                 preview_callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
                 step_cache: Optional[float] = None) -> Image.Image:
        """Text to image; image to image with ``input_image`` and ``denoising_strength``; editing with
        ``edit_image`` (one PIL image or a list of up to 10 references, see ``engine.flux3.references``).

        ``cfg_scale``: 1 for the distilled model (required); the base model takes true CFG with ``negative_prompt``
        (diffusers' default is 3.5, 50 steps). ``alpha``: the schedule's shift (6.93). ``schedule``: "seed" or
        "diffusers" conventions. ``initial_noise``: (1, tokens, 128) or (1, 128, H/16, W/16) replaces the seeded
        noise. ``max_sequence_length``: the prompt's token cap (None: 4096 seed, 8192 diffusers).
        ``step_callback(done, total)`` after every step; ``preview_callback(done, total, x0)`` after every step but the
        last with the estimate of the clean latent grid (1, 128, H/16, W/16) float32."""
        self._check_call(cfg_scale, schedule)
        height, width = (-(-int(height) // sch.CELL) * sch.CELL, -(-int(width) // sch.CELL) * sch.CELL)
        strength = float(denoising_strength) if input_image is not None else 1.0
        sigmas = sch.flux3_sigmas(num_inference_steps, strength, alpha, schedule)
        tokens = self._start(height, width, seed, rand_device, initial_noise, schedule)
        if input_image is not None:
            clean = sch.to_tokens(self.encode_image(fit(input_image, width, height)).to(self.device))
            tokens = (1 - sigmas[0]) * clean + sigmas[0] * tokens
        references, reference_ids = self.encode_references(edit_image, edit_image_auto_resize)
        use_cfg = cfg_scale != 1.0
        text = self.encode_prompt(prompt, max_sequence_length, schedule)
        negative = self.encode_prompt(negative_prompt or "", max_sequence_length, schedule) if use_cfg else None
        img_ids = sch.image_ids(height // sch.CELL, width // sch.CELL, device=self.device)
        steps = len(sigmas) - 1
        with self.acceleration.running(self.dit, self.placements.get("dit"), step_cache):
            for i in progress_bar_cmd(range(steps)):
                with self.acceleration.cfg_pass(False):
                    v = self.velocity(tokens, sigmas[i], sigmas[i + 1], text, sch.text_ids(text.shape[1], self.device),
                                      img_ids, references, reference_ids, schedule)
                if use_cfg:
                    with self.acceleration.cfg_pass(True):
                        v_neg = self.velocity(tokens, sigmas[i], sigmas[i + 1], negative,
                                              sch.text_ids(negative.shape[1], self.device), img_ids, references,
                                              reference_ids, schedule)
                    v = v_neg + cfg_scale * (v - v_neg)
                x0 = None if preview_callback is None else tokens - float(sigmas[i]) * v
                tokens = tokens + v * float(sigmas[i + 1] - sigmas[i])
                if step_callback is not None:
                    step_callback(i + 1, steps)
                if preview_callback is not None and i + 1 < steps:
                    preview_callback(i + 1, steps, sch.from_tokens(x0, height, width))
        return self.decode_latents(sch.from_tokens(tokens, height, width))


def sequence_tokens(width: int, height: int, edit_image=None, edit_image_auto_resize: bool = True,
                    prompt_tokens: int = 320) -> int:
    """Tokens the transformer sees beside the output's: the prompt's window (an estimate: 4 windows of 80) and every
    reference's, as ``encode_references`` sizes them (the memory plan's ``plan_text_tokens``)."""
    tokens = int(prompt_tokens)
    for w, h in refs.sizes(edit_image, edit_image_auto_resize):
        tokens += (h // sch.CELL) * (w // sch.CELL)
    return tokens


def tokenizer_folder(text_encoder, config: Optional[ModelConfig], models_dir=None) -> pathlib.Path:
    """The tokenizer's folder: ``config``'s, else the text encoder's own folder (klein ships the processor in
    ``text_encoder/``), else a ``tokenizer/`` folder beside it, else klein's ``text_encoder/`` (downloaded)."""
    if config is not None:
        return config.resolve(models_dir)[0]
    files = getattr(text_encoder, "flux_studio_files", [])
    if files:
        own = pathlib.Path(files[0]).parent
        for folder in (own, own.parent / "tokenizer"):
            if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
                return folder
    return ModelConfig(model_id=FLUX3_KLEIN, origin_file_pattern="text_encoder/").resolve(models_dir)[0]
