"""Inpainting and control: from files and settings to the pipeline's seed arguments.

A request may carry ``inpaint_image`` + ``inpaint_mask`` (the mask: a layer whose alpha is the painted area, or a
black-and-white image; white = repaint), ``mask_invert``, ``mask_feather`` (px) and ``controls`` (a list of
{"image", "preprocessor", "controlnet", "scale", "start", "end"}; start/end are fractions of the steps, 0 = the
first). ``validate`` reads and checks all of it before any model loads; ``extra_models`` names the ControlNets the
job needs beside the variant; ``pipe_kwargs`` gives the variant's seed arguments (``flux_fill_*``, ``flex_*``,
``controlnet_inputs``, or for FLUX.2 ``input_image`` + ``inpaint_mask``: the masked step, at full strength inside the
mask; it takes no control images); ``finish`` crops the padding and puts the original back outside the feathered
mask, so unpainted pixels are exactly as they were.

Sizes: the output is the image's own size. The model works on the image padded (edges repeated) to multiples of
16; the padding is never part of the mask and is cropped away. A control image is fitted to that size (cropped to
its aspect, then resized) with a note. Without an inpaint image the first control image sets the size.

The Inpaint & Control tab's page helpers (mask preview, outpainting canvas, control previews) are in
``inpaint_page``.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Optional

from PIL import Image

from engine import registry
from engine.errors import EngineError

from .base import ExtraModel, Feature, describe_files
from .padding import cropped, padded, padded_mask, work_size

DEFAULT_FEATHER = 8
INPAINT_CONTROLNET_SCALE = 0.9      # the seed's example for the alimama Inpainting ControlNet
CONTROL_KEYS = ("preprocessor", "controlnet", "scale", "start", "end")    # a control's settings in a recipe


@dataclasses.dataclass(frozen=True)
class InpaintInputs:
    """The request keys of inpainting and control (as sent)."""

    inpaint_image: Optional[str] = dataclasses.field(default=None, metadata={"file": "the image to inpaint"})
    inpaint_mask: Optional[str] = dataclasses.field(default=None, metadata={"file": "the inpainting mask"})
    mask_invert: bool = False
    mask_feather: int = DEFAULT_FEATHER
    controls: tuple = dataclasses.field(default=(), metadata={"kinds": (list, tuple)})


@dataclasses.dataclass
class Inpainting:
    image_path: str
    mask_path: str
    image: Image.Image
    given_mask: Image.Image      # as painted (saved with the result; a restore re-applies the inversion)
    mask: Image.Image            # as used
    size: tuple                  # the output's (the image's own)


@dataclasses.dataclass
class Control:
    path: str
    original: Image.Image        # as uploaded (saved with the result)
    fitted: Image.Image          # preprocessed, fitted to the output size
    preprocessor: str
    scale: float
    start: float                 # fractions of the steps, 0 = the first
    end: float
    controlnet: Optional[str] = None     # the ControlNet's name (FLUX.1-dev-type variants)
    kind: Optional[str] = None           # its kind ("union" takes a mode)


@dataclasses.dataclass
class InpaintState:
    inpainting: Optional[Inpainting]
    controls: list
    invert: bool
    feather: int
    crop_to: Optional[tuple]     # the output size when the model works on a padded one


# The names Gradio's image editor gives what it sends (it draws an upload in the page and sends the canvas, so the
# person's file name never reaches the server), and the tab's own scratch files (the mask made from the strokes, an
# outpainting canvas: ``<outputs>/.work/<folder>/``): a recipe naming "background.png" names no file of theirs.
EDITOR_NAMES = {"inpaint_image": re.compile(r"(background|composite)\.png"),
                "inpaint_mask": re.compile(r"layer_\d+\.png")}


def recipe_name(key: str, path, image: Image.Image) -> str:
    """What the recipe calls an inpainting input: its file name, or, for a file the image editor or the tab named
    itself, what it is ("the image in the editor (256×192)", "the mask made in the editor"): never "background.png"."""
    from ..work_files import WORK
    file = pathlib.Path(str(path))
    if not EDITOR_NAMES[key].fullmatch(file.name) and file.parent.parent.name != WORK:
        return file.name
    if key == "inpaint_image":
        return f"the image in the editor ({image.width}×{image.height})"
    return "the mask made in the editor"


def _fraction(value, name, lo, hi) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise EngineError(f"{name} must be a number, got {value!r}.") from None
    if not lo <= v <= hi:
        raise EngineError(f"{name} must be between {lo:g} and {hi:g}, got {v:g}.")
    return v


def _fit(image: Image.Image, size) -> tuple:
    """A control image at ``size``: cropped (centred) to its aspect when the aspects differ by over 1 %, then
    resized. (image, note)."""
    w, h = image.size
    tw, th = size
    note = ""
    if abs(w / h - tw / th) > 0.01 * (tw / th):
        if w / h > tw / th:
            nw = round(h * tw / th)
            image = image.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
        else:
            nh = round(w * th / tw)
            image = image.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
        note = f"{w}x{h} has another aspect than the output ({tw}x{th}): its centre was cropped, then resized."
    elif (w, h) != (tw, th):
        note = f"resized from {w}x{h} to {tw}x{th}."
    if image.size != (tw, th):
        image = image.resize((tw, th), Image.LANCZOS)
    return image, note


def _read_inpainting(inputs: InpaintInputs, variant, invert: bool, notes: list) -> Inpainting:
    from engine import masks
    from engine.images import load_user_image
    if not variant.inpaint:
        inpainters = [v.name for v in registry.studio_variants() if v.inpaint and not v.demo]
        raise EngineError(f"{variant.name} does not inpaint. Choose {', '.join(inpainters)}.")
    if not inputs.inpaint_mask:
        raise EngineError("No mask: paint the area to change on the image (white), then generate.")
    image = load_user_image(inputs.inpaint_image, notes=notes)
    given, note = masks.mask_from_file(inputs.inpaint_mask, image.size)
    if note:
        notes.append(note)
    mask = masks.invert(given) if invert else given
    masks.check_not_empty(mask)
    return Inpainting(str(inputs.inpaint_image), str(inputs.inpaint_mask), image, given, mask, image.size)


def _read_control(i: int, c: dict, variant, notes: list) -> Control:
    """Control image ``i`` (0-based) read, preprocessed and checked (``fitted`` is the processed image until
    ``validate`` fits it to the output size)."""
    from engine import preprocess
    from engine.images import load_user_image
    img = load_user_image(c["image"], notes=notes)
    preprocessor = c.get("preprocessor") or "none"
    control = Control(path=str(c["image"]), original=img, fitted=preprocess.preprocess(preprocessor, img),
                      preprocessor=preprocessor, scale=_fraction(c.get("scale", 1.0), "Strength", 0.0, 2.0),
                      start=_fraction(c.get("start", 0.0), "From", 0.0, 1.0),
                      end=_fraction(c.get("end", 1.0), "To", 0.0, 1.0),
                      controlnet=None if c.get("controlnet") is None else str(c["controlnet"]))
    if control.end < control.start:
        raise EngineError(f"Control image {i + 1}: 'to' ({control.end}) is before 'from' ({control.start}).")
    if variant.control == "controlnet":
        spec = registry.get_controlnet(control.controlnet or "Union-alpha", demo=variant.demo)
        if spec.kind == "inpaint":
            raise EngineError("The Inpainting ControlNet is used by painting a mask, not as a control image.")
        if spec.kind == "union" and preprocess.union_mode(control.preprocessor) is None:
            raise EngineError(f"Control image {i + 1}: Union-alpha needs to know what the image is: choose "
                              f"a preprocessor (canny, tile, blur, gray, low quality) or the kind of map you "
                              f"uploaded (depth, pose).")
        control.controlnet, control.kind = spec.name, spec.kind
    return control


def _check_controls(variant, controls: list) -> None:
    if not variant.control:
        raise EngineError(f"{variant.name} takes no control images. Use FLUX.1-dev (ControlNets) or Flex.2-preview, "
                          f"or remove the control images.")
    if variant.control == "flex" and len(controls) > 1:
        raise EngineError("Flex.2 takes one control image; remove the others.")


class InpaintFeature(Feature):
    name = "inpaint"
    Inputs = InpaintInputs
    roles = ("controlnet",)

    def paths(self, inputs: InpaintInputs):
        yield from super().paths(inputs)
        for c in inputs.controls or ():
            if isinstance(c, dict) and c.get("image") not in (None, ""):
                yield "a control image", c["image"]

    def validate(self, inputs: InpaintInputs, job) -> Optional[InpaintState]:
        try:
            feather = max(0, int(inputs.mask_feather or 0))
        except (TypeError, ValueError, OverflowError):
            raise EngineError(f"Feather must be a whole number of pixels, got {inputs.mask_feather!r}.") from None
        invert = bool(inputs.mask_invert)
        given = [c for c in (inputs.controls or []) if isinstance(c, dict) and c.get("image")]
        if not inputs.inpaint_image and not given:
            return None
        variant = job.variant
        state = InpaintState(None, [], invert, feather, None)
        if inputs.inpaint_image:
            state.inpainting = _read_inpainting(inputs, variant, invert, job.notes)
            job.width, job.height = work_size(state.inpainting.size)
        if given:
            _check_controls(variant, given)
            state.controls = [_read_control(i, c, variant, job.notes) for i, c in enumerate(given)]
            first = state.controls[0].original
            if state.inpainting is None:
                job.width, job.height = work_size(first.size)
                state.crop_to = first.size
            size = state.inpainting.size if state.inpainting else first.size     # the output's size
            for i, c in enumerate(state.controls):
                c.fitted, note = _fit(c.fitted, size)
                if note:
                    job.notes.append(f"Control image {i + 1}: {note}")
        return state

    def _controlnets(self, state: InpaintState, variant) -> list:
        """The ControlNet specs the job needs beside the variant, in controlnet_id order (no repeats)."""
        names = []
        if state.inpainting and variant.inpaint == "controlnet":
            names.append("Inpainting-Beta")
        if variant.control == "controlnet":
            names += [c.controlnet for c in state.controls]
        out = []
        for name in names:
            spec = registry.get_controlnet(name, demo=variant.demo)
            if spec not in out:
                out.append(spec)
        return out

    def extra_models(self, state: InpaintState, job) -> list:
        return [ExtraModel(role="controlnet", name=spec.name, label=f"the {spec.label} ControlNet",
                           model_id=spec.model_id, pattern=spec.pattern, load=_load_controlnet,
                           write_demo=_demo_writer(spec) if spec.demo else None)
                for spec in self._controlnets(state, job.variant)]

    def combine(self, role: str, modules: list):
        from engine.controlnet import MultiControlNet
        return MultiControlNet(modules)

    def pipe_kwargs(self, state: InpaintState, job, notes: list) -> dict:
        """The seed's pipeline arguments (ControlNet ids in ``_controlnets``' order, as attached)."""
        from engine import preprocess
        from engine.controlnet import ControlNetInput
        variant, out = job.variant, {}
        ids = {spec.name: i for i, spec in enumerate(self._controlnets(state, variant))}
        work = (job.width, job.height)
        inp = state.inpainting
        if inp:
            image, mask = padded(inp.image, work), padded_mask(inp.mask, work)
            if variant.inpaint == "fill":
                out.update(flux_fill_image=image, flux_fill_mask=mask)
            elif variant.inpaint == "flex":
                out.update(flex_inpaint_image=image, flex_inpaint_mask=mask)
            elif variant.inpaint == "controlnet":
                out["controlnet_inputs"] = [ControlNetInput(controlnet_id=ids["Inpainting-Beta"], image=image,
                                                            inpaint_mask=mask, scale=INPAINT_CONTROLNET_SCALE)]
            elif variant.inpaint == "mask":
                # FLUX.2: the masked area starts from noise, the rest follows the image's own noised path.
                out.update(input_image=image, inpaint_mask=mask, denoising_strength=1.0)
        for c in state.controls:
            control = padded(c.fitted, work)
            if variant.control == "flex":
                # Flex.2's control acts from the first step up to ``stop`` (a fraction of the steps).
                out.update(flex_control_image=control, flex_control_strength=c.scale, flex_control_stop=c.end)
            else:
                # The seed's start/end count down from 1 (first step) to 0 (last).
                out.setdefault("controlnet_inputs", []).append(ControlNetInput(
                    controlnet_id=ids[c.controlnet], image=control, scale=c.scale, start=1.0 - c.start,
                    end=1.0 - c.end, processor_id=preprocess.union_mode(c.preprocessor) if c.kind == "union" else None))
        return out

    def finish(self, state: InpaintState, job, image):
        """Crop the padding; outside the feathered mask, the original pixels exactly."""
        from engine import masks
        inp = state.inpainting
        if not inp:
            return cropped(image, state.crop_to)
        return masks.composite(inp.image, cropped(image, inp.size), inp.mask, state.feather)

    def recipe(self, state: InpaintState, job, copies) -> dict:
        """The image and the mask as painted (``.refN.png`` copies), the mask settings, and each control's settings
        and its image (``.ctlN.png``)."""
        from engine.fingerprints import fingerprint
        out: dict = {}
        inp = state.inpainting
        if inp:
            for key, path, image in (("inpaint_image", inp.image_path, inp.image),
                                     ("inpaint_mask", inp.mask_path, inp.given_mask)):
                out[key] = {"file": recipe_name(key, path, image), "copy": copies.add(image, "ref"),
                            "size": [image.width, image.height]}
                try:
                    out[key]["fingerprint"] = fingerprint(path)
                except OSError:
                    pass
            out.update(mask_invert=state.invert, mask_feather=state.feather)
        if state.controls:
            out["controls"] = []
            for c in state.controls:
                entry = {k: getattr(c, k) for k in CONTROL_KEYS if getattr(c, k) is not None}
                entry.update(file=pathlib.Path(c.path).name, copy=copies.add(c.original, "ctl"),
                             size=list(c.original.size))
                try:
                    entry["fingerprint"] = fingerprint(c.path)
                except OSError:
                    pass
                out["controls"].append(entry)
        return out

    def restore(self, found: dict, result) -> dict:
        from ..recipes import sidecar
        out = super().restore(found, result)
        if "controls" in found:
            controls = []
            for entry in found["controls"] if isinstance(found["controls"], list) else []:
                where = sidecar(result, entry.get("copy")) if isinstance(entry, dict) else None
                if where is not None:
                    controls.append({**{k: entry[k] for k in CONTROL_KEYS if k in entry}, "image": str(where)})
            out["controls"] = controls
        return out

    def describe(self, recipe: dict) -> list:
        lines = [line for key, label in (("inpaint_image", "Image to inpaint"), ("inpaint_mask", "Mask"))
                 if recipe.get(key) for line in describe_files(label, recipe[key])]
        if recipe.get("inpaint_mask"):
            lines.append(f"  Mask: {'inverted, ' if recipe.get('mask_invert') else ''}feather "
                         f"{recipe.get('mask_feather', 0)} px; the original is kept outside it")
        for i, c in enumerate(recipe.get("controls") or []):
            if isinstance(c, dict):
                lines.append(f"  Control {i + 1}: {c.get('file', '?')} · {c.get('preprocessor', 'none')} · "
                             f"{c.get('controlnet') or 'Flex.2 control'} · strength {c.get('scale')} · steps "
                             f"{c.get('start', 0)}–{c.get('end', 1)} · copy <image name>{c.get('copy', '')}")
        return ["Reference images:", *lines] if lines else []


def _load_controlnet(files, torch_dtype):
    from engine.controlnet import load_controlnet
    return load_controlnet(files, torch_dtype=torch_dtype, device="cpu")


def _demo_writer(spec):
    def write(models_dir):
        from engine.demo import write_controlnet_demo
        write_controlnet_demo(models_dir, spec.kind, spec.model_id)
    return write
