"""Live previews: a small image of what the denoiser is heading for, every few steps, for a person to watch.

The pipeline hands ``preview_callback(done, total, x0)`` the current estimate of the clean latents (FLUX.1: scaled
latents, (1, 16, H/8, W/8); FLUX.2: the bn-normalised, patchified grid, (1, 128, H/16, W/16)); this module turns them
into a picture. What it needs of a pipeline's VAE is a ``PreviewCodec`` (``pipeline_codec``): images <-> latents, the
pixels per latent cell, and the view from the loop's estimate to those latents. A pipeline may offer its own
(``pipe.preview_codec()``: FLUX.2 gives its VAE's 32-channel latents at 1/8); otherwise it is FLUX.1's VAE codec.
Two ways to a picture:

- **TAEF1** (``madebyollin/taef1``, diffusers' ``AutoencoderTiny``) when its file is in the models folder at
  ``models/madebyollin/taef1/diffusion_pytorch_model.safetensors`` (with its ``config.json`` when present): a tiny
  decoder, close to the real VAE's picture at a fraction of the cost. It reads the scaled latents directly.
- otherwise a **linear projection**: each latent cell's C channels (FLUX.1 16, FLUX.2 32) times a Cx3 matrix plus
  a bias give that cell's RGB (the picture at 1/8 size, then smoothed up). No extra weights: the matrix is fitted the
  first time the loaded VAE is asked for one, by least squares from its own encode/decode of a few smooth colour fields (and
  blurred copies of their latents, like the early steps' estimates) to the decoded pixels averaged per cell.
  Published FLUX.1 factors could not be checked against the real VAE here, and a matrix fitted once to a demo
  VAE would be wrong for the real one, so the loaded VAE is always the reference; one fit costs one small encode
  and decode (a second on a GPU) and is kept while that VAE is loaded.

``PreviewCache`` keeps the fitted projections (per VAE) and the TAEF1 decoder; ``PreviewStream`` is the callback a
job hands the pipeline: it decides which steps get a preview (every 2 to 4 steps, at most about 3 a second) and
sends each picture on.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import threading
import time
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from PIL import Image

from . import latents as lat

TAEF1_ID = "madebyollin/taef1"
TAEF1_FILE = "diffusion_pytorch_model.safetensors"
TAEF1_CONFIG = dict(latent_channels=16)   # AutoencoderTiny's defaults are TAEF1's otherwise (used without config.json)
LONG_SIDE = 512                            # a preview's longest side at most, in pixels
MIN_INTERVAL_S = 1 / 3                     # at most about 3 previews a second
FIT_SIZE, FIT_IMAGES = 96, 4               # the colour fields the projection is fitted on (a small VAE pass)


@dataclasses.dataclass
class PreviewCodec:
    """What previews need of a pipeline's VAE. ``encode``: (N, 3, H, W) images in [-1, 1] -> (N, C, H/f, W/f)
    latents; ``decode``: the reverse; ``view``: the pipeline's ``x0`` -> such latents; ``factor``: pixels per cell
    of ``x0`` (FLUX.1 8, FLUX.2 16); ``taef1``: whether TAEF1 reads them (FLUX.1's scaled 16-channel latents);
    ``key``: what a fitted projection is kept for (the VAE module)."""

    key: object
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    factor: int = lat.VAE_FACTOR
    view: Callable[[torch.Tensor], torch.Tensor] = lambda z: z
    taef1: bool = True


class Decoder:
    """The pipeline's ``x0`` -> (1, 3, h, w) RGB in [-1, 1]; ``factor``: pixels of the image per cell of ``x0``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], view: Callable[[torch.Tensor], torch.Tensor],
                 factor: int):
        self.fn, self.view, self.factor = fn, view, factor

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return self.fn(self.view(x0))


@dataclasses.dataclass
class LinearProjection:
    """RGB in [-1, 1] of each latent cell: ``rgb = weight.T @ channels + bias`` (weight (C, 3), bias (3,))."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) latents -> (1, 3, h, w) RGB in [-1, 1] (clamped)."""
        z = latents.detach().to(device="cpu", dtype=torch.float32)
        rgb = torch.einsum("bchw,cr->brhw", z, self.weight) + self.bias[None, :, None, None]
        return rgb.clamp(-1, 1)


