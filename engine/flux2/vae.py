"""FLUX.2's 32-channel VAE as the pipelines use it: ``Flux2VaeCodec`` (images <-> the transformer's 128-channel latent
grid) and ``Flux2VaeMethods``, the pipeline methods over it that FLUX.2 and FLUX 3 (which uses the same VAE) share:
encoding, decoding, the live preview's codec and the transformer's compute dtype.
"""
from __future__ import annotations

import torch
from PIL import Image

from .. import latents as lat
from ..errors import EngineError
from . import schedule as sch


class Flux2VaeCodec:
    """Images <-> the DiT's 128-channel latent grid with ``AutoencoderKLFlux2``: the posterior's mean, 2x2
    patchified, normalised by the VAE's ``bn`` running statistics (and the reverse for decoding)."""

    def __init__(self, vae):
        self.vae = vae

    def _stats(self, like: torch.Tensor):
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def encode(self, image: torch.Tensor, device, dtype) -> torch.Tensor:
        latents = self.vae.encode(image.to(device=device, dtype=dtype)).latent_dist.mode()
        grid = sch.patchify(latents)
        mean, std = self._stats(grid)
        return ((grid - mean) / std).float()

    def vae_latents(self, grid: torch.Tensor) -> torch.Tensor:
        """The normalised 128-channel grid -> the VAE's own (B, 32, H/8, W/8) latents (``bn`` undone, unpatchified)."""
        mean, std = self._stats(grid)
        return sch.unpatchify(grid * std + mean)

    @torch.no_grad()
    def decode(self, grid: torch.Tensor, device, dtype) -> torch.Tensor:
        return self.vae.decode(self.vae_latents(grid.to(device=device, dtype=dtype))).sample.float()


class Flux2VaeMethods:
    """For a ``PlacedPipeline`` with ``vae`` and ``dit`` slots; ``VAE_MISSING`` says what to add when no VAE is
    loaded."""

    VAE_MISSING = "No FLUX.2 VAE is loaded: add the ModelConfig of vae/diffusion_pytorch_model.safetensors."

    @property
    def dit_dtype(self):
        """The dtype the transformer computes in (its placement's: an fp8-stored one still computes in bf16)."""
        place = self.placements.get("dit")
        if place is not None:
            return place.compute_dtype
        return next(self.dit.parameters()).dtype if self.dit is not None else self.torch_dtype

    def _codec(self) -> Flux2VaeCodec:
        if self.vae is None:
            raise EngineError(self.VAE_MISSING)
        return Flux2VaeCodec(self.vae)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> (1, 128, H/16, W/16) normalised latent grid, float32."""
        codec, dtype = self._codec(), next(self.vae.parameters()).dtype
        return self.run_model("vae", self.vae, lambda m: codec.encode(x, self.device, dtype))

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """PIL -> (1, 128, H/16, W/16) normalised latent grid, float32."""
        return self.encode_pixels(lat.image_to_tensor(image))

    def decode_latents(self, grid: torch.Tensor) -> Image.Image:
        codec, dtype = self._codec(), next(self.vae.parameters()).dtype
        pixels = self.run_model("vae", self.vae, lambda m: codec.decode(grid, self.device, dtype))
        return lat.tensor_to_image(pixels)

    def preview_codec(self):
        """What ``engine.preview`` fits its latent -> RGB projection through: the VAE's own 32-channel latents at
        1/8 (the projection reads 32 channels per 8 pixels, as for FLUX.1's 16); ``view`` turns the loop's
        128-channel estimate (one cell per 16 pixels) into them."""
        from ..preview import PreviewCodec
        codec, place = self._codec(), getattr(self, "placements", {}).get("vae")
        device, dtype = ((place.compute_device, place.compute_dtype) if place is not None
                         else (self.device, next(self.vae.parameters()).dtype))

        def encode(images):
            return self.run_model("vae", self.vae, lambda m: codec.vae_latents(codec.encode(images, device, dtype)))

        def decode(latents):
            return self.run_model("vae", self.vae, lambda m: m.decode(latents.to(device, dtype)).sample.float())
        return PreviewCodec(key=self.vae, encode=encode, decode=decode, factor=sch.CELL,
                            view=lambda grid: codec.vae_latents(grid.float().cpu()), taef1=False)
