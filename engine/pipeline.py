"""``FluxImagePipeline``: the seed-compatible pipeline, one denoising loop for every FLUX.1 variant.

Scripts written for DiffSynth-Studio port by changing the import::

    from engine import FluxImagePipeline, ModelConfig
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=[...])
    image = pipe(prompt="...", seed=0)

The flow: initial latents (noise, or noised input image) -> the conditions the call asks for, prepared
(``engine.conditions``) -> prompt encodings (unless a condition makes the text) -> Euler steps of the transformer's
velocity (two passes with true CFG), each step asking the conditions' hooks -> VAE decode -> PIL image.
"""
from __future__ import annotations

import inspect
import random
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from . import latents as lat
from .conditions import (ConditionContext, StepState, Text, build_conditions, check_arguments, merge_attention_kwargs,
                         merge_dit_kwargs)
from .controlnet.inputs import ControlNetInput  # noqa: F401 - the seed imports it from the pipeline module
from .errors import EngineError
from .infiniteyou.face import InsightFaceEmbedder
from .model_config import ModelConfig
from .lora.pipeline_methods import RuntimeLoraMethods
from .placed import PlacedPipeline
from .roles import ROLE_NAMES
from .scheduler import add_noise, euler_step, flux_sigmas
from .sizes import normalize_size
from .text_encoding import PromptEncoder, load_tokenizer

FLUX_DEV = "black-forest-labs/FLUX.1-dev"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def denoise_step(dit, latents_packed, timestep, guidance, pooled, text_embeds, text_ids, image_ids, **extra):
    """One velocity prediction of the FLUX transformer (diffusers' ``FluxTransformer2DModel``).

    ``timestep`` is sigma in [0, 1] (the model scales it by 1000 itself), ``guidance`` the embedded guidance
    (None for models without a guidance embedder). Extra inputs from conditions pass through ``extra``.
    """
    return dit(hidden_states=latents_packed, encoder_hidden_states=text_embeds, pooled_projections=pooled,
               timestep=timestep, img_ids=image_ids, txt_ids=text_ids, guidance=guidance,
               return_dict=False, **extra)[0]