def colour_fields(count: int = FIT_IMAGES, size: int = FIT_SIZE, seed: int = 0) -> torch.Tensor:
    """(count, 3, size, size) smooth random colour images in [-1, 1]: a few colours each, blended over the image
    (the kind of picture whose latents a projection must read, from flat areas to gradients)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        cells = 2 + k % 4                         # from broad gradients to smaller patches
        coarse = torch.rand((1, 3, cells, cells), generator=generator) * 2 - 1
        out.append(F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1))
    return torch.cat(out)


def fit_projection(encode: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                   images: Optional[torch.Tensor] = None) -> LinearProjection:
    """The least-squares linear map from latent cells to the decoded pixels (averaged over each cell's 8x8), fitted
    on ``images`` ((N, 3, H, W) in [-1, 1]; ``colour_fields()`` by default) through ``encode`` (images -> latents)
    and ``decode`` (latents -> images), with blurred copies of the latents as well."""
    images = colour_fields() if images is None else images
    z = encode(images).float().cpu()
    blurred = F.interpolate(F.avg_pool2d(z, 4), size=z.shape[-2:], mode="bilinear", align_corners=False)
    z = torch.cat([z, blurred])
    pixels = decode(z).float().cpu()
    target = F.adaptive_avg_pool2d(pixels, z.shape[-2:])                # one RGB per latent cell
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)      # the bias column
    solution = torch.linalg.lstsq(x, y).solution
    return LinearProjection(weight=solution[:-1].float(), bias=solution[-1].float())


def pipeline_codec(pipe) -> PreviewCodec:
    """``pipe.preview_codec()`` when the pipeline has one (FLUX.2), else FLUX.1's VAE codec on its placement."""
    own = getattr(pipe, "preview_codec", None)
    if own is not None:
        return own()
    codec, place = lat.VaeCodec(pipe.vae), pipe.placements["vae"]

    def encode(images):
        return pipe.run_model("vae", pipe.vae, lambda m: codec.encode(images, place.compute_device,
                                                                      place.compute_dtype))

    def decode(latents):
        return pipe.run_model("vae", pipe.vae, lambda m: codec.decode(latents, place.compute_device,
                                                                      place.compute_dtype))
    return PreviewCodec(key=pipe.vae, encode=encode, decode=decode)


def pipeline_projection(pipe) -> LinearProjection:
    """A projection fitted on ``pipe``'s loaded VAE (moved in for it like any VAE use), through its codec."""
    codec = pipeline_codec(pipe)
    with torch.no_grad():
        return fit_projection(codec.encode, codec.decode)


def find_taef1(models_dir) -> Optional[pathlib.Path]:
    """TAEF1's weights in the models folder (the seed's layout: ``<models>/madebyollin/taef1/<file>``), or None."""
    if models_dir is None:
        return None
    path = pathlib.Path(models_dir) / TAEF1_ID / TAEF1_FILE
    return path if path.is_file() else None


def load_taef1(path, device="cpu", dtype=torch.float32):
    """diffusers' ``AutoencoderTiny`` with TAEF1's weights (its folder's config.json when present), for decoding."""
    import json

    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file
    path = pathlib.Path(path)
    config_file = path.parent / "config.json"
    config = dict(TAEF1_CONFIG)
    if config_file.is_file():
        config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
    model = AutoencoderTiny(**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


class PreviewCache:
    """What makes previews, kept between jobs: a projection per loaded VAE (fitted on first use, forgotten with the
    VAE) and the TAEF1 decoder while its file stays the same."""

    def __init__(self):
        self._lock = threading.Lock()
        self._projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._taef1: Optional[tuple] = None        # (path, mtime, device, module)

    def decoder(self, pipe, models_dir=None) -> tuple[str, Decoder]:
        """(what it is, the pipeline's x0 -> (1, 3, h, w) RGB in [-1, 1]) for ``pipe``: TAEF1 when its file is there
        and it reads the pipeline's latents, else the VAE's projection."""
        codec = pipeline_codec(pipe)
        path = find_taef1(models_dir) if codec.taef1 else None
        with self._lock:
            if path is not None:
                device = pipe.placements["dit"].compute_device
                key = (str(path), path.stat().st_mtime, str(device))
                if self._taef1 is None or self._taef1[:3] != key:
                    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
                    self._taef1 = (*key, load_taef1(path, device, dtype))
                taef1 = self._taef1[3]
                return "TAEF1", Decoder(lambda z: _tiny_decode(taef1, z), codec.view, codec.factor)
            decoder = self._projections.get(codec.key)
            if decoder is None:
                decoder = self._projections[codec.key] = Decoder(pipeline_projection(pipe), codec.view, codec.factor)
            return "latent projection", decoder


def _tiny_decode(model, latents: torch.Tensor) -> torch.Tensor:
    param = next(model.parameters())
    with torch.no_grad():
        return model.decode(latents.to(device=param.device, dtype=param.dtype)).sample.float().clamp(-1, 1)


def to_image(rgb: torch.Tensor, long_side: int = LONG_SIDE) -> Image.Image:
    """(1, 3, h, w) RGB in [-1, 1] -> a PIL image whose longest side is ``long_side`` at most (smoothed up from a
    projection's 1/8 size, down from a decoder's full size)."""
    h, w = rgb.shape[-2:]
    scale = long_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size != (h, w):
        rgb = F.interpolate(rgb.float().cpu(), size=size, mode="bilinear", align_corners=False,
                            antialias=scale < 1)
    return lat.tensor_to_image(rgb)


def preview_every(steps: int) -> int:
    """Steps between previews: 2 for short jobs, up to 4 for long ones (about 8 to 12 previews)."""
    return min(4, max(2, math.ceil(steps / 10)))


class PreviewStream:
    """A pipeline's ``preview_callback``: every ``preview_every(total)`` steps, and no sooner than ``min_interval``
    seconds after the last one, the estimate becomes a picture for ``send(image, done, total)``."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], send: Callable[[Image.Image, int, int], None],
                 long_side: int = LONG_SIDE, min_interval: float = MIN_INTERVAL_S, clock=time.monotonic):
        self.decode, self.send, self.long_side = decode, send, long_side
        self.min_interval, self.clock = min_interval, clock
        self._last: Optional[float] = None

    def __call__(self, done: int, total: int, latents: torch.Tensor) -> None:
        if done % preview_every(total):
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.min_interval:
            return
        factor = getattr(self.decode, "factor", lat.VAE_FACTOR)      # pixels per cell of the pipeline's latents
        image = to_image(self.decode(latents), min(self.long_side, max(latents.shape[-2:]) * factor))
        self._last = self.clock()
        self.send(image, done, total)
