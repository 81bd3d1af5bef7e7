"""Control-image preprocessors that need no downloaded model (no torch): what a ControlNet or Flex.2 is shown.

``PREPROCESSORS`` lists them in the order the studio offers them: a label, the parameters (default, range) and the
InstantX Union ControlNet mode each one feeds, by DiffSynth-Studio's ``processor_id`` names (canny 0, tile 1,
depth 2, blur 3, pose 4, gray 5, lq 6). Depth and pose need a model to estimate; here they take a map the person
uploads (made elsewhere), passed through unchanged. "none" passes any image through and names no mode.

``preprocess(name, image, **params)`` returns an RGB image of the input's size.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageFilter

from .errors import EngineError


@dataclass(frozen=True)
class Param:
    default: float
    low: float
    high: float
    label: str
    integer: bool = True


@dataclass(frozen=True)
class Preprocessor:
    name: str
    label: str
    mode: Optional[str]                  # the Union ControlNet's processor_id; None: no mode
    run: Callable
    params: dict = field(default_factory=dict)
    takes_map: bool = False              # the input is already the control map (uploaded), passed through
    help: str = ""


def _canny(image: Image.Image, low_threshold, high_threshold) -> Image.Image:
    import cv2
    if low_threshold > high_threshold:
        raise EngineError(f"Canny: the low threshold ({low_threshold:g}) must not exceed the high one "
                          f"({high_threshold:g}).")
    # On the colour image, as controlnet_aux's CannyDetector (DiffSynth's Annotator) does: edges of any channel.
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(image)), float(low_threshold), float(high_threshold))
    return Image.fromarray(edges, "L").convert("RGB")


def _gray(image: Image.Image) -> Image.Image:
    return image.convert("L").convert("RGB")


def _blur(image: Image.Image, radius) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def _down_up(image: Image.Image, factor) -> Image.Image:
    w, h = image.size
    small = image.resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.BOX)
    return small, (w, h)


def _tile(image: Image.Image, factor) -> Image.Image:
    small, size = _down_up(image, factor)
    return small.resize(size, Image.BICUBIC)


def _lq(image: Image.Image, factor, quality) -> Image.Image:
    # Low quality as the Union "lq" mode means it: fewer pixels and compression artefacts.
    small, size = _down_up(image, factor)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as jpeg:
        return jpeg.convert("RGB").resize(size, Image.BILINEAR)


def _identity(image: Image.Image) -> Image.Image:
    return image


_PREPROCESSORS = (
    Preprocessor("canny", "Canny edges", "canny", _canny,
                 {"low_threshold": Param(100, 0, 1000, "Low threshold"),
                  "high_threshold": Param(200, 0, 1000, "High threshold")},
                 help="Outlines from OpenCV's Canny detector: keeps the composition and shapes."),
    Preprocessor("tile", "Tile (detail from a downscaled copy)", "tile", _tile,
                 {"factor": Param(4, 1, 32, "Downscale factor", integer=False)},
                 help="The image downscaled then upscaled: the model adds detail while keeping colours and layout."),
    Preprocessor("depth", "Depth map (upload one)", "depth", _identity, takes_map=True,
                 help="Upload a depth map (white = near) made with a depth estimator; it is used as is."),
    Preprocessor("blur", "Blur", "blur", _blur, {"radius": Param(8, 0, 64, "Blur radius (px)", integer=False)},
                 help="A Gaussian blur of the image: the model sharpens it."),
    Preprocessor("pose", "Pose skeleton (upload one)", "pose", _identity, takes_map=True,
                 help="Upload an OpenPose skeleton image; it is used as is."),
    Preprocessor("gray", "Grayscale (recolour)", "gray", _gray,
                 help="The image in grayscale: the model colours it."),
    Preprocessor("lq", "Low quality (restore)", "lq", _lq,
                 {"factor": Param(4, 1, 32, "Downscale factor", integer=False),
                  "quality": Param(30, 1, 95, "JPEG quality")},
                 help="The image downscaled and JPEG-compressed: the model restores it."),
    Preprocessor("none", "None (the image as is)", None, _identity,
                 help="The image is the control map already; no Union ControlNet mode is set."),
)
PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in _PREPROCESSORS}
UNION_MODES = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}   # the mode ids


def get(name: Optional[str]) -> Preprocessor:
    key = (name or "none").strip().lower()
    if key not in PREPROCESSORS:
        raise EngineError(f"Unknown preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}.")
    return PREPROCESSORS[key]


def union_mode(name: Optional[str]) -> Optional[str]:
    """The InstantX Union ControlNet mode (DiffSynth's processor_id) a preprocessor's output is; None for "none"."""
    return get(name).mode


def describe() -> list[dict]:
    """The table for the studio: [{"name", "label", "mode", "takes_map", "help", "params": {name: {"default",
    "min", "max", "label", "integer"}}}] in the offered order."""
    return [{"name": p.name, "label": p.label, "mode": p.mode, "takes_map": p.takes_map, "help": p.help,
             "params": {k: {"default": v.default, "min": v.low, "max": v.high, "label": v.label, "integer": v.integer}
                        for k, v in p.params.items()}}
            for p in _PREPROCESSORS]


def preprocess(name: Optional[str], image: Image.Image, **params) -> Image.Image:
    """The control image ``name`` makes of ``image`` (RGB, same size). ``params`` override the table's defaults."""
    proc = get(name)
    unknown = sorted(set(params) - set(proc.params))
    if unknown:
        allowed = ", ".join(proc.params) or "none"
        raise EngineError(f"The {proc.name} preprocessor has no parameter {', '.join(unknown)} (it takes: {allowed}).")
    values = {}
    for key, spec in proc.params.items():
        value = params.get(key, spec.default)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise EngineError(f"{proc.label}: {spec.label} must be a number, got {value!r}.") from None
        if not spec.low <= value <= spec.high:
            raise EngineError(f"{proc.label}: {spec.label} must be between {spec.low:g} and {spec.high:g}, "
                              f"got {value:g}.")
        values[key] = int(round(value)) if spec.integer else value
    if not isinstance(image, Image.Image):
        raise EngineError(f"The control image is a {type(image).__name__}, not an image.")
    return proc.run(image.convert("RGB"), **values).convert("RGB")
