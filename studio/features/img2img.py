"""Image to image and the hires fix, on Generate.

Image to image: ``init_image`` (a path) is noised to ``denoising_strength`` (above 0 to 1: how much of it is
repainted) and denoised with the prompt, as the pipeline's ``input_image``/``denoising_strength`` (the seed's
parameters). The request key is ``init_image``, not ``input_image``, because EliGen's inpaint mode already reads
``input_image``; a job that sets both is refused by the runner. Without a size in the request the output takes the
image's size; with one the image is stretched to it (Lanczos, as the pipeline does), and a note says so when its
shape differs. The image is saved beside the result (``<name>.init0.png``) so that a restore brings it back.

Hires fix: ``hires_scale`` above 1 (1.5 or 2 usually; 1 = off) makes the image at the chosen size first, then
upscales it (Lanczos) and repaints it at ``hires_strength`` (0.3 to 0.5 keeps the composition and adds detail) with
the same prompt and seed: one job, one image, one recipe that records both passes (the first pass's size in
``width``/``height``; ``hires_size``, ``hires_steps`` and the strength for the second). The refining pass takes
``ceil(steps x strength)`` steps, the share of the schedule it repaints. It combines with image to image and an
image prompt, not with inputs made for another size (EliGen's masks, Edit's and Inpaint's images).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from engine.errors import EngineError
from engine.sizes import MAX_SIZE, normalize_size

from .base import Feature, describe_files, file_entry, number_in

HIRES_MAX_SCALE = 4.0
HIRES_PARTNERS = {"img2img", "redux", "ipadapter", "infiniteyou"}   # features whose inputs fit any size


@dataclasses.dataclass(frozen=True)
class Img2ImgInputs:
    """The request keys of image to image and the hires fix (as sent)."""

    init_image: Optional[str] = dataclasses.field(default=None, metadata={"file": "the input image (image to image)"})
    denoising_strength: float = 0.7
    hires_scale: float = 1.0
    hires_strength: float = 0.4


@dataclasses.dataclass
class Img2ImgState:
    path: Optional[str]
    image: Optional[object]          # the input image, upright RGB, its own size (None: text to image)
    strength: float
    hires_scale: float               # 1: no hires fix
    hires_strength: float
    hires_size: Optional[tuple] = None
    hires_steps: Optional[int] = None


def check_strength(value, what: str) -> float:
    return number_in(value, 0.0, 1.0, f"The {what} must be a number above 0 and at most 1 (how much of the image "
                     f"is repainted), got {{value}}.", above_low=True)


def check_scale(value) -> float:
    return number_in(value, 1.0, HIRES_MAX_SCALE, f"The hires fix's upscale factor must be from 1 (off) to "
                     f"{HIRES_MAX_SCALE:g}, got {{value}}.")


class Img2ImgFeature(Feature):
    name = "img2img"
    Inputs = Img2ImgInputs

    def validate(self, inputs: Img2ImgInputs, job) -> Optional[Img2ImgState]:
        scale = check_scale(inputs.hires_scale)
        if not inputs.init_image and scale == 1.0:
            return None
        state = Img2ImgState(None, None, 1.0, scale, check_strength(inputs.hires_strength, "hires fix's strength"))
        if inputs.init_image:
            from engine.images import load_user_image
            state.path, state.strength = str(inputs.init_image), check_strength(inputs.denoising_strength,
                                                                                 "denoising strength")
            state.image = load_user_image(state.path, notes=job.notes)
            if not job.settings.size_given:
                job.width, job.height = state.image.size
            else:
                self._note_stretch(state.image.size, job)
        if scale > 1.0:
            others = sorted(set(job.states) - HIRES_PARTNERS)
            if others:
                raise EngineError(f"The hires fix cannot follow {', '.join(others)} inputs (they are made for one "
                                  f"size): turn the hires fix off, or remove them.")
            w, h, _ = normalize_size(job.width, job.height)
            big = (math.ceil(w * scale / 16) * 16, math.ceil(h * scale / 16) * 16)
            if max(big) > MAX_SIZE:
                raise EngineError(f"The hires fix would make {big[0]}x{big[1]}, over {MAX_SIZE} pixels a side: choose "
                                  f"a smaller size or factor.")
            state.hires_size = big
            state.hires_steps = max(1, math.ceil(job.settings.num_inference_steps * state.hires_strength))
        return state

    @staticmethod
    def _note_stretch(size, job) -> None:
        w, h, _ = normalize_size(job.width, job.height)
        if abs(size[0] / size[1] - w / h) > 0.01:
            job.notes.append(f"The input image ({size[0]}x{size[1]}) is stretched to the output size {w}x{h}; "
                             f"choose a size of its shape to keep it as it is.")

    def pipe_kwargs(self, state: Img2ImgState, job, notes: list) -> dict:
        if state.image is None:
            return {}
        return {"input_image": state.image, "denoising_strength": state.strength}

    def refine(self, state: Img2ImgState, job, image) -> Optional[dict]:
        if state.hires_size is None:
            return None
        from PIL import Image
        width, height = state.hires_size
        return {"width": width, "height": height, "input_image": image.resize((width, height), Image.LANCZOS),
                "denoising_strength": state.hires_strength, "num_inference_steps": state.hires_steps}

    def recipe(self, state: Img2ImgState, job, copies) -> dict:
        out = {}
        if state.image is not None:
            entry = file_entry(state.path, state.image, copies, "init")
            entry["size"] = list(normalize_size(job.width, job.height)[:2])    # stretched to it (the copy is whole)
            out.update(init_image=entry, denoising_strength=state.strength)
        if state.hires_size is not None:
            out.update(hires_scale=state.hires_scale, hires_strength=state.hires_strength,
                       hires_steps=state.hires_steps, hires_size=list(state.hires_size))
        return out

    def describe(self, recipe: dict) -> list:
        lines = []
        if recipe.get("init_image"):
            lines += [f"Image to image, denoising strength {recipe.get('denoising_strength')}:",
                      *describe_files("Input image", recipe["init_image"])]
        if recipe.get("hires_size"):
            w, h = recipe["hires_size"]
            lines.append(f"Hires fix: upscaled {recipe.get('hires_scale', 0):g}x to {w}x{h}, then refined at "
                         f"strength {recipe.get('hires_strength', 0):g} in {recipe.get('hires_steps')} steps")
        return lines
