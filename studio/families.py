"""Model families: what the studio does differently for FLUX.1 and FLUX.2, in one place.

A variant's family (``family_of``) decides how its components load, which pipeline class holds them, the pipeline's
base arguments for a job, and which of the studio's extras it takes: the features (``studio.features``) by name,
LoRAs, live previews and the memory planner. The model cache, the request checks and the job runner ask the family;
they name none.

- ``Flux1``: ``engine.pipeline.FluxImagePipeline`` (FLUX.1, Kontext, Fill, Flex.2, Step1X-Edit): everything.
- ``Flux2``: ``engine.flux2.Flux2ImagePipeline`` ([klein], base, [dev]): text to image, image to image (with
  the hires fix), multi-reference editing (the request's ``edit_images``), inpainting and outpainting (a mask on an
  image: the pipeline's ``inpaint_mask``), live previews and FLUX.2 LoRAs; no image prompts, ControlNets or EliGen yet
  (refused by name, with the fix); placed by the memory planner as FLUX.1 is (its text encoder, transformer and VAE
  are rows of ``engine.roles``).
- ``Flux3``: ``engine.flux3.Flux3ImagePipeline`` (FLUX 3 Image Klein and its base model): text to image, image to
  image (with the hires fix), editing with up to ten references (``edit_images``), BFL's prompt upsampler, FLUX 3
  LoRAs, live previews, placed by the planner (FLUX.2's text encoder, transformer and VAE rows); no inpainting or
  FLUX.1's extras yet (refused by name).

No torch at import.
"""
from __future__ import annotations

from typing import Optional

from engine.errors import EngineError

# How a person calls each feature (for refusals that name what to remove).
FEATURE_WORDS = {
    "edit": "reference images to edit (Kontext / Step1X-Edit)",
    "inpaint": "inpainting, outpainting and ControlNets (Inpaint & Control)",
    "eligen": "EliGen regions",
    "redux": "a FLUX.1-Redux image prompt",
    "ipadapter": "IP-Adapter reference images",
    "infiniteyou": "an InfiniteYou identity photo",
    "img2img": "image to image",
    "lora_encoder": "LoRAs encoded as prompt tokens (LoRA Encoder)",
    "lora_fusion": "LoRA Fusion",
    "tea_cache": "the step cache (TeaCache: its rescale was fitted on FLUX.1-dev)",
    "prompt_upsampler": "BFL's prompt upsampler (FLUX 3's)",
}


def _release_memory():
    from engine.memory.place import release_memory
    release_memory()


class Flux1:
    name = "FLUX.1"
    features: Optional[frozenset] = None      # every feature
    loras = True
    previews = True
    planned = True                            # placed by engine.memory's planner
    edit_inputs: tuple = ()                   # edit request keys every variant of the family takes (beside its own)
    pipeline = "flux1"                        # its slots in engine.roles' pipelines column (the plan's labels)

    @staticmethod
    def sequence_tokens(kwargs: dict, width: int, height: int, text_tokens: int) -> int:
        """Tokens beside the image's that a call with these pipeline arguments puts in the transformer's sequence
        (the prompt's, references', entity prompts'...): what the memory plan must make room for."""
        from engine.conditions import sequence_tokens
        return sequence_tokens(kwargs, width, height, text_tokens)

    @staticmethod
    def edit_args(key: str, images) -> dict:
        """The pipeline's arguments for an edit request key's reference images (FLUX.1: the key itself)."""
        return {key: images}

    @staticmethod
    def load(role: str, files, torch_dtype, needed_by: str = "the model"):
        """A variant's component from its files, on the CPU (the loader that fits the role)."""
        from .models import load_role
        return load_role(role, files, torch_dtype, needed_by)

    @staticmethod
    def tokenizer(role: str, files):
        from engine.text_encoding import load_tokenizer
        return load_tokenizer(files[0], "CLIP" if role == "tokenizer_1" else "T5")

    @staticmethod
    def build(cache, modules: dict, tokenizers: dict, dtype, progress):
        from engine.pipeline import FluxImagePipeline
        pipe = FluxImagePipeline(device=str(cache.torch_device()), torch_dtype=dtype)
        pipe.prompt_cache = cache.prompt_cache       # prompt encodings survive a switch of model
        pipe.vram_limit, pipe.ram_limit = cache.vram_limit, cache.ram_budget()
        pipe.plan_steps = getattr(cache, "plan_steps", pipe.plan_steps)
        progress(0, 1, "Placing the models for the VRAM limit")
        pipe.set_models(modules)
        pipe.tokenizer_1, pipe.tokenizer_2 = tokenizers.get("tokenizer_1"), tokenizers.get("tokenizer_2")
        return pipe

    @staticmethod
    def offload_all(pipe) -> None:
        pipe.residency.offload_all()

    @staticmethod
    def forget_placement(pipe) -> None:
        pipe.residency.forget()

    @staticmethod
    def loaded_plan(pipe, variant_name) -> Optional[dict]:
        if pipe.plan is None:
            return None
        return dict(pipe.plan.as_dict(), variant=variant_name, loaded=True)

    @staticmethod
    def call_args(job, seed: int) -> dict:
        s = job.settings
        return dict(prompt=s.prompt, negative_prompt=s.negative_prompt, cfg_scale=s.cfg_scale,
                    embedded_guidance=s.embedded_guidance, t5_sequence_length=s.t5_sequence_length,
                    height=job.height, width=job.width, seed=seed, rand_device=s.rand_device,
                    sigma_shift=s.sigma_shift, num_inference_steps=s.num_inference_steps, schedule=s.schedule)

    def check(self, job) -> None:
        """Refuse what this family cannot run (FLUX.1 runs everything the studio offers)."""


