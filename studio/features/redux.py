"""The image prompt (FLUX.1-Redux): an image whose content and style guide the result, read by SigLIP and turned
into 729 text-space tokens by the Redux embedder (``engine.conditions.redux``).

Request keys: ``flux_redux_image`` (a path, or a list of them: their tokens are joined in order) and
``flux_redux_strength`` (0 to 2, 1 as trained). With an empty prompt the image alone guides, as in DiffSynth-Studio
(its tokens take the prompt's place); with a prompt, the image's tokens follow the prompt's, so both count
(diffusers' prior pipeline given a prompt). The Redux files (``black-forest-labs/FLUX.1-Redux-dev``: the SigLIP
vision tower and the embedder) fill two pipeline slots beside the variant's components; a demo variant gets their
random-weight twins. The image is saved beside the result (``<name>.red0.png``) so that a restore brings it back.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

from engine.errors import EngineError

from .base import Feature, adapter_models, describe_files, file_entries, file_entry, number_in, own_prompt

ADAPTER = "FLUX.1-Redux-dev"
MAX_STRENGTH = 2.0
MAX_IMAGES = 4          # each adds 729 tokens to every step's sequence


@dataclasses.dataclass(frozen=True)
class ReduxInputs:
    """The request keys of the image prompt (paths as sent)."""

    flux_redux_image: tuple = dataclasses.field(default=(), metadata={
        "file": "an image prompt (Redux)", "kinds": (list, tuple, str, pathlib.Path)})
    flux_redux_strength: float = 1.0


@dataclasses.dataclass
class ImagePrompt:
    path: str
    image: object            # PIL image, upright RGB, the input's own size


@dataclasses.dataclass
class ReduxState:
    images: list             # [ImagePrompt]
    strength: float


def check_strength(value) -> float:
    return number_in(value, 0.0, MAX_STRENGTH, f"The image prompt's strength must be a number from 0 to "
                     f"{MAX_STRENGTH:g} (1 = as trained), got {{value}}.")


class ReduxFeature(Feature):
    name = "redux"
    Inputs = ReduxInputs
    roles = ("flux_redux_image_encoder", "flux_redux_image_embedder")

    def validate(self, inputs: ReduxInputs, job) -> Optional[ReduxState]:
        paths = [str(p) for p in file_entries(inputs.flux_redux_image)]
        if not paths:
            return None
        if own_prompt(job.variant):
            raise EngineError(f"{job.variant.name} reads its prompt through Qwen2.5-VL, not T5, so it cannot take "
                              f"an image prompt (Redux). Remove the image prompt, or choose a FLUX.1 model.")
        if len(paths) > MAX_IMAGES:
            raise EngineError(f"At most {MAX_IMAGES} image prompts at once (each adds 729 tokens to every step); "
                              f"got {len(paths)}.")
        strength = check_strength(inputs.flux_redux_strength)
        from engine.images import load_user_image
        return ReduxState([ImagePrompt(p, load_user_image(p, notes=job.notes)) for p in paths], strength)

    def pipe_kwargs(self, state: ReduxState, job, notes: list) -> dict:
        images = [p.image for p in state.images]
        return {"flux_redux_image": images if len(images) > 1 else images[0],
                "flux_redux_strength": state.strength,
                # With a prompt both count; without one the image alone guides (the seed's behaviour).
                "flux_redux_keep_prompt": bool(job.settings.prompt.strip())}

    def extra_models(self, state: ReduxState, job) -> list:
        return adapter_models(ADAPTER, job.variant.demo, {"flux_redux_image_encoder": "image encoder",
                                                          "flux_redux_image_embedder": "image embedder"},
                              _loader, "write_redux_demo")

    def recipe(self, state: ReduxState, job, copies) -> dict:
        """{"flux_redux_image": [{"file", "copy", "size", "fingerprint"}], "flux_redux_strength"}."""
        entries = [file_entry(p.path, p.image, copies, "red") for p in state.images]
        return {"flux_redux_image": entries, "flux_redux_strength": state.strength}

    def describe(self, recipe: dict) -> list:
        if not recipe.get("flux_redux_image"):
            return []
        lines = describe_files("Image", recipe["flux_redux_image"])
        return [f"Image prompt (Redux), strength {recipe.get('flux_redux_strength', 1.0)}:", *lines]


def _loader(role: str):
    def load(files, torch_dtype):
        from ..models import load_role
        return load_role(role, files, torch_dtype, needed_by="the image prompt (FLUX.1-Redux)")
    return load
