"""Context parallelism on a loaded pipeline's transformer: diffusers' Ulysses / ring attention
(``ModelMixin.enable_parallelism`` with a ``ContextParallelConfig``), checked before it starts and guarded while it
runs, so a layout or an input it cannot take is an error that names the fix rather than a wrong image or a hang.

Each rank holds the whole transformer and computes on 1/N of the tokens; around every attention the ranks swap
heads for tokens (Ulysses: all-to-all, heads must divide by its degree) or pass key/value blocks round (ring: needs
an attention kernel that returns the log-sum-exp: cuDNN's or flash, on CUDA). ``proj_out``'s output is gathered, so
every rank gets the whole velocity and runs the same Euler step on the same latents.

What it refuses, and why:
- an attention backend without context parallel support ("efficient": diffusers would drop the config and each rank
  would attend to its own tokens only), and ring attention with torch's plain SDPA ("auto"/"sdpa": no log-sum-exp),
  when enabling and again at every call (``set_acceleration`` may change it later);
- token counts that do not divide by the world size, unless ``uneven=True`` (diffusers' "anything" modes);
- inputs computed over the whole sequence outside the transformer: ControlNet residuals, attention masks and other
  attention kwargs (EliGen, IP-Adapter), attention processors that are not diffusers' own;
- a transformer streamed or offloaded by the memory plan, and the step caches (each rank would decide to skip on its
  own tokens and the ranks would part ways).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from . import plans
from .group import ParallelError, Ranks, current

RING_CHOICES = ("flash", "cudnn")                      # pipeline attention choices whose kernels give the LSE
ULYSSES_CHOICES = ("auto", "sdpa", "flash", "cudnn")   # ... with diffusers' context parallel support
ALLOWED_ATTENTION_KWARGS = {"scale"}                   # the LoRA scale; anything else is computed over all tokens


@dataclass(frozen=True)
class ContextParallel:
    """What ``enable_context_parallel`` set up (``pipe.context_parallel``)."""
    ranks: Ranks
    ulysses_degree: int
    ring_degree: int
    uneven: bool
    family: str

    def describe(self) -> str:
        how = " x ".join(f"{name} {n}" for name, n in (("Ulysses", self.ulysses_degree), ("ring", self.ring_degree))
                         if n > 1)
        return (f"{self.family} on {self.ranks.world_size} processes ({how}, {self.ranks.backend}"
                f"{', uneven splits' if self.uneven else ''})")


def degrees(world_size: int, ulysses_degree: Optional[int] = None, ring_degree: Optional[int] = None) -> tuple:
    """(ulysses, ring) filling the world: an unset one takes what the other leaves (both unset: all Ulysses)."""
    if ulysses_degree is None and ring_degree is None:
        return world_size, 1
    if ulysses_degree is None:
        ulysses_degree = world_size // int(ring_degree) if int(ring_degree) > 0 else 0
    if ring_degree is None:
        ring_degree = world_size // int(ulysses_degree) if int(ulysses_degree) > 0 else 0
    return int(ulysses_degree), int(ring_degree)


def check_layout(dit, world_size: int, ulysses_degree: int, ring_degree: int, uneven: bool = False,
                 attention: str = "auto", device_type: str = "cuda") -> None:
    """ParallelError unless this layout can run ``dit`` on ``world_size`` processes with the pipeline's attention
    choice on ``device_type``. Needs no process group."""
    family = plans.family_of(dit)
    if ulysses_degree < 1 or ring_degree < 1:
        raise ParallelError(f"The Ulysses and ring degrees must be 1 or more (got {ulysses_degree} and {ring_degree}).")
    if world_size < 2:
        raise ParallelError("Context parallelism needs 2 or more processes: start with torchrun --nproc_per_node=N, "
                            "N >= 2 (one process per GPU).")
    if ulysses_degree * ring_degree != world_size:
        raise ParallelError(f"Ulysses degree {ulysses_degree} x ring degree {ring_degree} = "
                            f"{ulysses_degree * ring_degree}, but {world_size} processes were started: their product "
                            f"must equal the number of processes (e.g. --ulysses {world_size}).")
    heads = int(dit.config.num_attention_heads)
    if ulysses_degree > 1 and heads % ulysses_degree and not uneven:
        raise ParallelError(f"{family} has {heads} attention heads, which do not divide among {ulysses_degree} "
                            f"Ulysses ranks: use a Ulysses degree that divides {heads}, ring attention for the rest, "
                            f"or uneven=True (--uneven).")
    if uneven and ulysses_degree > 1 and ring_degree > 1:
        raise ParallelError("Uneven splits work with Ulysses alone or ring alone (diffusers' ulysses_anything / "
                            "ring_anything), not both: drop uneven or one of the degrees.")
    if attention not in ULYSSES_CHOICES:
        raise ParallelError(f"The attention backend {attention!r} has no context parallel support in diffusers: "
                            f"choose one of {', '.join(ULYSSES_CHOICES)} (set_acceleration(attention_backend=...)).")
    if ring_degree > 1 and (attention not in RING_CHOICES or device_type != "cuda"):
        raise ParallelError(f"Ring attention needs an attention kernel that returns the log-sum-exp, cuDNN's or "
                            f"flash on CUDA GPUs (attention backend 'cudnn' or 'flash'); this pipeline uses "
                            f"{attention!r} on {device_type}. Choose one of those, or Ulysses alone.")


def _check_placement(pipe, ranks: Ranks) -> None:
    place = getattr(pipe, "placements", {}).get("dit")
    if place is not None and (place.streamed or place.offloaded):
        raise ParallelError("Context parallelism needs the whole transformer resident on each GPU, but the memory "
                            "plan streams or offloads it: load without a VRAM limit (vram_limit=None).")
    device = next(pipe.dit.parameters()).device
    if device.type != torch.device(ranks.device).type:
        raise ParallelError(f"The transformer is on {device}, but this process computes on {ranks.device}: load "
                            f"the pipeline with device={ranks.device!r}.")
    settings = getattr(getattr(pipe, "acceleration", None), "settings", None)
    if settings is not None and settings.step_cache:
        raise ParallelError("The step cache cannot run with context parallelism (each rank would decide to skip on its "
                            "own tokens): set_acceleration(step_cache=0) first.")


@contextmanager
def _accelerator_count_on_cpu():
    """diffusers computes the rank's device as ``rank % torch.accelerator.device_count()``, a division by zero on a
    machine with no accelerator; a CPU (gloo) group counts as one device for that sum only."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(pipe, ulysses_degree: Optional[int] = None, ring_degree: Optional[int] = None,
                            uneven: bool = False, attention: Optional[str] = None) -> ContextParallel:
    """Run ``pipe.dit`` (a pipeline's transformer, or ``pipe`` itself when it is the transformer) with context
    parallelism over the process group (``init_group`` first, in every process). Degrees default to all Ulysses;
    ``uneven`` allows token counts (and, for Ulysses, head counts) that do not divide. Once on, it stays on for the
    transformer's life. ``attention``: the attention choice the calls will run with (None: the pipeline's
    ``set_acceleration`` setting; "auto" for a bare transformer). Returns what was set up (also
    ``pipe.context_parallel``)."""
    from diffusers import ContextParallelConfig
    ranks = current()
    dit = getattr(pipe, "dit", pipe)
    if dit is None:
        raise ParallelError("No transformer is loaded (pipe.dit is None): load the model first.")
    if getattr(dit, "_parallel_config", None) is not None:
        raise ParallelError("Context parallelism is already on for this transformer (it cannot be set twice).")
    ulysses_degree, ring_degree = degrees(ranks.world_size, ulysses_degree, ring_degree)
    settings = getattr(getattr(pipe, "acceleration", None), "settings", None)
    if attention is None:
        attention = settings.attention_backend if settings is not None else "auto"
    check_layout(dit, ranks.world_size, ulysses_degree, ring_degree, uneven, attention,
                 torch.device(ranks.device).type)
    if dit is not pipe:
        _check_placement(pipe, ranks)
    config = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree,
                                   ulysses_anything=uneven and ulysses_degree > 1,
                                   ring_anything=uneven and ring_degree > 1)
    with _accelerator_count_on_cpu():
        dit.enable_parallelism(config=config, cp_plan=plans.cp_plan(dit))
    allowed = RING_CHOICES if ring_degree > 1 else ULYSSES_CHOICES
    now = (lambda: pipe.acceleration.settings.attention_backend) if settings is not None else None
    dit.register_forward_pre_hook(InputGuard(dit, ranks.world_size, uneven, now, allowed), with_kwargs=True)
    info = ContextParallel(ranks, ulysses_degree, ring_degree, uneven, plans.family_of(dit))
    if dit is not pipe:
        pipe.context_parallel = info
    return info


