"""Editing: reference images for the variants that take them (FLUX.1 Kontext's ``kontext_images``, Step1X-Edit's
``step1x_reference_image``, FLUX.2's ``edit_images``, Nexus-GenV2's ``nexus_gen_reference_image``; ``Variant.extra_inputs`` and the family's ``edit_inputs`` say
which: ``edit_inputs``). ``kontext_images`` and ``edit_images`` take several; the family turns each key into the
pipeline's arguments (FLUX.2: ``edit_image``). Each is read upright in RGB; without a width and
height in the request the output follows the first one's aspect at about 1 MP. The model gets each reference at
most about the output's area (their tokens join the sequence); the copy saved beside the result
(``<name>.ref0.png``, ...) keeps the input's own size, so a restore brings back the original.

Page helpers for the Edit tab: ``edit_size`` (the output size for an image) and ``before_after``.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

from engine import registry
from engine.errors import EngineError

from .base import Feature, describe_files, file_entries, file_entry

LIST_KEYS = ("kontext_images", "edit_images")          # keys that take several images (the others take one)
# References the model reads at their own size (Nexus-Gen's AR model bounds them itself, as the seed does): their
# pixels never join the transformer's sequence, so they are not fitted to the output's area.
OWN_SIZE_KEYS = ("nexus_gen_reference_image",)
LABELS = {"kontext_images": "Kontext reference", "step1x_reference_image": "Step1X-Edit reference",
          "edit_images": "FLUX.2 reference", "nexus_gen_reference_image": "Nexus-GenV2 reference"}


def edit_inputs(variant) -> tuple:
    """The edit request keys a registry ``Variant`` takes: its own ``extra_inputs`` and its family's."""
    from ..families import family_of
    return tuple(variant.extra_inputs) + tuple(family_of(variant).edit_inputs)


def edit_inputs_of(name) -> tuple:
    """``edit_inputs`` of a variant by name (() for an unknown one): for the Edit tab, which has the name only."""
    try:
        return edit_inputs(registry.get_variant(name))
    except Exception:  # noqa: BLE001 - an unknown name edits nothing
        return ()


@dataclasses.dataclass(frozen=True)
class EditInputs:
    """The request keys of editing (paths; as sent)."""

    kontext_images: tuple = dataclasses.field(default=(), metadata={
        "file": "Kontext reference images", "kinds": (list, tuple, str, pathlib.Path)})
    step1x_reference_image: Optional[str] = dataclasses.field(default=None, metadata={
        "file": "a Step1X-Edit reference image"})
    edit_images: tuple = dataclasses.field(default=(), metadata={
        "file": "FLUX.2 / FLUX 3 reference images", "kinds": (list, tuple, str, pathlib.Path)})
    nexus_gen_reference_image: Optional[str] = dataclasses.field(default=None, metadata={
        "file": "a Nexus-GenV2 reference image"})


@dataclasses.dataclass
class Reference:
    path: str
    image: object            # PIL image, upright RGB, the input's own size


@dataclasses.dataclass
class EditState:
    references: dict         # request key -> [Reference] (one for a key outside LIST_KEYS), in EditInputs' order


def _fitted_size(size, area: int) -> Optional[tuple]:
    """The size a reference is given to the model at: no larger than about ``area`` (aspect kept); None to keep it."""
    w, h = size
    if w * h <= area * 1.1:
        return None
    scale = (area / (w * h)) ** 0.5
    return max(16, round(w * scale)), max(16, round(h * scale))


def _fit(image, area: int, notes: list):
    """A reference no larger than about the output's area: its tokens join the sequence, so a 2048x2048 reference
    beside a small output would cost minutes and gigabytes for detail the output cannot show."""
    size = _fitted_size(image.size, area)
    if size is None:
        return image
    from PIL import Image
    notes.append(f"A reference image ({image.width}x{image.height}) was downscaled to {size[0]}x{size[1]}, about "
                 f"the output's area: the model uses it at that size.")
    return image.resize(size, Image.Resampling.LANCZOS)


