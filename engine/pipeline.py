"""``FluxImagePipeline``: the seed-compatible pipeline, one denoising loop for every FLUX.1 variant.

Scripts written for DiffSynth-Studio port by changing the import::

    from engine import FluxImagePipeline, ModelConfig
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cuda", model_configs=[...])
    image = pipe(prompt="...", seed=0)

The flow: prompt encodings -> initial latents (noise, or noised input image) -> Euler steps of the
transformer's velocity (two passes with true CFG) -> VAE decode -> PIL image.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image
from tqdm import tqdm

from . import latents as lat
from . import placement as placement_mod
from .conditions import Condition, ConditionContext, build_conditions, merge_dit_kwargs
from .conditions import kontext as kontext_mod
from .eligen import prepare_eligen, transformer_text
from .controlnet.inputs import ControlNetInput  # noqa: F401 - the seed imports it from the pipeline module
from .errors import EngineError
from .model_config import ModelConfig
from .scheduler import add_noise, euler_step, flux_sigmas
from .sizes import normalize_size
from .text_encoding import PromptEncoder, load_tokenizer

ROLES = ("dit", "vae", "text_encoder_1", "text_encoder_2")
# Step1X-Edit's extra components and the ControlNets (one MultiControlNet), planned and placed with the rest.
EXTRA_ROLES = ("step1x_connector", "qwen_vl", "controlnet")
ALL_ROLES = ROLES + EXTRA_ROLES
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


class FluxImagePipeline:
    def __init__(self, device: Optional[str] = None, torch_dtype=torch.bfloat16):
        self.device = torch.device(device or default_device())
        self.torch_dtype = torch_dtype
        self.dit = self.vae = self.text_encoder_1 = self.text_encoder_2 = None
        self.step1x_connector = self.qwen_vl = None
        self.controlnet = None            # engine.controlnet.MultiControlNet: every ControlNet, in file order
        self.tokenizer_1 = self.tokenizer_2 = None
        self.model_files: dict[str, list[str]] = {}
        self.placements: dict = {}
        self.vram_limit = None
        self.ram_limit = None             # GB of RAM the plan may use (None: no limit)
        self.plan = None                  # the engine.vram.Plan in force
        self.plan_size = (1024, 1024)     # (width, height) whose activations the plan makes room for
        self.plan_text_tokens = 512       # and the tokens beside the image's: T5's, EliGen's entities, references
        self.residency = placement_mod.Residency()
        self._vram_fields: dict = {}
        self._prompt_encoder: Optional[PromptEncoder] = None
        self.prompt_cache: OrderedDict = OrderedDict()   # the studio shares one across pipelines

    # ----------------------------------------------------------------------------------------- loading
    @staticmethod
    def from_pretrained(torch_dtype=torch.bfloat16, device: Optional[str] = None,
                        model_configs: Sequence[ModelConfig] = (),
                        tokenizer_1_config: Optional[ModelConfig] = None,
                        tokenizer_2_config: Optional[ModelConfig] = None,
                        vram_limit: Optional[float] = None, models_dir=None) -> "FluxImagePipeline":
        """Load the models named by ``model_configs``; which component each file is comes from its contents.
        ControlNet files (any number) become one ``controlnet`` component; their order gives ``controlnet_id``."""
        from .controlnet import MultiControlNet, check_compatible
        from .step1x.load import load_components as load_models   # the FLUX roles plus Step1X-Edit's and ControlNets
        pipe = FluxImagePipeline(device=device, torch_dtype=torch_dtype)
        pipe.vram_limit = vram_limit
        modules, vram_fields, controlnets = {}, {}, []
        for config in model_configs:
            files = config.resolve(models_dir)
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
        return pipe

    def set_models(self, modules: dict, vram_fields: Optional[dict] = None):
        """Install loaded components (role -> module) and place them all for this pipeline's device and budget.

        Components already installed and not in ``modules`` are kept and re-placed with the rest; ``vram_fields``
        ({role: the seed's per-file fields}) pin a component's placement (see ``engine.vram``).
        """
        unknown = set(modules) - set(ALL_ROLES)
        if unknown:
            raise EngineError(f"Unknown component roles {sorted(unknown)}; expected {ALL_ROLES}.")
        self._vram_fields.update({r: dict(f) for r, f in (vram_fields or {}).items() if f})
        installed = self.installed_models()
        installed.update(modules)
        self.residency.offload_all()
        self.residency.forget()
        self.plan = placement_mod.plan_modules(installed, self._vram_fields, self.device, self.torch_dtype,
                                               self.vram_limit, self.ram_limit, *self.plan_size,
                                               text_tokens=self.plan_text_tokens)
        self.placements = {r: placement_mod.from_entry(e) for r, e in self.plan.entries.items()}
        for role, place in self.placements.items():
            if placement_mod.needs_reload(installed[role], place):   # fp8 cannot become bf16 in place
                place.storage_dtype = installed[role]._flux_fp8
                self.plan.entries[role].storage_dtype = str(place.storage_dtype).replace("torch.", "")
                self.plan.notes.append(f"{self.plan.entries[role].label} stays in fp8 until it is loaded again.")
        # Components leaving the device first, so the device never holds the old and the new placement at once.
        order = sorted(installed, key=lambda r: self.placements[r].strategy in ("resident", "fp8"))
        for role in order:
            setattr(self, role, placement_mod.apply(installed[role], self.placements[role], role))
            self.model_files[role] = [str(f) for f in getattr(installed[role], "flux_studio_files", [])]
        placement_mod.release_memory(collect=False)   # moved tensors are freed by reference counting
        self.residency.configure(self.plan.budget_bytes, self.plan.resident_bytes() + self.plan.reserve_bytes)
        self._prompt_encoder = None

    def installed_models(self) -> dict:
        """role -> module of every component installed on this pipeline."""
        return {r: getattr(self, r) for r in ALL_ROLES if getattr(self, r) is not None}

    def run_model(self, role: str, module, fn: Callable):
        """Run ``fn(module)`` with the module where it computes: an offloaded component is moved in for its stage
        (and stays until another needs the room); a streamed one moves block by block inside its own call."""
        place = self.placements.get(role)
        if place is not None and place.offloaded:
            self.residency.onload(role, module, place)
        return fn(module)

    # ------------------------------------------------------------------------------------------ LoRAs
    def load_lora(self, module=None, lora_config=None, alpha: float = 1.0, hotload=None, state_dict=None,
                  verbose: int = 1, name: Optional[str] = None) -> dict:
        """The seed's ``pipe.load_lora(pipe.dit, path, alpha=1)``: attach a LoRA (any common format) to the
        transformer. It is a runtime adapter: applied once, kept across calls, removable exactly with
        ``clear_lora``; ``hotload`` is accepted for compatibility (adapters are always hot)."""
        from .lora import LoraError, attach_lora
        module = module if module is not None else self.dit
        if module is not self.dit:
            raise EngineError("LoRAs attach to the FLUX transformer (pipe.dit) only.")
        source = state_dict
        if source is None:
            if lora_config is None:
                raise EngineError("load_lora needs a LoRA: a file path, a ModelConfig or state_dict=...")
            source = lora_config.resolve()[0] if isinstance(lora_config, ModelConfig) else lora_config
        try:
            report = attach_lora(module, source, weight=alpha, name=name)
        except LoraError as exc:
            raise EngineError(str(exc)) from exc
        if verbose:
            print(f"LoRA {report['name']} ({report['format']}): {report['bound']} of {report['total']} layers, weight {alpha}")
        return report

    def clear_lora(self, verbose: int = 1):
        """Remove every LoRA from the transformer; its weights are exactly as loaded."""
        from .lora import detach_loras
        removed = detach_loras(self.dit) if self.dit is not None else []
        if verbose and removed:
            print(f"Removed LoRAs: {', '.join(removed)}")
        return removed

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
                 kontext_images: Union[Image.Image, Sequence[Image.Image], None] = None,
                 step1x_reference_image: Optional[Image.Image] = None,
                 controlnet_inputs: Optional[Sequence] = None,
                 flux_fill_image: Optional[Image.Image] = None, flux_fill_mask: Optional[Image.Image] = None,
                 flex_inpaint_image: Optional[Image.Image] = None, flex_inpaint_mask: Optional[Image.Image] = None,
                 flex_control_image: Optional[Image.Image] = None, flex_control_strength: float = 0.5,
                 flex_control_stop: float = 0.5,
                 eligen_entity_prompts: Optional[Sequence[str]] = None,
                 eligen_entity_masks: Optional[Sequence[Image.Image]] = None,
                 eligen_enable_on_negative: bool = False, eligen_enable_inpaint: bool = False) -> Image.Image:
        """Generate one image. Parameters and defaults are the seed's; ``schedule="bfl"`` picks BFL's
        resolution-dependent shift, and ``step_callback(done, total)`` runs after every step (it may raise to
        cancel). ``kontext_images`` (one image or a list) are FLUX.1 Kontext's reference images: appended to the
        transformer's input as clean tokens (see ``engine.conditions.kontext``); the output keeps the requested
        size. ``controlnet_inputs``, ``flux_fill_*`` and ``flex_*`` are the seed's ControlNet, FLUX.1-Fill and
        Flex.2 inputs (``engine.conditions``); ``eligen_*`` the seed's EliGen regional prompts (``engine.eligen``)."""
        if self.dit is None:
            raise EngineError("No FLUX transformer is loaded: add the ModelConfig of flux1-dev.safetensors (or similar).")
        if step1x_reference_image is not None:
            from .step1x.sampling import step1x_generate
            return step1x_generate(self, prompt, step1x_reference_image, negative_prompt=negative_prompt,
                                   cfg_scale=cfg_scale, height=height, width=width, seed=seed, rand_device=rand_device,
                                   sigma_shift=sigma_shift, num_inference_steps=num_inference_steps, tiled=tiled,
                                   tile_size=tile_size, tile_stride=tile_stride, progress_bar_cmd=progress_bar_cmd,
                                   schedule=schedule, step_callback=step_callback)
        width, height, _ = normalize_size(width, height)
        if input_image is None:
            denoising_strength = 1.0
        seed = random.randrange(2 ** 31) if seed is None else int(seed)
        steps = int(num_inference_steps)
        sigmas = flux_sigmas(steps, denoising_strength, sigma_shift, schedule,
                             image_seq_len=(height // lat.TOKEN_FACTOR) * (width // lat.TOKEN_FACTOR))
        place = self.placements["dit"]
        dtype, device = place.compute_dtype, place.compute_device

        prompt_emb, pooled = self.encode_prompt(prompt, t5_sequence_length)
        use_cfg = cfg_scale != 1.0
        if use_cfg:
            neg_emb, neg_pooled = self.encode_prompt(negative_prompt, t5_sequence_length)

        noise = lat.initial_noise(height, width, seed, rand_device).to(device)
        if input_image is not None:
            image = input_image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.LANCZOS)
            clean = self.encode_image(image, tiled, tile_size, tile_stride).to(device)
            latents = add_noise(clean, noise, float(sigmas[0]))
        else:
            latents = noise

        tokens = lat.pack(latents).float()
        img_ids = lat.image_ids(height, width, device=device)
        txt_ids = lat.text_ids(prompt_emb.shape[1], device=device)
        kontext = kontext_mod.encode_references(
            kontext_images, lambda im: self.encode_image(im, tiled, tile_size, tile_stride), device=device)
        num_image_tokens = tokens.shape[1]
        guidance = None
        if self.dit.config.guidance_embeds:
            guidance = torch.full((tokens.shape[0],), float(embedded_guidance), device=device, dtype=torch.float32)
        conditions = build_conditions(
            ConditionContext(self, height, width, device, dtype, sigmas,
                             lambda im: self.encode_image(im, tiled, tile_size, tile_stride).to(device)),
            controlnet_inputs=controlnet_inputs, flux_fill_image=flux_fill_image, flux_fill_mask=flux_fill_mask,
            flex_inpaint_image=flex_inpaint_image, flex_inpaint_mask=flex_inpaint_mask,
            flex_control_image=flex_control_image, flex_control_strength=flex_control_strength,
            flex_control_stop=flex_control_stop)
        eligen = prepare_eligen(
            self, eligen_entity_prompts, eligen_entity_masks, height=height, width=width,
            t5_sequence_length=t5_sequence_length, enable_on_negative=eligen_enable_on_negative, cfg_scale=cfg_scale,
            enable_inpaint=eligen_enable_inpaint, clean_latents=clean if input_image is not None else None,
            sigmas=sigmas)
        if eligen is not None:
            conditions.append(eligen)

        def velocity(emb, pool, t, i, negative=False):
            latent = tokens.to(dtype)
            extra = [f.to(device=device, dtype=dtype) for f in (c.features(i) for c in conditions) if f is not None]
            if extra:
                latent = torch.cat([latent] + extra, dim=-1)
            hidden, ids = kontext_mod.join(latent, img_ids, kontext)
            kwargs = merge_dit_kwargs([c.dit_kwargs(i, latents=tokens.to(dtype), latent_ids=img_ids,
                                                    hidden_states=hidden, image_ids=ids, timestep=t, guidance=guidance,
                                                    pooled=pool, text_embeds=emb, text_ids=txt_ids,
                                                    negative=negative) for c in conditions
                                       if type(c).dit_kwargs is not Condition.dit_kwargs])   # interim
            dit_emb, dit_txt_ids = transformer_text(eligen, emb, txt_ids, negative)
            v = self.run_model("dit", self.dit, lambda m: denoise_step(
                m, hidden, t, guidance, pool, dit_emb, dit_txt_ids, ids, **kwargs)).float()
            return kontext_mod.generated_part(v, num_image_tokens)

        for i in progress_bar_cmd(range(steps)):
            t = sigmas[i].expand(tokens.shape[0]).to(device=device, dtype=dtype)
            v = velocity(prompt_emb, pooled, t, i)
            if use_cfg:
                v_neg = velocity(neg_emb, neg_pooled, t, i, negative=True)
                v = v_neg + cfg_scale * (v - v_neg)
            if eligen is not None:
                v = eligen.inpaint_velocity(v, tokens, i)
            tokens = euler_step(tokens, v, float(sigmas[i]), float(sigmas[i + 1]))
            if step_callback is not None:
                step_callback(i + 1, steps)

        latents = lat.unpack(tokens, height, width)
        return self.decode_latents(latents, tiled, tile_size, tile_stride)
