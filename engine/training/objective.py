"""The seed's flow-matching training objective for FLUX.1 (DiffSynth-Studio's ``FlowMatchSFTLoss``).

- Timesteps: the seed's FLUX.1 schedule at 1000 steps (linspace from 1 to 0.003/1.002, static shift 3), one drawn
  uniformly per step.
- Noisy input: ``x_t = (1 - sigma) x0 + sigma * noise``; target: the velocity ``noise - x0``.
- Loss: ``mse(prediction, target) * w(sigma)`` with the seed's bell-shaped weight over the timestep index
  ``t = 1000 sigma``: ``y = exp(-2 ((t - 500) / 1000)^2)``, shifted so its minimum is 0 and scaled to mean 1 over
  the 1000 timesteps.
- The transformer gets sigma as its timestep (diffusers scales by 1000 itself) and the seed's training guidance 1.

Randomness comes from a generator the caller seeds per sample (``sample_generator``: the sample's place in its
epoch's order), so a resumed run, or the same run on another number of processes, draws exactly the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import latents as lat
from ..conditions import kontext as kontext_mod
from ..scheduler import SEED_SHIFT, add_noise, static_shift, unshifted_sigmas

NUM_TRAIN_TIMESTEPS = 1000
TRAINING_GUIDANCE = 1.0   # the seed's training inputs set embedded_guidance=1


class TrainingSchedule:
    """The 1000 training sigmas and their loss weights."""

    def __init__(self, num_timesteps: int = NUM_TRAIN_TIMESTEPS, shift: float = SEED_SHIFT):
        self.sigmas = static_shift(unshifted_sigmas(num_timesteps), shift).to(torch.float32)
        self.timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS
        self.weights = bell_weights(self.timesteps)

    def __len__(self) -> int:
        return len(self.sigmas)

    def sample(self, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> tuple[int, float, float]:
        """(index, sigma, weight) of one timestep drawn uniformly from [low, high) of the schedule."""
        lo, hi = int(low * len(self)), int(high * len(self))
        i = int(torch.randint(lo, hi, (1,), generator=generator))
        return i, float(self.sigmas[i]), float(self.weights[i])


def bell_weights(timesteps: torch.Tensor, steps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The seed's loss weight per timestep (mean 1 over the 1000-step schedule)."""
    y = torch.exp(-2 * ((timesteps - steps / 2) / steps) ** 2)
    shifted = y - y.min()
    w = shifted * (steps / shifted.sum())
    if len(timesteps) != steps:   # the seed's empirical correction for other schedule lengths
        w = w * (len(timesteps) / steps)
        w = w + w[1]
    return w


@dataclass
class TrainingInputs:
    """What one step trains on, already encoded (no gradient through the encoders)."""
    latents: torch.Tensor          # (1, 16, H/8, W/8) clean image latents x0, float32
    prompt_emb: torch.Tensor       # (1, T, 4096)
    pooled: torch.Tensor           # (1, 768)
    height: int
    width: int
    kontext: Optional[kontext_mod.KontextTokens] = None


def flow_matching_loss(dit, inputs: TrainingInputs, sigma: float, weight: float, noise: torch.Tensor,
                       dtype: torch.dtype, guidance: float = TRAINING_GUIDANCE) -> torch.Tensor:
    """The weighted flow-matching MSE of ``dit`` (diffusers' FluxTransformer2DModel) on one image."""
    device = inputs.latents.device
    x0 = inputs.latents.float()
    noisy = add_noise(x0, noise.to(device), sigma)
    target = noise.to(device).float() - x0
    tokens = lat.pack(noisy).to(dtype)
    img_ids = lat.image_ids(inputs.height, inputs.width, device=device)
    txt_ids = lat.text_ids(inputs.prompt_emb.shape[1], device=device)
    hidden, ids = kontext_mod.join(tokens, img_ids, inputs.kontext)
    t = torch.full((1,), sigma, device=device, dtype=dtype)
    g = torch.full((1,), guidance, device=device, dtype=torch.float32) if dit.config.guidance_embeds else None
    pred = dit(hidden_states=hidden, encoder_hidden_states=inputs.prompt_emb.to(dtype),
               pooled_projections=inputs.pooled.to(dtype), timestep=t, img_ids=ids, txt_ids=txt_ids, guidance=g,
               return_dict=False)[0]
    pred = kontext_mod.generated_part(pred, tokens.shape[1])
    return F.mse_loss(pred.float(), lat.pack(target).float()) * weight


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The generator of one training sample's timestep and noise: keyed by the sample's place in the epoch's shuffled
    order (``epoch``, ``position``), not by the step or the process, so the same sample draws the same timestep and
    noise whatever the number of processes or the gradient accumulation (2 processes x 1 step = 1 process x 2
    accumulated steps), and a resumed run draws what the uninterrupted one drew. On the CPU, so a seed trains the same
    on any GPU."""
    key = int(seed) * 7_919 + int(epoch) * 1_000_003 + int(position) * 104_729
    return torch.Generator("cpu").manual_seed(key % (2 ** 63))


@torch.no_grad()
def fixed_loss(dit, inputs: list, dtype: torch.dtype, sigmas=(0.2, 0.4, 0.6, 0.8), seed: int = 1234,
               loss: Optional[Callable] = None) -> float:
    """The unweighted flow-matching loss (``loss``: the family's, FLUX.1's by default) averaged over ``inputs`` at
    fixed sigmas with fixed noise: a steady measure of fit (the training loss of single steps is noisy by design)."""
    loss = loss or flow_matching_loss
    total, n = 0.0, 0
    for j, item in enumerate(inputs):
        g = torch.Generator("cpu").manual_seed(seed + j)
        for sigma in sigmas:
            noise = torch.randn(item.latents.shape, generator=g, dtype=torch.float32)
            total += float(loss(dit, item, float(sigma), 1.0, noise, dtype))
            n += 1
    return total / max(1, n)
