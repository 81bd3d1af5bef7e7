"""Reference images through InstantX's IP-Adapter: SigLIP reads each image, its 128 tokens are attended to in every
transformer block beside the prompt (``engine.conditions.ipadapter``), so the result takes up the images' style and
subject while the prompt still counts.

Request keys: ``ipadapter_images`` (a path, or a list of up to ``MAX_IMAGES`` paths: their tokens share one
attention, so several images blend) and ``ipadapter_scale`` (0 to 2; 1.0, the seed's default; 0.7 is the seed's
example). The files (``google/siglip-so400m-patch14-384``'s model.safetensors and
``InstantX/FLUX.1-dev-IP-Adapter``'s ip-adapter.bin) fill two pipeline slots beside the variant's components; a demo
variant gets their random-weight twins. Each image is saved beside the result (``<name>.ipa0.png``, ...) so that a
restore brings it back.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

from engine.errors import EngineError

from .base import Feature, adapter_models, describe_files, file_entries, file_entry, number_in

ADAPTER = "FLUX.1-dev-IP-Adapter"
MAX_SCALE = 2.0
MAX_IMAGES = 4          # SigLIP reads them in one batch; each adds 128 tokens to every block's IP attention
COPY_KIND = "ipa"       # copies beside the result: <name>.ipa0.png, <name>.ipa1.png, ...
WHAT = {"ipadapter_image_encoder": "SigLIP image encoder", "ipadapter": "IP-Adapter"}


@dataclasses.dataclass(frozen=True)
class IPAdapterInputs:
    """The request keys of the IP-Adapter (paths as sent)."""

    ipadapter_images: tuple = dataclasses.field(default=(), metadata={
        "file": "a reference image (IP-Adapter)", "kinds": (list, tuple, str, pathlib.Path)})
    ipadapter_scale: float = 1.0


@dataclasses.dataclass
class Reference:
    path: str
    image: object            # PIL image, upright RGB, the input's own size


@dataclasses.dataclass
class IPAdapterState:
    images: list             # [Reference]
    scale: float


def check_scale(value) -> float:
    return number_in(value, 0.0, MAX_SCALE, f"The IP-Adapter's scale must be a number from 0 to {MAX_SCALE:g} "
                     f"(1 = as trained, 0.7 = the seed's example), got {{value}}.")


class IPAdapterFeature(Feature):
    name = "ipadapter"
    Inputs = IPAdapterInputs
    roles = ("ipadapter_image_encoder", "ipadapter")

    def validate(self, inputs: IPAdapterInputs, job) -> Optional[IPAdapterState]:
        paths = [str(p) for p in file_entries(inputs.ipadapter_images)]
        if not paths:
            return None
        if "step1x_reference_image" in job.variant.extra_inputs:
            raise EngineError(f"{job.variant.name} is not a FLUX.1 transformer, so InstantX's IP-Adapter (made for "
                              f"FLUX.1-dev) cannot steer it. Remove the reference images, or choose a FLUX.1 model.")
        if len(paths) > MAX_IMAGES:
            raise EngineError(f"At most {MAX_IMAGES} IP-Adapter reference images at once; got {len(paths)}.")
        scale = check_scale(inputs.ipadapter_scale)
        from engine.images import load_user_image
        return IPAdapterState([Reference(p, load_user_image(p, notes=job.notes)) for p in paths], scale)

    def pipe_kwargs(self, state: IPAdapterState, job, notes: list) -> dict:
        return {"ipadapter_images": [r.image for r in state.images], "ipadapter_scale": state.scale}

    def extra_models(self, state: IPAdapterState, job) -> list:
        return adapter_models(ADAPTER, job.variant.demo, WHAT, _loader, "write_ipadapter_demo")

    def recipe(self, state: IPAdapterState, job, copies) -> dict:
        """{"ipadapter_images": [{"file", "copy", "size", "fingerprint"}], "ipadapter_scale"}."""
        return {"ipadapter_images": [file_entry(r.path, r.image, copies, COPY_KIND) for r in state.images],
                "ipadapter_scale": state.scale}

    def describe(self, recipe: dict) -> list:
        if not recipe.get("ipadapter_images"):
            return []
        return [f"Reference images (IP-Adapter), scale {recipe.get('ipadapter_scale', 1.0)}:",
                *describe_files("Reference", recipe["ipadapter_images"])]


def _loader(role: str):
    def load(files, torch_dtype):
        from engine.ipadapter.load import load_role
        from engine.loading.errors import ModelFileError
        try:
            return load_role(role, files, torch_dtype, "cpu")
        except ModelFileError as e:
            raise EngineError(f"The IP-Adapter's {WHAT[role]} could not be loaded: {e}") from e
    return load


__all__ = ["IPAdapterFeature", "IPAdapterInputs", "MAX_IMAGES", "MAX_SCALE", "check_scale"]
