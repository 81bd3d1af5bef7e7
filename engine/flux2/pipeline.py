"""``Flux2ImagePipeline``: the seed-compatible FLUX.2 pipeline ([klein] 4B / 9B and their base models, [dev]).

DiffSynth-Studio's FLUX.2 scripts port by changing the import::

    from engine import Flux2ImagePipeline, ModelConfig
    pipe = Flux2ImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="text_encoder/*.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="transformer/*.safetensors"),
        ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ], tokenizer_config=ModelConfig(model_id="black-forest-labs/FLUX.2-klein-4B", origin_file_pattern="tokenizer/"))
    image = pipe(prompt, seed=0, num_inference_steps=4)

The flow: noise (or the noised input image's tokens) -> the prompt (and, with ``cfg_scale != 1``, the negative
prompt) through the text encoder -> Euler steps of the transformer's velocity -> the VAE's ``bn`` statistics undone,
unpatchified, decoded -> PIL image. Schedules, noise and the token layout are in ``engine.flux2.schedule``; the
files in ``engine.flux2.loading``. Reused from the FLUX.1 engine: ``ModelConfig`` (files, downloads), safe file
reading and module assembly, the image <-> tensor conversions.

Tokens are held in float32 between steps (the seed and diffusers keep them in the compute dtype); the transformer
computes in the pipeline's dtype. Inpainting (``inpaint_mask`` with ``input_image``) is DiffSynth-Studio's masked
step, in ``engine.flux2.inpaint``. ``preview_callback(done, total, x0)`` gets the current estimate of the clean latent
grid after every step but the last (``engine.preview`` turns it into a picture; ``preview_codec`` says how).

Multi-reference editing (``edit_image=[PIL, ...]``), as DiffSynth-Studio's ``Flux2Unit_EditImageEmbedder`` and
diffusers' ``Flux2KleinPipeline(image=[...])`` do it: each reference is (with ``edit_image_auto_resize``, the seed's
default) resized to about 1024x1024 in its own aspect (sides multiples of 32, bilinear, centre crop), VAE-encoded
like an input image, and its tokens are appended after the output's with position ids ``(t, row, col, 0)``,
``t = 10, 20, 30, ...`` for reference 1, 2, 3, ... (the output's t is 0). The transformer sees them at every step;
only the output's tokens are stepped and decoded. The schedule's shift counts the output's tokens only.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from ..acceleration.prompt_cache import cached, encoder_identity
from ..errors import EngineError
from ..model_config import ModelConfig
from ..lora.pipeline_methods import RuntimeLoraMethods
from ..placed import PlacedPipeline
from ..roles import FLUX2_ROLE_NAMES
from . import schedule as sch
from .inpaint import InpaintBlend
from .loading import load_flux2_models
from .text import MAX_LENGTH, Flux2PromptEncoder, load_tokenizer
from .vae import Flux2VaeMethods

FLUX2_DEV = "black-forest-labs/FLUX.2-dev"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Flux2ImagePipeline(Flux2VaeMethods, RuntimeLoraMethods, PlacedPipeline):
    ROLE_NAMES = FLUX2_ROLE_NAMES
    PLAN_LABELS = "flux2"
    WHOSE = "FLUX.2 "

    def __init__(self, device: Optional[str] = None, torch_dtype=torch.bfloat16):
        self.device = torch.device(device or default_device())
        self.torch_dtype = torch_dtype
        self.init_placement()             # the component slots, their memory plan and speed settings (engine.placed)
        self.tokenizer = None

    # ----------------------------------------------------------------------------------------- loading
    @staticmethod
    def from_pretrained(torch_dtype=torch.bfloat16, device: Optional[str] = None,
                        model_configs: Sequence[ModelConfig] = (), tokenizer_config: Optional[ModelConfig] = None,
                        vram_limit: Optional[float] = None, models_dir=None, compile=False,
                        attention_backend: str = "auto", fp8_compute: bool = False) -> "Flux2ImagePipeline":
        """Load the FLUX.2 components named by ``model_configs`` (which one each file is comes from its contents).

        ``tokenizer_config`` defaults to the ``tokenizer/`` folder beside the text encoder's ``text_encoder/``
        (the official repositories' layout), else the seed's default, FLUX.2-dev's.

        Memory as ``FluxImagePipeline``'s: ``vram_limit`` (GB) has ``engine.memory`` plan every component (resident,
        offloaded, fp8, or streamed block by block: the transformer's blocks, the text encoder's decoder layers) so
        that the predicted peak fits; a config's VRAM fields (``offload_dtype``/``offload_device``/... as
        DiffSynth-Studio defines them) pin that component's placement. ``pipe.plan`` says what was chosen.
        ``compile`` / ``attention_backend`` / ``fp8_compute``: the speed settings, as FLUX.1's
        (``set_acceleration``)."""
        pipe = Flux2ImagePipeline(device=device, torch_dtype=torch_dtype)
        pipe.vram_limit = vram_limit
        modules, vram_fields = {}, {}
        for config in model_configs:
            files = config.resolve(models_dir)
            for role, module in load_flux2_models(files, torch_dtype=config.computation_dtype or torch_dtype).items():
                if role in modules:
                    raise EngineError(f"Two model files both hold the FLUX.2 {role}: {modules[role].flux_studio_files} "
                                      f"and {[str(f) for f in files]}. Pass only one.")
                modules[role] = module
                vram_fields[role] = config.vram_fields()
        if "text_encoder" in modules:
            folder = tokenizer_folder(modules["text_encoder"], tokenizer_config, models_dir)
            pipe.tokenizer = load_tokenizer(folder)
        pipe.set_models(modules, vram_fields)
        pipe.set_acceleration(compile=compile, attention_backend=attention_backend, fp8_compute=fp8_compute)
        return pipe

    @property
    def offloaded(self) -> set:
        """The roles that rest off the device and are moved in for their stage."""
        return {r for r, p in self.placements.items() if p.offloaded}

    @property
    def text_encoder_qwen3(self):
        """The seed's name for klein's Qwen3 encoder (its ``text_encoder`` is [dev]'s Mistral); one slot here."""
        te = self.text_encoder
        return te if te is not None and getattr(te, "flux_studio_text_kind", "qwen3") == "qwen3" else None

    # ---------------------------------------------------------------------------------------- encoding
    @property
    def prompt_encoder(self) -> Flux2PromptEncoder:
        if self._prompt_encoder is None:
            if self.text_encoder is None or self.tokenizer is None:
                raise EngineError("No FLUX.2 text encoder is loaded: add the ModelConfig of text_encoder/*.safetensors "
                                  "(and tokenizer_config for its tokenizer/ folder).")
            kind = getattr(self.text_encoder, "flux_studio_text_kind", "qwen3")
            self._prompt_encoder = Flux2PromptEncoder(self.tokenizer, self.text_encoder, kind)
        return self._prompt_encoder

    def encode_prompt(self, prompt: str, max_sequence_length: int = MAX_LENGTH) -> torch.Tensor:
        """(1, L, context width) in the transformer's dtype on the device. Cached across jobs in ``prompt_cache``
        by prompt, length, the encoder's files and dtype and the tokenizer (``engine.acceleration.prompt_cache``)."""
        key = (prompt, int(max_sequence_length), encoder_identity(self.prompt_encoder.text_encoder),
               getattr(self.tokenizer, "name_or_path", id(self.tokenizer)))
        emb = cached(self.prompt_cache, key, lambda: self.prompt_encoder.encode(
            prompt, max_sequence_length, run_model=lambda m, fn: self.run_model("text_encoder", m, fn)))
        return emb.to(device=self.device, dtype=self.dit_dtype)

    # --------------------------------------------------------------------------------------- sampling
    def encode_references(self, images, auto_resize: bool = True):
        """The reference images' tokens (1, N, 128) and position ids (N, 4), in order: reference k (from 0) at
        t = 10 * (k + 1)."""
        if isinstance(images, Image.Image):
            images = [images]
        tokens, ids = [], []
        for k, image in enumerate(images):
            image = reference_size(image, auto_resize)
            tokens.append(sch.to_tokens(self.encode_image(image).to(self.device)))
            ids.append(sch.image_ids(image.height, image.width, t=sch.REFERENCE_T * (k + 1), device=self.device))
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)

    def velocity(self, tokens: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, text_ids, img_ids,
                 guidance, references: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The transformer's velocity for ``tokens`` (the references' tokens, when given, join the sequence after
        them and ``img_ids`` covers both; their outputs are dropped)."""
        dtype = self.dit_dtype
        t = sch.model_timestep(sigma, dtype).to(self.device).expand(tokens.shape[0])
        hidden = tokens if references is None else torch.cat([tokens, references.to(tokens.device)], dim=1)
        out = self.run_model("dit", self.dit, lambda m: m(
            hidden_states=hidden.to(device=self.device, dtype=dtype), encoder_hidden_states=text, timestep=t,
            img_ids=img_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0])
        return out.float()[:, :tokens.shape[1]]

    @torch.no_grad()
    def __call__(self, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                 embedded_guidance: float = 4.0, input_image: Optional[Image.Image] = None,
                 denoising_strength: float = 1.0, edit_image=None, edit_image_auto_resize: bool = True,
                 height: int = 1024, width: int = 1024, seed: Optional[int] = None, rand_device: str = "cpu",
                 initial_noise: Optional[torch.Tensor] = None, num_inference_steps: int = 30,
                 inpaint_mask=None, inpaint_blur_size=None, inpaint_blur_sigma=None, progress_bar_cmd=tqdm,
                 schedule: str = "seed", max_sequence_length: int = MAX_LENGTH,
                 step_callback: Optional[Callable[[int, int], None]] = None,
                 preview_callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
                 step_cache: Optional[float] = None) -> Image.Image:
        """Text to image, or image to image with ``input_image`` and ``denoising_strength``; ``edit_image`` (one PIL
        image or a list) adds reference images the model sees whole (multi-reference editing, see the module's doc;
        ``edit_image_auto_resize=False`` keeps each reference's size, centre-cropped to multiples of 16).

        ``schedule``: "seed" (DiffSynth-Studio's FLUX.2 schedule, default) or "diffusers" (``Flux2KleinPipeline``'s).
        ``initial_noise``: (1, 128, H/16, W/16) replaces the seeded noise. ``embedded_guidance`` counts only for a
        transformer with a guidance embedder ([dev]); klein's distilled models want ``cfg_scale=1`` and 4 steps,
        the base models ``cfg_scale=4`` and 50.

        ``inpaint_mask`` (a PIL image, white = repaint; needs ``input_image``) repaints that part and keeps the rest
        on the input's path (``engine.flux2.inpaint``); ``inpaint_blur_size`` / ``inpaint_blur_sigma`` soften it.
        ``preview_callback(done, total, x0)`` runs after every step but the last with the estimate of the clean
        latent grid, (1, 128, H/16, W/16) float32; it changes nothing in the result. ``step_cache``: this call's
        first-block cache threshold (0: off; None: the pipeline's setting), as FLUX.1's."""
        if self.dit is None:
            raise EngineError("No FLUX.2 transformer is loaded: add the ModelConfig of transformer/*.safetensors.")
        height, width = (-(-int(height) // sch.CELL) * sch.CELL, -(-int(width) // sch.CELL) * sch.CELL)
        seq_len = (height // sch.CELL) * (width // sch.CELL)
        strength = float(denoising_strength) if input_image is not None else 1.0
        sigmas = sch.flux2_sigmas(num_inference_steps, strength, seq_len, schedule)
        if initial_noise is not None:
            noise = initial_noise.clone()
            if tuple(noise.shape) != (1, sch.CHANNELS, height // sch.CELL, width // sch.CELL):
                raise EngineError(f"initial_noise has shape {list(noise.shape)}; a {width}x{height} image needs "
                                  f"[1, {sch.CHANNELS}, {height // sch.CELL}, {width // sch.CELL}].")
        else:
            noise = sch.initial_noise(height, width, seed, rand_device, self.torch_dtype)
        tokens = sch.to_tokens(noise.to(self.device).float())
        clean = None
        if input_image is not None:
            clean = sch.to_tokens(self.encode_image(fit(input_image, width, height)).to(self.device))
            tokens = (1 - sigmas[0]) * clean + sigmas[0] * tokens
        blend = None if inpaint_mask is None else InpaintBlend.prepare(
            inpaint_mask, clean, height, width, inpaint_blur_size, inpaint_blur_sigma)
        use_cfg = cfg_scale != 1.0
        text = self.encode_prompt(prompt, max_sequence_length)
        negative = self.encode_prompt(negative_prompt, max_sequence_length) if use_cfg else None
        text_ids = sch.text_ids(text.shape[1], self.device)
        img_ids = sch.image_ids(height, width, device=self.device)
        references = None
        if edit_image is not None and not (isinstance(edit_image, (list, tuple)) and not edit_image):
            references, ref_ids = self.encode_references(edit_image, edit_image_auto_resize)
            img_ids = torch.cat([img_ids, ref_ids], dim=0)
        guidance = (torch.full((1,), float(embedded_guidance), device=self.device, dtype=torch.float32)
                    if self.dit.config.guidance_embeds else None)
        steps = len(sigmas) - 1
        with self.acceleration.running(self.dit, self.placements.get("dit"), step_cache):
            for i in progress_bar_cmd(range(steps)):
                with self.acceleration.cfg_pass(False):      # the step cache keeps CFG's passes apart
                    v = self.velocity(tokens, sigmas[i], text, text_ids, img_ids, guidance, references)
                if use_cfg:
                    with self.acceleration.cfg_pass(True):
                        v_neg = self.velocity(tokens, sigmas[i], negative,
                                              sch.text_ids(negative.shape[1], self.device), img_ids, guidance,
                                              references)
                    v = v_neg + cfg_scale * (v - v_neg)
                if blend is not None:
                    v = blend.velocity(v, tokens, sigmas[i])
                x0 = None if preview_callback is None else tokens - float(sigmas[i]) * v   # where the step points
                tokens = tokens + v * float(sigmas[i + 1] - sigmas[i])
                if step_callback is not None:
                    step_callback(i + 1, steps)
                if preview_callback is not None and i + 1 < steps:
                    preview_callback(i + 1, steps, sch.from_tokens(x0, height, width))
        return self.decode_latents(sch.from_tokens(tokens, height, width))


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """RGB at the output size (Lanczos), as the FLUX.1 pipeline does."""
    image = image.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def sequence_tokens(width: int, height: int, edit_image=None, edit_image_auto_resize: bool = True,
                    max_sequence_length: int = MAX_LENGTH) -> int:
    """Tokens the transformer sees beside the output's for a call: the prompt's and every reference image's (sized
    as ``encode_references`` sizes them): what a pipeline's ``plan_text_tokens`` must make room for (the memory
    plan's activation estimate)."""
    if edit_image is None:
        images = []
    else:
        images = [edit_image] if isinstance(edit_image, Image.Image) else list(edit_image)
    tokens = int(max_sequence_length)
    for image in images:
        w, h = reference_size(image, edit_image_auto_resize).size
        tokens += (h // sch.CELL) * (w // sch.CELL)
    return tokens


def reference_size(image: Image.Image, auto_resize: bool = True) -> Image.Image:
    """A reference image as the model gets it (RGB). ``auto_resize`` (DiffSynth-Studio's
    ``edit_image_auto_resize``): about 1024x1024 pixels in the image's aspect, sides rounded to multiples of 32, scaled
    to cover (bilinear) and centre-cropped. Without it the image keeps its size, centre-cropped (resized to cover)
    to multiples of 16 when its sides are not already (diffusers' ``Flux2KleinPipeline`` floors them the same way)."""
    image = image.convert("RGB")
    w, h = image.size
    if auto_resize:
        ratio = w / h
        tw = (1024 * 1024 * ratio) ** 0.5
        th = tw / ratio
        tw, th = max(32, round(tw / 32) * 32), max(32, round(th / 32) * 32)
        return crop_resize(image, tw, th, Image.BILINEAR)
    tw, th = w // sch.CELL * sch.CELL, h // sch.CELL * sch.CELL
    if tw < sch.CELL or th < sch.CELL:
        raise EngineError(f"A reference image of {w}x{h} is too small: FLUX.2 needs at least {sch.CELL}x{sch.CELL}.")
    return image if (tw, th) == (w, h) else crop_resize(image, tw, th, Image.LANCZOS)


def crop_resize(image: Image.Image, width: int, height: int, resample) -> Image.Image:
    """Scaled to cover ``width`` x ``height`` then centre-cropped to it (torchvision's resize + center_crop)."""
    w, h = image.size
    scale = max(width / w, height / h)
    size = (round(w * scale), round(h * scale))
    if size != (w, h):
        image = image.resize(size, resample)
    left, top = int(round((size[0] - width) / 2.0)), int(round((size[1] - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


def tokenizer_folder(text_encoder, config: Optional[ModelConfig], models_dir=None) -> pathlib.Path:
    if config is not None:
        return config.resolve(models_dir)[0]
    files = getattr(text_encoder, "flux_studio_files", [])
    if files:
        beside = pathlib.Path(files[0]).parent.parent / "tokenizer"
        if beside.is_dir():
            return beside
    return ModelConfig(model_id=FLUX2_DEV, origin_file_pattern="tokenizer/").resolve(models_dir)[0]
