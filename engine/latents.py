"""Latent bookkeeping shared by every FLUX variant: noise, 2x2 packing into tokens, position ids, VAE codec."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

LATENT_CHANNELS = 16
VAE_FACTOR = 8        # pixels per latent cell
TOKEN_FACTOR = 16     # pixels per image token (a 2x2 patch of latent cells)


def initial_noise(height: int, width: int, seed: int, rand_device: str = "cpu") -> torch.Tensor:
    """(1, 16, H/8, W/8) float32 noise from ``torch.Generator(rand_device).manual_seed(seed)``, as the seed does,
    so a seed gives the same image on any GPU when the noise is drawn on the CPU."""
    generator = torch.Generator(rand_device).manual_seed(int(seed))
    return torch.randn((1, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR), generator=generator,
                       device=rand_device, dtype=torch.float32)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): each token is a 2x2 patch, channels outermost (BFL's layout)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for an image of ``height`` x ``width`` pixels."""
    b, _, d = tokens.shape
    h, w = height // TOKEN_FACTOR, width // TOKEN_FACTOR
    x = tokens.view(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h * 2, w * 2)


def image_ids(height: int, width: int, index: float = 0.0, offset=(0, 0), device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (tokens, 3) = [index, row, col] for the image's token grid (index marks reference images)."""
    h, w = height // TOKEN_FACTOR, width // TOKEN_FACTOR
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None] + offset[0]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :] + offset[1]
    return ids.reshape(h * w, 3)


def text_ids(num_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


def image_to_tensor(image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1]. A (1, 3, H, W) tensor already in [-1, 1] passes through as
    float32: FLUX.1-Fill's masked image is 0 (mid-grey) where masked, a value 8-bit pixels cannot hold."""
    if isinstance(image, torch.Tensor):
        return image.float()
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1.0


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> PIL RGB, rounding to the nearest 8-bit value."""
    x = ((tensor[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


class VaeCodec:
    """Encodes images to scaled FLUX latents and back with a diffusers ``AutoencoderKL``.

    Encoding takes the posterior's mean (deterministic, as the seed does). ``tiled`` processes the image in
    overlapping tiles of ``tile_size`` latent cells with ``tile_stride`` between them, as the seed's parameters
    mean, using diffusers' tiled encode/decode.
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(cfg.shift_factor or 0.0)

    def _configure_tiling(self, tiled: bool, tile_size: int, tile_stride: int):
        vae = self.vae
        if not tiled:
            vae.disable_tiling()
            return
        if not 0 < tile_stride <= tile_size:
            raise ValueError(f"tile_stride ({tile_stride}) must be between 1 and tile_size ({tile_size})")
        vae.enable_tiling()
        vae.tile_latent_min_size = int(tile_size)
        vae.tile_sample_min_size = int(tile_size) * VAE_FACTOR
        vae.tile_overlap_factor = 1.0 - tile_stride / tile_size

    @torch.no_grad()
    def encode(self, image: torch.Tensor, device, dtype, tiled=False, tile_size=128, tile_stride=64) -> torch.Tensor:
        self._configure_tiling(tiled, tile_size, tile_stride)
        posterior = self.vae.encode(image.to(device=device, dtype=dtype)).latent_dist
        return ((posterior.mean - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, device, dtype, tiled=False, tile_size=128, tile_stride=64) -> torch.Tensor:
        self._configure_tiling(tiled, tile_size, tile_stride)
        z = latents.to(device=device, dtype=dtype) / self.scaling + self.shift
        return self.vae.decode(z).sample.float()