class Flux2(Flux1):
    name = "FLUX.2"
    features = frozenset({"img2img", "edit", "inpaint"})  # image to image (+ hires fix), references, a mask
    edit_inputs = ("edit_images",)
    loras = True                              # FLUX.2 LoRAs (engine.lora.flux2_formats); a FLUX.1 one is refused
    previews = True                           # engine.preview fits its projection through the pipeline's codec
    planned = True                            # placed by engine.memory's planner (roles text_encoder, dit, vae)
    SCHEDULES = {"seed": "seed"}              # the request's schedule -> Flux2ImagePipeline's
    pipeline = "flux2"

    @staticmethod
    def sequence_tokens(kwargs: dict, width: int, height: int, text_tokens: int) -> int:
        """The prompt's tokens and every reference image's, sized as the pipeline sizes them."""
        from engine.flux2.pipeline import sequence_tokens
        return sequence_tokens(width, height, kwargs.get("edit_image"), kwargs.get("edit_image_auto_resize", True),
                               text_tokens)

    @staticmethod
    def edit_args(key: str, images) -> dict:
        """``edit_images`` -> ``edit_image``. The studio has already fitted each reference to about the output's area
        (``studio.features.edit``), so the seed's resize to about 1 MP is off: the pipeline only crops to 16s."""
        return {"edit_image": list(images), "edit_image_auto_resize": False}

    @staticmethod
    def load(role: str, files, torch_dtype, needed_by: str = "the model"):
        from engine.flux2.loading import load_flux2_models
        loaded = load_flux2_models(files, torch_dtype=torch_dtype, device="cpu")
        if role not in loaded:
            raise EngineError(f"{files[0]} does not hold the FLUX.2 {role} that {needed_by} needs.")
        return loaded[role]

    @staticmethod
    def tokenizer(role: str, files):
        from engine.flux2.text import load_tokenizer
        return load_tokenizer(files[0])

    @staticmethod
    def pipeline_class():
        from engine.flux2.pipeline import Flux2ImagePipeline
        return Flux2ImagePipeline

    @classmethod
    def build(cls, cache, modules: dict, tokenizers: dict, dtype, progress):
        pipe = cls.pipeline_class()(device=str(cache.torch_device()), torch_dtype=dtype)
        pipe.tokenizer = tokenizers.get("tokenizer")
        pipe.plan_steps = getattr(cache, "plan_steps", pipe.plan_steps)
        progress(0, 1, "Placing the models for the VRAM limit")
        cls.place(pipe, cache.vram_limit, modules, cache.ram_budget())
        return pipe

    @staticmethod
    def place(pipe, vram_limit, modules: Optional[dict] = None, ram_limit: Optional[float] = None) -> None:
        """Plan the components (``modules`` beside those installed) for ``vram_limit`` and place them as FLUX.1's
        are: resident, offloaded, fp8 or streamed block by block (``Flux2ImagePipeline.set_models``). A later
        change of limit re-plans through ``ModelCache.replan``, as for FLUX.1."""
        pipe.vram_limit = vram_limit
        if ram_limit is not None:
            pipe.ram_limit = ram_limit
        pipe.set_models(dict(modules or {}))

    # offload_all, forget_placement and loaded_plan are FLUX.1's: the pipeline has the same residency and plan.

    @classmethod
    def call_args(cls, job, seed: int) -> dict:
        s = job.settings
        return dict(prompt=s.prompt, negative_prompt=s.negative_prompt, cfg_scale=s.cfg_scale,
                    embedded_guidance=s.embedded_guidance, max_sequence_length=s.t5_sequence_length,
                    height=job.height, width=job.width, seed=seed, rand_device=s.rand_device,
                    num_inference_steps=s.num_inference_steps, schedule=cls.SCHEDULES[s.schedule])

    TAKES = ("a prompt and, for image to image, an input image; for editing, reference images; for inpainting, an "
             "image and a mask")

    def check(self, job) -> None:
        """Refuse, by name and with the fix, what this family cannot do in the studio yet."""
        label = job.variant.label
        other = sorted(set(job.states) - self.features)
        if other:
            words = "; ".join(FEATURE_WORDS.get(name, name) for name in other)
            raise EngineError(f"{label} cannot use {words} yet ({self.name} takes {self.TAKES}). "
                              f"Remove {'it' if len(other) == 1 else 'them'}, or choose a FLUX.1 model.")
        if job.settings.schedule not in self.SCHEDULES:
            raise EngineError(f"{label} runs the seed's {self.name} schedule only: set the schedule to \"seed\".")
        if job.settings.sigma_shift is not None:
            raise EngineError(f"{label} takes no sigma shift (its schedule sets its own): leave it empty.")


