"""FLUX 3 Image Klein's sigma schedule, noise, token layout and position ids.

Two conventions, chosen by the pipeline's ``schedule`` argument: ``"seed"`` (DiffSynth-Studio's ``Flux3ImagePipeline``,
the default) and ``"diffusers"`` (diffusers' modular FLUX 3 pipelines, ``Flux3SetTimestepsStep`` /
``Flux3PrepareLatentsStep``).

Sigmas. The seed's formula (the issue's): sigma = a*u / (1 + (a - 1)*u) with a = ``alpha`` = 6.93 and no resolution
shift. diffusers gets the same numbers another way: ``Flux3SetTimestepsStep(shift=6.93)`` passes
``sigmas = np.linspace(1, 1/N, N)`` to ``FlowMatchEulerDiscreteScheduler(shift=6.93)``, whose static shift is
exactly that formula with shift = a (``use_dynamic_shifting`` off: no mu, nothing depends on the image size). So
the u grid is ``linspace(1, 1/N, N)`` -- the N first points of ``linspace(1, 0, N + 1)`` -- and the Euler loop ends
at sigma 0 (the scheduler appends it). Where they differ: diffusers builds u in float64, casts to float32 and shifts
in float32 numpy; the seed's convention here builds u with ``torch.linspace`` in float32 and shifts in float32 torch
(at most an ulp apart; 16 steps: identical, the tests print it). Image to image (``denoising_strength`` s < 1,
seed only; diffusers' modular FLUX 3 has no noised-input mode): u starts at 1/N + (1 - 1/N)*s, as DiffSynth-Studio's
FLUX.2 scheduler does (its FLUX 3 code is not visible offline), so s = 1 is the grid above.

Timesteps. The transformer takes a flow timestep in [0, 1] and multiplies it by 1000 itself. diffusers passes
``(sigma*1000)/1000`` cast to the compute dtype; the seed's convention (as FLUX.2's in DiffSynth-Studio) is
``dtype(sigma*1000)/1000`` -- the same in float32, one bf16 rounding apart in bf16. The step-distilled (flow-map)
model also gets the timestep the step jumps to (the next sigma, 0 after the last) through its ``ref_time_in``
(diffusers: ``target_timestep_embedder``); references and text sit at timestep 0 inside the model.

Noise. The seed draws it as (tokens, 128): ``torch.randn((1, h*w, 128))`` from ``torch.Generator(rand_device)
.manual_seed(seed)`` in the pipeline's dtype, token i = row i // w, column i % w. diffusers draws a grid
``randn((1, 128, h, w))`` in float32 (then casts) and packs it ``flatten(2).transpose(1, 2)``: the same random
numbers in another order, so one seed gives different images under the two conventions (``initial_noise`` takes
either layout).

Position ids (t, h, w, l), both conventions: the output's tokens (0, 0.5*row, 0.5*col, 0); reference i (from 0) is its
own stream with (0, 0.5*row, 0.5*col, -(i + 1)); the prompt's tokens (0, 0, 0, k).
"""
from __future__ import annotations

import numpy as np
import torch

SCHEDULES = ("seed", "diffusers")
CHANNELS = 128           # DiT input channels: 32 latent channels x 2 x 2
CELL = 16                # pixels per token
ALPHA = 6.93             # the schedule's constant shift
IMAGE_ROPE_SCALE = 0.5   # the image axes of the position ids are scaled by this
STEPS = 16               # the distilled model's steps


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")


def flux3_sigmas(num_inference_steps: int = STEPS, denoising_strength: float = 1.0, alpha: float = ALPHA,
                 schedule: str = "seed") -> torch.Tensor:
    """The sigmas the transformer is evaluated at, then the terminal 0: (steps + 1,) float32."""
    check_schedule(schedule)
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError("num_inference_steps must be at least 1")
    strength = float(denoising_strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    a = float(alpha)
    if a <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if schedule == "seed":
        low = 1 / n
        u = torch.linspace(low + (1.0 - low) * strength, low, n)
        sigmas = a * u / (1 + (a - 1) * u)
    else:
        if strength != 1.0:
            raise ValueError("diffusers' modular FLUX 3 pipelines have no image to image by noising "
                             "(denoising_strength < 1): use schedule='seed'.")
        u = np.linspace(1.0, 1 / n, n).astype(np.float32)
        sigmas = torch.from_numpy(a * u / (1 + (a - 1) * u)).to(torch.float32)
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1)])


def model_timestep(sigma: torch.Tensor, dtype, schedule: str = "seed") -> torch.Tensor:
    """What the transformer is given for a sigma (it multiplies by 1000 itself)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if schedule == "seed":
        return (sigma * 1000).to(dtype) / 1000
    return ((sigma * 1000) / 1000).to(dtype)


def initial_noise(height: int, width: int, seed, rand_device: str = "cpu", dtype=torch.float32,
                  schedule: str = "seed") -> torch.Tensor:
    """(1, h*w, 128) tokens of noise (None seed = random): drawn as tokens (seed) or as a (1, 128, h, w) grid in
    float32 and packed (diffusers)."""
    check_schedule(schedule)
    h, w = height // CELL, width // CELL
    generator = None if seed is None else torch.Generator(rand_device).manual_seed(int(seed))
    if schedule == "seed":
        return torch.randn((1, h * w, CHANNELS), generator=generator, device=rand_device, dtype=dtype)
    grid = torch.randn((1, CHANNELS, h, w), generator=generator, device=rand_device, dtype=torch.float32)
    return to_tokens(grid.to(dtype))


def to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major."""
    return grid.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w) for an image of ``height`` x ``width`` pixels."""
    b, n, c = tokens.shape
    h, w = height // CELL, width // CELL
    if n != h * w:
        raise ValueError(f"{n} tokens do not make a {width}x{height} image ({h * w} tokens)")
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


def image_ids(rows: int, cols: int, index: int = 0, scale: float = IMAGE_ROPE_SCALE, device=None) -> torch.Tensor:
    """(rows*cols, 4) float32 position ids (0, scale*row, scale*col, index) of a token grid; the output has index 0,
    reference i (from 0) index -(i + 1)."""
    ids = torch.cartesian_prod(torch.zeros(1), torch.arange(rows, dtype=torch.float32),
                               torch.arange(cols, dtype=torch.float32), torch.tensor([float(index)]))
    ids[:, 1:3] *= scale
    return ids.to(device)


def text_ids(length: int, device=None) -> torch.Tensor:
    """(L, 4) float32 position ids (0, 0, 0, k) of the prompt's tokens."""
    z = torch.zeros(1)
    return torch.cartesian_prod(z, z, z, torch.arange(length, dtype=torch.float32)).to(device)
