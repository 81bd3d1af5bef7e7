"""TeaCache for FLUX.1, DiffSynth-Studio's ``pipe(..., tea_cache_l1_thresh=0.3)`` (issue 19, item 4).

At every transformer pass the first double block's modulated image input (``norm1(x, temb)``: the AdaLN of the image
tokens right after ``x_embedder``) is compared with the previous pass's: the relative L1 change
``mean|m - m_prev| / mean|m_prev|`` goes through the seed's rescale polynomial (fitted on FLUX.1-dev) and is added to
an accumulated distance. While that stays under the threshold the pass skips every block and the final norm reads
the block stack's input plus the residual (stack output - stack input) of the last pass that ran them; when it
reaches the threshold the pass runs all blocks and the distance restarts at 0. The first and the last step of a call
always run, as in the seed (which counts a call's passes and restarts its count after ``num_inference_steps``).

The mechanics are diffusers' hook registry (``ModelHook`` / ``StateManager``), the way its own MagCache and
FirstBlockCache attach: one hook on the first block decides and passes the tokens through when skipping, one on
every other block passes them through, and one on ``norm_out`` swaps in ``input + residual`` on a skipped pass and
records the residual on a computed one. Reading the residual at ``norm_out`` (not at the last block) keeps what the
transformer adds between blocks (ControlNet residuals) inside the cached residual, as in the seed's model function,
instead of adding it again on a skipped pass.

``TeaCache`` is a per-call context manager with ``StepCache``'s interface (``pass_context``, ``stats``): the hooks
come on entry and leave on exit. True CFG's two passes each keep their own state (contexts "cond" / "uncond" of the
cache's own ``StateManager``, set by ``pass_context``); the seed shares one object between them, which compares the
negative pass with the positive one -- with ``cfg_scale=1`` (FLUX.1-dev's usual embedded guidance) the two agree.
ControlNet residuals (``controlnet_block_samples``) are computed on skipped passes too, as in the seed, and unused.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

from .settings import SettingError

# DiffSynth-Studio's rescale of the relative L1 change (np.poly1d order: x^4 ... x^0), fitted for FLUX.1-dev.
COEFFICIENTS = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)
HEAD_HOOK, BLOCK_HOOK, NORM_HOOK = "tea_cache_head", "tea_cache_block", "tea_cache_norm_out"
MAX_THRESHOLD = 100.0      # the polynomial is >= 0.18 per step: far above any useful value


def rescale(relative_l1: float) -> float:
    """The seed's polynomial at one relative L1 change."""
    return float(np.polyval(COEFFICIENTS, relative_l1))


def check_tea_cache(value):
    """None (off) or a threshold >= 0 (0: off too -- the polynomial never goes below 0.18, so nothing is skipped)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or not 0 <= number <= MAX_THRESHOLD:
        raise SettingError(f"tea_cache_l1_thresh is TeaCache's threshold on the accumulated, rescaled change of the "
                           f"first block's input: None (off) or a number from 0 (0.2-0.6 is usual; higher skips "
                           f"more), got {value!r:.40}.")
    return number


class TeaCacheState(BaseState):
    """One pass sequence's state (one per cache context: CFG's positive and negative passes)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.step = 0                  # this pass's index within the call, as the seed counts it
        self.accumulated = 0.0
        self.previous_modulated = None
        self.should_compute = True
        self.stack_input = None        # the first block's image input in this pass
        self.residual = None           # block stack's output - input of the last computed pass
        self.skipped_steps: list = []


