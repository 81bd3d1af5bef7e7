"""Flow-matching sigma schedules for FLUX.1.

The default is the seed's (DiffSynth-Studio's) FLUX.1 schedule, so a ported script gives the same image:
``num_inference_steps`` sigmas evenly spaced from the start (1, or the image-to-image start) down to
0.003/1.002, warped by a static shift of 3; the last Euler step goes to 0. BFL's reference sampler instead
uses a resolution-dependent exponential shift (mu from the number of image tokens); that is ``schedule="bfl"``.
"""
from __future__ import annotations

import math

import torch

SIGMA_MIN = 0.003 / 1.002
SIGMA_MAX = 1.0
SEED_SHIFT = 3.0
SCHEDULES = ("seed", "bfl")


def start_sigma(denoising_strength: float) -> float:
    """The unshifted sigma an image-to-image run starts from (1.0 for text-to-image)."""
    return SIGMA_MIN + (SIGMA_MAX - SIGMA_MIN) * float(denoising_strength)


def unshifted_sigmas(num_inference_steps: int, denoising_strength: float = 1.0) -> torch.Tensor:
    return torch.linspace(start_sigma(denoising_strength), SIGMA_MIN, int(num_inference_steps), dtype=torch.float64)


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def bfl_mu(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """BFL's linear interpolation of the log-shift from the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def exponential_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_sigmas(num_inference_steps: int, denoising_strength: float = 1.0, sigma_shift: float | None = None,
                schedule: str = "seed", image_seq_len: int | None = None) -> torch.Tensor:
    """The sigmas the denoiser is evaluated at, followed by the terminal 0: shape (steps + 1,), float32.

    ``sigma_shift`` overrides the static shift of the seed schedule (and, with ``schedule="bfl"``, is taken as
    the exponential shift's ``mu`` instead of deriving it from ``image_seq_len``).
    """
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be at least 1")
    if not 0.0 < float(denoising_strength) <= 1.0:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    base = unshifted_sigmas(num_inference_steps, denoising_strength)
    if schedule == "seed":
        sigmas = static_shift(base, SEED_SHIFT if sigma_shift is None else float(sigma_shift))
    elif schedule == "bfl":
        if sigma_shift is None and image_seq_len is None:
            raise ValueError("schedule='bfl' needs image_seq_len (or sigma_shift as mu)")
        mu = float(sigma_shift) if sigma_shift is not None else bfl_mu(image_seq_len)
        sigmas = exponential_shift(base, mu)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the flow ODE, in float32 whatever the model computed in."""
    return latents.float() + velocity.float() * (sigma_next - sigma)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The point on the straight path from image to noise at ``sigma`` (image-to-image start, training)."""
    return (1 - sigma) * clean.float() + sigma * noise.float()