class EditFeature(Feature):
    name = "edit"
    Inputs = EditInputs

    def validate(self, inputs: EditInputs, job) -> Optional[EditState]:
        from engine.images import edit_output_size, load_user_image
        what = {f.name: f.metadata["file"] for f in self.fields()}
        refs, first = {}, None
        for key in what:
            paths = [str(p) for p in file_entries(getattr(inputs, key))]
            if not paths:
                continue
            takes = edit_inputs(job.variant)
            if key not in takes:
                takes = ", ".join(f"{what.get(k, k)} ({k})" for k in takes) or "no reference images"
                editors = [v.name for v in registry.studio_variants() if key in edit_inputs(v)]
                raise EngineError(f"{job.variant.name} does not take {what[key]} ({key}); it takes {takes}. Choose an "
                                  f"editing model" + (f": {', '.join(editors)}." if editors else "."))
            if key not in LIST_KEYS:
                paths = paths[:1]
            refs[key] = [Reference(p, load_user_image(p, notes=job.notes)) for p in paths]
            first = first or refs[key][0].image
        if not refs:
            return None
        if not job.settings.size_given:
            job.width, job.height, _ = edit_output_size(first.size, width=job.settings.width or None,
                                                         height=job.settings.height or None)
        return EditState(refs)

    def pipe_kwargs(self, state: EditState, job, notes: list) -> dict:
        from ..families import family_of
        area = job.width * job.height
        out = {}
        for key, refs in state.references.items():
            images = [r.image if key in OWN_SIZE_KEYS else _fit(r.image, area, notes) for r in refs]
            out.update(family_of(job.variant).edit_args(key, images if key in LIST_KEYS else images[0]))
        return out

    def recipe(self, state: EditState, job, copies) -> dict:
        """{key: [{"file", "copy", "fingerprint", "size"}]} (one entry, not a list, outside LIST_KEYS). ``copy`` is the
        suffix of the RGB copy saved next to the result (``<result name><copy>``), so the edit can be redone."""
        out = {}
        for key, refs in state.references.items():
            entries = [file_entry(r.path, r.image, copies, "ref") for r in refs]
            out[key] = entries if key in LIST_KEYS else entries[0]
        return out

    def describe(self, recipe: dict) -> list:
        flux3 = str(recipe.get("variant") or "").startswith("FLUX.3")     # FLUX 3 takes edit_images too
        lines = [line for key, label in LABELS.items() if recipe.get(key)
                 for line in describe_files("FLUX 3 reference" if flux3 and key == "edit_images" else label,
                                            recipe[key])]
        return ["Reference images:", *lines] if lines else []


# ------------------------------------------------------------------------------------------------- page helpers
def edit_size(image_path, width=None, height=None, megapixels=1.0) -> dict:
    """The output size of an edit of ``image_path``: by default its aspect at about ``megapixels`` MP (multiples of
    16, never cropped); an explicit width and/or height as asked. {"width", "height", "note"}; an image that cannot
    be edited (tiny, huge, not an image) is an EngineError naming it."""
    from engine.images import edit_output_size, load_user_image
    from engine.sizes import normalize_size
    notes: list = []
    img = load_user_image(image_path, notes=notes)
    try:
        pixels = float(megapixels or 1.0) * 1024 * 1024
    except (TypeError, ValueError):
        raise EngineError(f"Megapixels must be a number, got {megapixels!r}.") from None
    w, h, note = edit_output_size(img.size, pixels, width=width or None, height=height or None)
    normalize_size(w, h)   # inside the engine's range
    return {"width": w, "height": h, "note": " ".join(notes + [note])}


def before_after(result_path, work) -> Optional[tuple]:
    """(before, after) for a before/after view of an edit: its input (the copy beside it) resized to the result's
    size, among the scratch files (``work``), and the result; None when the result has no whole input copy."""
    from PIL import Image
    from ..recipes import sidecar
    before = sidecar(result_path, ".ref0.png")
    if before is None:
        return None
    with Image.open(before) as ref, Image.open(result_path) as out:
        resized = ref.convert("RGB").resize(out.size, Image.Resampling.LANCZOS)
    return str(work.save(resized, "before")), str(result_path)