def attention_modules(dit) -> list:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention
    return [m for m in dit.modules() if isinstance(m, (Attention, AttentionModuleMixin))]


class InputGuard:
    """A forward pre-hook on the transformer, before diffusers' split: ParallelError for inputs context parallelism
    would cut wrongly or not at all (see the module's doc); planned inputs the call leaves out are passed as None."""

    def __init__(self, dit, world_size: int, uneven: bool, attention_now=None, attention_allowed=ULYSSES_CHOICES):
        self.world_size, self.uneven = world_size, uneven
        self.attention_now, self.attention_allowed = attention_now, attention_allowed
        self.token_names, self.id_names = plans.token_inputs(dit)
        self.signature = inspect.signature(type(dit).forward)
        self.attention = attention_modules(dit)
        self.config = dit._parallel_config

    def __call__(self, module, args, kwargs):
        bound = self.signature.bind_partial(module, *args, **kwargs).arguments
        for name in self.token_names:
            if bound.get(name) is not None:
                self._check_tokens(name, bound[name])
        for name in self.id_names:
            ids = bound.get(name)
            if ids is not None and ids.ndim != 2:
                raise ParallelError(f"{name} has shape {list(ids.shape)}; with context parallelism the position ids "
                                    f"must be 2-D (tokens, axes), as the engine's pipelines pass them.")
        self._check_extras(bound)
        if self.attention_now is not None and self.attention_now() not in self.attention_allowed:
            raise ParallelError(f"The pipeline's attention backend is now {self.attention_now()!r}, which cannot run "
                                f"this split: set_acceleration(attention_backend=...) to one of "
                                f"{', '.join(self.attention_allowed)}.")
        # diffusers' split hook looks a planned input left out of the call up among the positional arguments and
        # fails (FLUX 3's references when there are none): name it, as None, which the hook passes over.
        missing = [n for n in self.token_names + self.id_names if n not in bound]
        return (args, {**kwargs, **dict.fromkeys(missing)}) if missing else None

    def _check_tokens(self, name: str, tensor: torch.Tensor) -> None:
        tokens = int(tensor.shape[1])
        if self.uneven and tokens < self.world_size:
            raise ParallelError(f"{name} has {tokens} tokens, fewer than the {self.world_size} processes sharing them.")
        if not self.uneven and tokens % self.world_size:
            raise ParallelError(f"{name} has {tokens} tokens, which do not split evenly over {self.world_size} "
                                f"processes: choose an image size (or prompt length) whose token count divides by "
                                f"{self.world_size}, or enable uneven splits (uneven=True, --uneven).")

    def _check_extras(self, bound: dict) -> None:
        for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if bound.get(name) is not None:
                raise ParallelError("ControlNet residuals cover the whole sequence and cannot be added to one rank's "
                                    "tokens: run ControlNets without context parallelism.")
        extra = bound.get("kwargs") or {}
        for name in ("joint_attention_kwargs", "attention_kwargs"):
            keys = set((bound.get(name) or extra.get(name) or {}))
            if keys - ALLOWED_ATTENTION_KWARGS:
                raise ParallelError(f"The transformer was given attention inputs ({', '.join(sorted(keys))}) that "
                                    f"cover the whole sequence (EliGen's regional masks, IP-Adapter): run those "
                                    f"features without context parallelism.")
        for m in self.attention:
            if getattr(m.processor, "_parallel_config", None) is not self.config:
                raise ParallelError(f"The attention processor {type(m.processor).__name__} does not take part in "
                                    f"context parallelism (a feature replaced diffusers' own): run that feature "
                                    f"without context parallelism.")