class FluxImagePipeline(RuntimeLoraMethods, PlacedPipeline):
    ROLE_NAMES = ROLE_NAMES
    lora_patcher = None      # DiffSynth's LoRA Fusion gates (engine.lora.fusion), when model_configs name the file

    def __init__(self, device: Optional[str] = None, torch_dtype=torch.bfloat16):
        self.device = torch.device(device or default_device())
        self.torch_dtype = torch_dtype
        # One slot per role of engine.roles (dit, vae, text encoders, Step1X's, Redux's, ...). The ControlNets are one
        # component, an engine.controlnet.MultiControlNet holding every ControlNet in file order.
        self.init_placement()             # the component slots, their memory plan and speed settings (engine.placed)
        self.tokenizer_1 = self.tokenizer_2 = None
        # InfiniteYou's identity photo -> 512-d face embedding; replaceable (engine.infiniteyou.face)
        self.infinityou_face_embedder = InsightFaceEmbedder()

    # ----------------------------------------------------------------------------------------- loading
    @staticmethod
    def from_pretrained(torch_dtype=torch.bfloat16, device: Optional[str] = None,
                        model_configs: Sequence[ModelConfig] = (),
                        tokenizer_1_config: Optional[ModelConfig] = None,
                        tokenizer_2_config: Optional[ModelConfig] = None,
                        vram_limit: Optional[float] = None, models_dir=None, compile=False,
                        attention_backend: str = "auto", fp8_compute: bool = False,
                        nexus_gen_processor_config: Optional[ModelConfig] = None) -> "FluxImagePipeline":
        """Load the models named by ``model_configs``; which component each file is comes from its contents.
        ControlNet files (any number) become one ``controlnet`` component; their order gives ``controlnet_id``.
        ``nexus_gen_processor_config``: Nexus-GenV2's processor folder (default: ``processor/`` beside its weights).
        ``compile`` / ``attention_backend`` / ``fp8_compute``: the speed settings (``set_acceleration``)."""
        from .controlnet import MultiControlNet, check_compatible
        from .step1x.load import load_components as load_models   # the FLUX roles plus Step1X-Edit's and ControlNets
        from .loading.lora_fusion import is_lora_fusion, load_lora_fusion
        pipe = FluxImagePipeline(device=device, torch_dtype=torch_dtype)
        pipe.vram_limit = vram_limit
        modules, vram_fields, controlnets = {}, {}, []
        for config in model_configs:
            files = config.resolve(models_dir)
            if is_lora_fusion(files):     # the LoRA Fusion gates: not a placed component, used by enable_lora_merger
                pipe.lora_patcher = load_lora_fusion(files, torch_dtype=config.computation_dtype or torch_dtype)
                continue
            loaded = load_models(files, torch_dtype=config.computation_dtype or torch_dtype, device="cpu")
            for role, module in loaded.items():
                if role == "controlnet":
                    controlnets.append(module)
                    if config.vram_fields() and "controlnet" not in vram_fields:   # one placement for all of them
                        vram_fields["controlnet"] = config.vram_fields()
                    continue
                if role in modules:
                    raise EngineError(f"Two model files both hold the {role}: "
                                      f"{getattr(modules[role], 'flux_studio_files', '?')} and {files}. Pass only one.")
                modules[role] = module
                vram_fields[role] = config.vram_fields()
        if nexus_gen_processor_config is not None and "nexus_gen" in modules:
            from .nexus_gen.load import attach_processor, folder_config
            attach_processor(modules["nexus_gen"], folder_config(nexus_gen_processor_config).resolve(models_dir)[0])
        if controlnets:
            modules["controlnet"] = MultiControlNet(controlnets)
            check_compatible(modules["controlnet"], modules.get("dit"))
        tok1 = tokenizer_1_config or ModelConfig(model_id=FLUX_DEV, origin_file_pattern="tokenizer/")
        tok2 = tokenizer_2_config or ModelConfig(model_id=FLUX_DEV, origin_file_pattern="tokenizer_2/")
        if "text_encoder_1" in modules:
            pipe.tokenizer_1 = load_tokenizer(tok1.resolve(models_dir)[0], "CLIP")
        if "text_encoder_2" in modules:
            pipe.tokenizer_2 = load_tokenizer(tok2.resolve(models_dir)[0], "T5")
        pipe.set_models(modules, vram_fields)
        pipe.set_acceleration(compile=compile, attention_backend=attention_backend, fp8_compute=fp8_compute)
        return pipe

    # ------------------------------------------------------------------------------------------ LoRAs
    # load_lora / clear_lora: engine.lora.pipeline_methods (any FLUX.1 format; LoRA Fusion's gates wrap them)
    def enable_lora_merger(self, enable: bool = True) -> None:
        """The seed's ``pipe.enable_lora_merger()``: LoRAs (loaded before or after) are merged per layer by the LoRA
        Fusion gates (``engine.lora.fusion``) instead of added; ``enable=False`` adds them again."""
        from .lora.fusion import disable_lora_fusion, enable_lora_fusion
        if not enable:
            return disable_lora_fusion(self.dit)
        if self.lora_patcher is None:
            raise EngineError("enable_lora_merger needs the LoRA Fusion model: add ModelConfig(model_id="
                              "'DiffSynth-Studio/LoRAFusion-preview-FLUX.1-dev', origin_file_pattern='model.safetensors')"
                              " to model_configs.")
        if self.dit is None:
            raise EngineError("enable_lora_merger needs a FLUX transformer (pipe.dit); none is loaded.")
        enable_lora_fusion(self.dit, self.lora_patcher)

    # ---------------------------------------------------------------------------------------- encoding
    @property
    def prompt_encoder(self) -> PromptEncoder:
        if self._prompt_encoder is None:
            for role in ("text_encoder_1", "text_encoder_2", "tokenizer_1", "tokenizer_2"):
                if getattr(self, role) is None:
                    raise EngineError(f"No {role.replace('_', ' ')} is loaded: add its ModelConfig (CLIP-L "
                                      f"text_encoder/model.safetensors and T5 text_encoder_2/*.safetensors).")
            self._prompt_encoder = PromptEncoder(self.tokenizer_1, self.tokenizer_2, self.text_encoder_1,
                                                 self.text_encoder_2, cache=self.prompt_cache)
        return self._prompt_encoder

    def encode_prompt(self, prompt: str, t5_sequence_length: int = 512):
        emb, pooled = self.prompt_encoder.encode(prompt, t5_sequence_length, device=self.device, run_model=self.run_model)
        dtype = self.placements["dit"].compute_dtype if "dit" in self.placements else self.torch_dtype
        return emb.to(dtype), pooled.to(dtype)

    def encode_text(self, prompt: str, t5_sequence_length: int = 512) -> Text:
        """The prompt as the transformer reads it: T5 tokens, CLIP's pooled vector and the tokens' (zero) ids."""
        emb, pooled = self.encode_prompt(prompt, t5_sequence_length)
        return Text(emb, pooled, lat.text_ids(emb.shape[1], device=self.placements["dit"].compute_device))

    def _vae_codec(self):
        if self.vae is None:
            raise EngineError("No VAE is loaded: add the ModelConfig of ae.safetensors (or the vae/ folder).")
        return lat.VaeCodec(self.vae)

    def encode_image(self, image: Image.Image, tiled=False, tile_size=128, tile_stride=64) -> torch.Tensor:
        codec, place = self._vae_codec(), self.placements["vae"]
        x = lat.image_to_tensor(image)
        return self.run_model("vae", self.vae, lambda m: codec.encode(
            x, place.compute_device, place.compute_dtype, tiled, tile_size, tile_stride))

    def decode_latents(self, latents: torch.Tensor, tiled=False, tile_size=128, tile_stride=64) -> Image.Image:
        codec, place = self._vae_codec(), self.placements["vae"]
        pixels = self.run_model("vae", self.vae, lambda m: codec.decode(
            latents, place.compute_device, place.compute_dtype, tiled, tile_size, tile_stride))
        return lat.tensor_to_image(pixels)

    # --------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(self, prompt: str = "", negative_prompt: str = "", cfg_scale: float = 1.0,
                 embedded_guidance: float = 3.5, t5_sequence_length: int = 512,
                 input_image: Optional[Image.Image] = None, denoising_strength: float = 1.0,
                 height: int = 1024, width: int = 1024, seed: Optional[int] = None, rand_device: str = "cpu",
                 sigma_shift: Optional[float] = None, num_inference_steps: int = 30,
                 tiled: bool = False, tile_size: int = 128, tile_stride: int = 64,
                 progress_bar_cmd=tqdm, schedule: str = "seed",
                 step_callback: Optional[Callable[[int, int], None]] = None,
                 preview_callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
                 step_cache: Optional[float] = None, tea_cache_l1_thresh: Optional[float] = None,
                 **inputs) -> Image.Image:
        """Generate one image. Parameters and defaults are the seed's; ``schedule="bfl"`` picks BFL's
        resolution-dependent shift, and ``step_callback(done, total)`` runs after every step (it may raise to
        cancel). ``preview_callback(done, total, x0)`` runs after every step but the last with the current estimate
        of the clean latents, (1, 16, H/8, W/8) float32 (``engine.preview`` turns it into a small image); it
        changes nothing in the result. ``step_cache``: this call's first-block cache threshold (0: off; None: the
        pipeline's setting, ``set_acceleration``); ``acceleration.last_call`` counts the passes it skipped.
        ``tea_cache_l1_thresh``: the seed's TeaCache instead (None: off; 0.2-0.6 usual), its skipped steps in
        ``acceleration.last_call`` too (``engine.acceleration.tea_cache``).

        ``**inputs`` are the condition inputs, with the seed's names and defaults, each read by a class of
        ``engine.conditions`` (``call_arguments()`` lists them all; an unknown name is an EngineError):
        ``controlnet_inputs`` (ControlNets), ``flux_fill_image`` / ``flux_fill_mask`` (FLUX.1-Fill),
        ``flex_inpaint_image`` / ``flex_inpaint_mask`` / ``flex_control_image`` / ``flex_control_strength`` /
        ``flex_control_stop`` (Flex.2), ``kontext_images`` (one image or a list: FLUX.1 Kontext's references; the
        output keeps the requested size), ``step1x_reference_image`` (Step1X-Edit), ``eligen_entity_prompts`` /
        ``eligen_entity_masks`` / ``eligen_enable_on_negative`` / ``eligen_enable_inpaint`` (EliGen),
        ``flux_redux_image`` / ``flux_redux_strength`` / ``flux_redux_keep_prompt`` (FLUX.1-Redux's image prompt),
        ``lora_encoder_inputs`` / ``lora_encoder_scale`` (DiffSynth-Studio's LoRA Encoder: a token per LoRA file or
        ModelConfig after the positive prompt)."""
        check_arguments(inputs, also=PIPELINE_ARGUMENTS)
        if self.dit is None:
            raise EngineError("No FLUX transformer is loaded: add the ModelConfig of flux1-dev.safetensors (or similar).")
        width, height, _ = normalize_size(width, height)
        if input_image is None:
            denoising_strength = 1.0
        seed = random.randrange(2 ** 31) if seed is None else int(seed)
        steps = int(num_inference_steps)
        sigmas = flux_sigmas(steps, denoising_strength, sigma_shift, schedule,
                             image_seq_len=(height // lat.TOKEN_FACTOR) * (width // lat.TOKEN_FACTOR))
        place = self.placements["dit"]
        device = place.compute_device

        def encode(image):
            return self.encode_image(image, tiled, tile_size, tile_stride).to(device)

        noise = lat.initial_noise(height, width, seed, rand_device).to(device)
        clean = None if input_image is None else encode(fit(input_image, width, height))
        latents = noise if clean is None else add_noise(clean, noise, float(sigmas[0]))
        ctx = ConditionContext(self, height, width, device, place.compute_dtype, sigmas, encode,
                               encode_prompt=lambda text: self.encode_text(text, t5_sequence_length),
                               t5_sequence_length=t5_sequence_length, cfg_scale=cfg_scale, prompt=prompt,
                               negative_prompt=negative_prompt, clean_latents=clean)
        denoiser = Denoiser(self, ctx, build_conditions(ctx, inputs), self.guidance(embedded_guidance))
        tokens = lat.pack(latents).float()
        with self.acceleration.running(self.dit, place, step_cache, tea_cache_l1_thresh, steps):
            for i in progress_bar_cmd(range(steps)):
                tokens = denoiser.step(tokens, i)
                if step_callback is not None:
                    step_callback(i + 1, steps)
                if preview_callback is not None and i + 1 < steps:
                    preview_callback(i + 1, steps, lat.unpack(denoiser.clean_estimate(), height, width))
        return self.decode_latents(lat.unpack(tokens, height, width), tiled, tile_size, tile_stride)

    def guidance(self, embedded_guidance: float) -> Optional[torch.Tensor]:
        """The embedded guidance value the transformer reads, (1,); None when it has no guidance embedder (schnell,
        Step1X-Edit)."""
        if not self.dit.config.guidance_embeds:
            return None
        return torch.full((1,), float(embedded_guidance), device=self.placements["dit"].compute_device,
                          dtype=torch.float32)


# The pipeline's own keyword arguments (everything else a call passes goes to the conditions).
PIPELINE_ARGUMENTS = tuple(name for name in inspect.signature(FluxImagePipeline.__call__).parameters
                           if name not in ("self", "inputs"))


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """RGB at the output size (Lanczos)."""
    image = image.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


class Denoiser:
    """One image's denoising loop. Every extra input is a prepared condition; the loop calls their hooks in order
    (``engine.conditions.base`` describes each) and knows none by name."""

    def __init__(self, pipe: FluxImagePipeline, ctx: ConditionContext, conditions: list,
                 guidance: Optional[torch.Tensor]):
        self.pipe, self.ctx, self.conditions, self.guidance = pipe, ctx, conditions, guidance
        self.use_cfg = ctx.cfg_scale != 1.0
        self.latent_ids = lat.image_ids(ctx.height, ctx.width, device=ctx.device)
        # Clean tokens appended after the generated image's (Kontext's references, Step1X's reference).
        self.appended = [t for t in (c.image_tokens() for c in conditions) if t is not None]
        self.image_ids = torch.cat([self.latent_ids] + [t.ids.to(self.latent_ids.dtype) for t in self.appended])
        self.base_text = self.encode_prompts()
        self.last_step = None         # (tokens, velocity, sigma) of the last step, for ``clean_estimate``

    def encode_prompts(self) -> dict:
        """{negative: CLIP + T5 text} for each pass; None when a condition makes the text itself."""
        if any(c.replaces_prompt for c in self.conditions):
            return {False: None, True: None}
        ctx = self.ctx
        return {False: ctx.encode_prompt(ctx.prompt),
                True: ctx.encode_prompt(ctx.negative_prompt) if self.use_cfg else None}

    def text(self, step: int, negative: bool) -> Text:
        """The text every model reads in this pass: the prompt's, then each condition's ``prompt_text``."""
        text = self.base_text[negative]
        for c in self.conditions:
            text = c.prompt_text(text, step, negative)
        if text is None:
            raise EngineError("No text for the transformer: a condition replaced the prompt but none made the text.")
        return text

    def hidden_states(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """The transformer's image sequence: each latent token with the conditions' features, then the appended
        clean tokens."""
        ctx = self.ctx
        features = [f.to(device=ctx.device, dtype=ctx.dtype) for f in (c.features(step) for c in self.conditions)
                    if f is not None]
        hidden = torch.cat([latents] + features, dim=-1) if features else latents
        if not self.appended:
            return hidden
        if any(t.tokens.shape[-1] != hidden.shape[-1] for t in self.appended):
            # Reference tokens carry latents only; a transformer that reads extra input channels (Fill, Flex.2)
            # would need them for the references too, which no such model was trained with.
            names = ", ".join(c.name for c in self.conditions)
            raise EngineError(f"These inputs cannot be combined ({names}): reference images (Kontext, Step1X-Edit) "
                              f"do not go with a transformer that reads {hidden.shape[-1]} features per token "
                              f"(FLUX.1-Fill, Flex.2). Use them with separate models.")
        return torch.cat([hidden] + [t.tokens.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
                                     for t in self.appended], dim=1)

    def transformer_kwargs(self, state: StepState) -> dict:
        """The conditions' extra transformer arguments, their attention entries in ``joint_attention_kwargs``."""
        kwargs = merge_dit_kwargs([c.dit_kwargs(state) for c in self.conditions])
        attention = merge_attention_kwargs([kwargs.pop("joint_attention_kwargs", None)] +
                                           [c.attention_kwargs(state) for c in self.conditions])
        if attention:
            kwargs["joint_attention_kwargs"] = attention
        return kwargs

    def velocity(self, tokens: torch.Tensor, step: int, negative: bool) -> torch.Tensor:
        """The transformer's velocity for the generated image's tokens in one pass."""
        ctx = self.ctx
        latents = tokens.to(ctx.dtype)
        t = ctx.sigmas[step].expand(tokens.shape[0]).to(device=ctx.device, dtype=ctx.dtype)
        state = StepState(step=step, negative=negative, latents=latents, latent_ids=self.latent_ids,
                          hidden_states=self.hidden_states(latents, step), image_ids=self.image_ids, timestep=t,
                          guidance=self.guidance, text=self.text(step, negative))
        kwargs = self.transformer_kwargs(state)
        text = state.text
        for c in self.conditions:
            text = c.transformer_text(text, negative)
        with self.pipe.acceleration.cfg_pass(negative):      # the step cache keeps CFG's passes apart
            v = self.pipe.run_model("dit", self.pipe.dit, lambda m: denoise_step(
                m, state.hidden_states, t, self.guidance, text.pooled, text.embeds, text.ids, self.image_ids,
                **kwargs))
        return v.float()[:, :tokens.shape[1]]        # the appended tokens' velocity is dropped

    def step(self, tokens: torch.Tensor, i: int) -> torch.Tensor:
        """One Euler step: velocity (true CFG with two passes), the conditions' ``velocity`` hooks, the update."""
        v = self.velocity(tokens, i, negative=False)
        if self.use_cfg:
            v_neg = self.velocity(tokens, i, negative=True)
            v = v_neg + self.ctx.cfg_scale * (v - v_neg)
        for c in self.conditions:
            v = c.velocity(v, tokens, i)
        sigmas = self.ctx.sigmas
        self.last_step = (tokens, v, float(sigmas[i]))
        return euler_step(tokens, v, float(sigmas[i]), float(sigmas[i + 1]))

    def clean_estimate(self) -> torch.Tensor:
        """The clean tokens the last step points at: on the straight path x = (1 - sigma) x0 + sigma noise the
        velocity is noise - x0, so x0 = x - sigma v (what a preview shows; the loop itself never needs it)."""
        tokens, v, sigma = self.last_step
        return tokens.float() - sigma * v.float()
