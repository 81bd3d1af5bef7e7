"""Peak activation memory of one call of a component (batch 1), from its widths and the job's size.

Fitted on CPU runs of the real-width modules (tests/test_vram.py documents the method): FLUX block peak ~24 x tokens
x hidden elements (attention by SDPA, no N^2 matrix); the VAE decoder's last up-blocks ~8 x pixels x 128 channels;
T5 ~ sequence x (3 d_ff + 6 d_model). Rounded up. One estimate per role in ``ESTIMATES``; a role not named there
gets a guess from its size. Pure: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sizes import ITEMSIZE, ComponentSize

DIT_ACT_FACTOR = 28
VAE_ACT_FACTOR = 9
UNKNOWN_ACT_FRACTION = 0.05     # an adapter the table does not know: 5% of its weights' size
SIGLIP_TOKENS = 729             # SigLIP so400m at 384 px: 27 x 27 patches of 14 px
SIGLIP_HEAD_DIM = 72            # so400m: 1152 wide, 16 heads


@dataclass(frozen=True)
class Job:
    """What an estimate depends on besides the component: the image size and the text tokens beside it."""

    width: int
    height: int
    text_tokens: int = 512       # T5's sequence (and EliGen's entity prompts, Redux's image tokens, ...)
    itemsize: int = 2            # bytes per element in the compute dtype

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)


def _dit(size: ComponentSize, job: Job) -> float:
    return DIT_ACT_FACTOR * (job.image_tokens + job.text_tokens) * size.dims.get("hidden", 3072)


def _vae(size: ComponentSize, job: Job) -> float:
    return VAE_ACT_FACTOR * job.width * job.height * size.dims.get("channels", 128)


def _t5(size: ComponentSize, job: Job) -> float:
    d, f = size.dims.get("d_model", 4096), size.dims.get("d_ff", 10240)
    heads = max(1, d // 64)       # T5 v1.1: 64 per head; the scores (with the position bias) are materialised
    n = job.text_tokens
    return n * (3 * f + 6 * d) + 2 * heads * n ** 2


def _clip(size: ComponentSize, job: Job) -> float:
    return 77 * size.dims.get("hidden", 768) * 16


def _controlnet(size: ComponentSize, job: Job) -> float:
    """Its own forward (as the transformer's, per token) + the residuals it hands the transformer, one per block."""
    hidden = size.dims.get("hidden", 3072)
    return (DIT_ACT_FACTOR * (job.image_tokens + job.text_tokens) + size.dims.get("outputs", 15) * job.image_tokens) \
        * hidden


def _qwen_vl(size: ComponentSize, job: Job) -> float:
    """640 text tokens + the reference image's tokens (one per 28x28 pixels); one layer's hidden states and MLP."""
    d, f = size.dims.get("hidden", 3584), size.dims.get("d_ff", 18944)
    tokens = 640 + (job.width // 28 + 1) * (job.height // 28 + 1)
    return tokens * (12 * d + 3 * f)


def _siglip(size: ComponentSize, job: Job) -> float:
    """One image at 384 px whatever the job's size (the processor resizes it): one layer's hidden states and MLP,
    as Qwen's, plus the attention scores in case the eager attention materialises them."""
    n = size.dims.get("tokens", SIGLIP_TOKENS)
    d, f = size.dims.get("hidden", 1152), size.dims.get("d_ff", 4304)
    heads = max(1, d // SIGLIP_HEAD_DIM)
    return n * (12 * d + 3 * f) + 2 * heads * n ** 2


def _redux_embedder(size: ComponentSize, job: Job) -> float:
    """SigLIP's tokens through Linear -> SiLU -> Linear: the input, the wide middle (before and after SiLU), the
    output."""
    d_in, f, d_out = size.dims.get("d_in", 1152), size.dims.get("d_ff", 12288), size.dims.get("d_out", 4096)
    return SIGLIP_TOKENS * (d_in + 2 * f + d_out)


FLUX2_TEXT_TOKENS = 512         # FLUX.2's prompts are padded to 512 tokens (max_sequence_length)


def _decoder(size: ComponentSize, job: Job) -> float:
    """FLUX.2's text encoder on the padded prompt: every layer's hidden states are kept (the transformer reads three
    of them), one layer's working set as Qwen's, the attention scores in case they are materialised, and the three
    chosen states stacked and reshaped."""
    d, f = size.dims.get("hidden", 2560), size.dims.get("d_ff", 9728)
    heads, layers = size.dims.get("heads", 32), size.dims.get("layers", len(size.blocks) or 28)
    n = min(job.text_tokens, FLUX2_TEXT_TOKENS)
    return n * ((layers + 1) * d + 12 * d + 3 * f + 6 * d) + 2 * heads * n ** 2


# Elements of peak activation memory per role; multiplied by the compute dtype's item size.
ESTIMATES = {
    "dit": _dit, "vae": _vae, "text_encoder_2": _t5, "text_encoder_1": _clip, "controlnet": _controlnet,
    "infinityou_infusenet": _controlnet,           # InfiniteYou's InfuseNet is a FLUX ControlNet
    "qwen_vl": _qwen_vl, "nexus_gen": _qwen_vl, "flux_redux_image_encoder": _siglip, "flux_redux_image_embedder": _redux_embedder,
    "ipadapter_image_encoder": _siglip, "text_encoder": _decoder,
}


def activation_bytes(role: str, size: ComponentSize, compute: str, width: int, height: int,
                     t5_sequence_length: int = 512) -> int:
    """Peak activation memory of one call of the component at this resolution (batch 1)."""
    job = Job(width, height, t5_sequence_length, ITEMSIZE.get(compute, 2))
    estimate = ESTIMATES.get(role)
    if estimate is None:
        return int(UNKNOWN_ACT_FRACTION * size.params * job.itemsize)
    return int(estimate(size, job) * job.itemsize)