class TeaCache:
    def __init__(self, dit, threshold, num_inference_steps: int):
        self.dit, self.threshold = dit, threshold
        self.num_inference_steps = int(num_inference_steps or 0)
        self.passes = 0
        self.states = StateManager(TeaCacheState)
        self._hooked: list = []

    @property
    def active(self) -> bool:
        return self.threshold is not None and self.threshold > 0

    def __enter__(self) -> "TeaCache":
        if not self.active:
            return self
        if self.num_inference_steps < 1:
            raise SettingError("TeaCache needs the call's num_inference_steps (its first and last step always run).")
        blocks = _blocks(self.dit)
        self._hook(blocks[0], HeadHook(self), HEAD_HOOK)
        for block in blocks[1:]:
            self._hook(block, PassThroughHook(self), BLOCK_HOOK)
        self._hook(self.dit.norm_out, NormOutHook(self), NORM_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.dit).invalidate_child_registries_cache()
        return self

    def _hook(self, module, hook, name: str) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if registry.get_hook(name) is not None:        # left over by an interrupted call: start clean
            registry.remove_hook(name, recurse=False)
        registry.register_hook(hook, name)
        self._hooked.append((registry, name))

    def __exit__(self, *exc) -> None:
        for registry, name in self._hooked:
            registry.remove_hook(name, recurse=False)
        if self._hooked:
            HookRegistry.check_if_exists_or_initialize(self.dit).invalidate_child_registries_cache()
        self._hooked = []

    def state(self) -> TeaCacheState:
        # A pass outside any cache context (a pipeline that does not mark CFG's passes) shares one state.
        if self.states._context is None:
            self.states.set_context(CacheContext("inference"))
        return self.states.get_state()

    def pass_context(self, negative: bool = False):
        """The cache context of one transformer pass: CFG's positive and negative passes keep separate states. Set on
        this cache's own state manager (its hooks are not diffusers-stateful), so no other cache's context touches
        it."""
        return self._context("uncond" if negative else "cond") if self.active else nullcontext()

    @contextmanager
    def _context(self, name: str):
        self.states.set_context(CacheContext(name))
        try:
            yield
        finally:
            self.states.set_context(None)

    def decide(self, modulated: torch.Tensor) -> bool:
        """The seed's rule for this pass: True to run the blocks. Counts the pass and, when skipped, its step."""
        state = self.state()
        step = state.step
        if step == 0 or step == self.num_inference_steps - 1:
            compute, state.accumulated = True, 0.0
        else:
            previous = state.previous_modulated
            change = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
            state.accumulated += rescale(change)
            compute = state.accumulated >= self.threshold
            if compute:
                state.accumulated = 0.0
        compute = compute or state.residual is None      # nothing to reuse yet (cannot happen after step 0)
        state.previous_modulated = modulated
        state.step = (step + 1) % self.num_inference_steps
        state.should_compute = compute
        self.passes += 1
        if not compute:
            state.skipped_steps.append(step)
        return compute

    def stats(self) -> dict:
        """What the call did: ``skipped_steps`` per CFG pass ("cond", "uncond"), in step order."""
        skipped = {name: list(s.skipped_steps) for name, s in self.states._state_cache.items()}
        return {"cache": "tea_cache", "threshold": self.threshold, "passes": self.passes,
                "skipped": sum(len(v) for v in skipped.values()), "skipped_steps": skipped}


def _blocks(dit) -> list:
    """The FLUX.1 transformer's blocks in call order (double, then single); refused for other transformers."""
    double = getattr(dit, "transformer_blocks", None)
    single = getattr(dit, "single_transformer_blocks", None)
    if not double or single is None or not hasattr(double[0], "norm1") or hasattr(dit, "double_stream_modulation_img"):
        raise SettingError(f"TeaCache (tea_cache_l1_thresh) works with FLUX.1 transformers; this one is "
                           f"{type(dit).__name__}. Use step_cache (the first-block cache) instead.")
    return list(double) + list(single)


def _pass_through(args, kwargs) -> tuple:
    """A FLUX block's output when it is skipped: its (text, image) inputs, in the blocks' return order."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return text, hidden


class PassThroughHook(ModelHook):
    def __init__(self, cache: TeaCache):
        super().__init__()
        self.cache = cache

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        if self.cache.state().should_compute:
            return self.fn_ref.original_forward(*args, **kwargs)
        return _pass_through(args, kwargs)


class HeadHook(PassThroughHook):
    """The first block: the seed's check on its modulated image input, then run or pass through."""

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        temb = kwargs["temb"] if "temb" in kwargs else args[2]
        # Where the block's weights are: a streamed block (diffusers' group offloading, a hook inside this one)
        # is still on the CPU here, and the check reads only the image stream's AdaLN -- cheap there.
        where = next(module.norm1.parameters()).device
        modulated = module.norm1(hidden.to(where), emb=temb.to(where))[0]
        self.cache.state().stack_input = hidden
        if self.cache.decide(modulated):
            return self.fn_ref.original_forward(*args, **kwargs)
        return _pass_through(args, kwargs)


class NormOutHook(PassThroughHook):
    """The final norm: its input is the stack input + the stored residual on a skipped pass; on a computed pass the
    residual is recorded."""

    @torch.compiler.disable
    def new_forward(self, module, hidden, *args, **kwargs):
        state = self.cache.state()
        if state.stack_input is not None:
            if state.should_compute:
                state.residual = hidden - state.stack_input
            else:
                hidden = state.stack_input + state.residual
            state.stack_input = None
        return self.fn_ref.original_forward(hidden, *args, **kwargs)