class Flux3(Flux2):
    name = "FLUX 3"
    features = frozenset({"img2img", "edit", "prompt_upsampler"})   # + up to ten references, BFL's upsampler
    loras = True                              # FLUX 3 LoRAs (engine.lora.flux3_formats); another family's refused
    pipeline = "flux3"
    TAKES = "a prompt and, for image to image, an input image; for editing, up to ten reference images"

    @staticmethod
    def sequence_tokens(kwargs: dict, width: int, height: int, text_tokens: int) -> int:
        from engine.flux3.pipeline import sequence_tokens
        return sequence_tokens(width, height, kwargs.get("edit_image"), kwargs.get("edit_image_auto_resize", True))

    @staticmethod
    def load(role: str, files, torch_dtype, needed_by: str = "the model"):
        from engine.flux3.loading import load_flux3_models
        loaded = load_flux3_models(files, torch_dtype=torch_dtype, device="cpu")
        if role not in loaded:
            raise EngineError(f"{files[0]} does not hold the FLUX 3 {role} that {needed_by} needs.")
        return loaded[role]

    @staticmethod
    def tokenizer(role: str, files):
        from engine.flux3.text import load_tokenizer
        return load_tokenizer(files[0])

    @staticmethod
    def pipeline_class():
        from engine.flux3.pipeline import Flux3ImagePipeline
        return Flux3ImagePipeline

    @classmethod
    def call_args(cls, job, seed: int) -> dict:
        s = job.settings
        return dict(prompt=s.prompt, negative_prompt=s.negative_prompt, cfg_scale=s.cfg_scale, height=job.height,
                    width=job.width, seed=seed, rand_device=s.rand_device, num_inference_steps=s.num_inference_steps,
                    schedule=cls.SCHEDULES[s.schedule])



FLUX1, FLUX2, FLUX3 = Flux1(), Flux2(), Flux3()


def family_of(variant):
    """The family of a registry ``Variant``."""
    from engine.flux2.variants import is_flux2
    from engine.flux3.variants import is_flux3
    return FLUX3 if is_flux3(variant) else FLUX2 if is_flux2(variant) else FLUX1
