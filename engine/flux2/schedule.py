"""FLUX.2's sigma schedules, noise and token layout.

``schedule="seed"`` (default) is DiffSynth-Studio's ``FlowMatchScheduler("FLUX.2")``: ``num_inference_steps``
sigmas evenly spaced in float32 from the start (1, or ``1/N + (1 - 1/N) * denoising_strength`` for image to image)
down to 1/N, warped by BFL's exponential shift with the empirical mu of the image's token count and the number of
steps; the last Euler step goes to 0. ``schedule="diffusers"`` is diffusers' ``Flux2KleinPipeline``: the same sigmas
for text to image (linspace(1, 1/N, N) in float64 then float32, shifted by the scheduler with the same mu); for image
to image, diffusers' img2img convention of skipping the first ``N - int(N * strength)`` steps of the full schedule.

The transformer is called with ``timestep = bf16(sigma * 1000) / 1000`` in the compute dtype, as both references do
(the model multiplies by 1000 again).

Noise (the seed's convention, which diffusers' ``randn_tensor`` on a CPU generator shares): ``torch.randn`` of shape
(1, 128, H/16, W/16) from ``torch.Generator(rand_device).manual_seed(seed)`` in the pipeline's dtype; tokens are its
128 channels per 16-pixel cell, in row-major order: ``(1, 128, h, w) -> (1, h*w, 128)``. The 128 channels are the
32 latent channels of each 2x2 latent patch, channel-major (c, p, q), normalised by the VAE's ``bn`` statistics.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("seed", "diffusers")
CHANNELS = 128           # DiT input channels: 32 latent channels x 2 x 2
CELL = 16                # pixels per token
REFERENCE_T = 10         # reference image k (from 0) has position t = REFERENCE_T * (k + 1)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's fitted log-shift: linear in the token count, interpolated in the number of steps (10 -> 200), and for
    more than 4300 tokens the 200-step line alone."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def flux2_sigmas(num_inference_steps: int, denoising_strength: float = 1.0, image_seq_len: int = 4096,
                 schedule: str = "seed") -> torch.Tensor:
    """The sigmas the transformer is evaluated at, then the terminal 0: (steps + 1,) float32 (fewer steps for the
    diffusers img2img convention)."""
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError("num_inference_steps must be at least 1")
    strength = float(denoising_strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    mu = empirical_mu(image_seq_len, n)
    if schedule == "seed":
        low = 1 / n
        base = torch.linspace(low + (1.0 - low) * strength, low, n)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    elif schedule == "diffusers":
        import numpy as np
        base = np.linspace(1.0, 1 / n, n).astype(np.float32)
        sigmas = torch.from_numpy(math.exp(mu) / (math.exp(mu) + (1 / base - 1)) ** 1.0).to(torch.float32)
        start = int(max(n - min(n * strength, n), 0))
        sigmas = sigmas[start:]
        if len(sigmas) == 0:
            raise ValueError(f"denoising_strength {denoising_strength} leaves no step of {n}")
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1)])


def model_timestep(sigma: torch.Tensor, dtype) -> torch.Tensor:
    """What the transformer is given for a sigma: (sigma x 1000) rounded to the compute dtype, over 1000."""
    return (sigma.to(torch.float32) * 1000).to(dtype) / 1000


def initial_noise(height: int, width: int, seed, rand_device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """(1, 128, H/16, W/16) noise in ``dtype`` (the seed draws it in the pipeline's dtype); None seed = random."""
    generator = None if seed is None else torch.Generator(rand_device).manual_seed(int(seed))
    return torch.randn((1, CHANNELS, height // CELL, width // CELL), generator=generator, device=rand_device,
                       dtype=dtype)


def to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    b, c, h, w = grid.shape
    return grid.reshape(b, c, h * w).permute(0, 2, 1)


def from_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w) for an image of ``height`` x ``width`` pixels."""
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height // CELL, width // CELL)


def image_ids(height: int, width: int, t: int = 0, device=None) -> torch.Tensor:
    """(h*w, 4) position ids (t, row, col, 0) of an image's tokens; references use t = 10, 20, ..."""
    h, w = height // CELL, width // CELL
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.zeros(1, dtype=torch.long)
                                ).to(device)


def text_ids(length: int, device=None) -> torch.Tensor:
    """(L, 4) position ids (0, 0, 0, l) of the prompt's tokens."""
    z = torch.zeros(1, dtype=torch.long)
    return torch.cartesian_prod(z, z, z, torch.arange(length)).to(device)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, 32, H/8, W/8) VAE latents -> (B, 128, H/16, W/16): each 2x2 patch's channels, (c, p, q) order."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(grid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, c4, h, w = grid.shape
    x = grid.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)
