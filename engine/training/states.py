"""A run's resume state, taken from and put back into the training loop (``engine.training.runner``).

``checkpoints`` owns the files (``state/step-NNNNNN.pt``, written atomically, the last ``keep_states`` kept); this
module owns what goes in them: the trained parameters, the partial gradients when saved mid-accumulation (one set
per process), the optimizer and LR scheduler, the RNG states, the loss history and the time spent. Under DeepSpeed
the optimizer lives in its engine, so its own checkpoint folder (``state/deepspeed-NNNNNN``) is saved beside the
state and put back after ``accelerator.prepare``.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Optional

import torch

from ..errors import EngineError
from . import checkpoints as ck


def _deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


class gathered:
    """Under DeepSpeed ZeRO-3 the parameters are sharded: gather them for reading (no-op otherwise)."""

    def __init__(self, accelerator, params):
        self.ctx = None
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            import deepspeed
            self.ctx = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def save(run_dir: pathlib.Path, step: int, accelerator, params: dict, optimizer, scheduler, *, is_main: bool,
         accumulation_steps: int, losses: list, elapsed_s: Callable[[], float], keep: int) -> Optional[pathlib.Path]:
    """The state after ``step`` steps; every process calls it (collectives), the main one writes it and gets its
    path. ``elapsed_s`` is read after the collectives, so the saved time includes them."""
    accelerator.wait_for_everyone()
    if _deepspeed(accelerator):
        # DeepSpeed keeps the optimizer inside its engine: its own checkpoint format holds it.
        accelerator.save_state(str(run_dir / ck.STATE_DIR / f"deepspeed-{step:06d}"))
    deepspeed = _deepspeed(accelerator)
    with gathered(accelerator, params):
        trainable = {n: p.detach().cpu().clone() for n, p in params.items()} if is_main else None
    accumulating = step % accumulation_steps != 0
    grads = ({n: p.grad.detach().cpu().clone() for n, p in params.items() if p.grad is not None}
             if accumulating and not deepspeed else {})
    if accelerator.num_processes > 1 and accumulating and not deepspeed:
        # mid-accumulation each process holds its own partial gradients (DDP syncs only at the last step)
        from accelerate.utils import gather_object
        grads = gather_object([grads])
    if not is_main:
        return None
    state = {
        "step": step, "accelerator_step": step, "trainable": trainable,
        "grads": grads,   # one dict, or one per process (a list) from several processes
        "optimizer": None if deepspeed else optimizer.state_dict(),
        "scheduler": None if deepspeed else scheduler.state_dict(),
        "rng": ck.rng_states(), "loss_history": losses[-100:], "processes": accelerator.num_processes,
        "elapsed_s": elapsed_s(),
    }
    path = ck.save_state(run_dir, step, state, keep=keep)
    if deepspeed:   # DeepSpeed's folders (model + optimizer: large) are kept with the states they belong to
        import shutil
        kept = {n for n, _ in ck.state_files(run_dir)}
        for folder in (run_dir / ck.STATE_DIR).glob("deepspeed-*"):
            if folder.name.split("-")[-1].isdigit() and int(folder.name.split("-")[-1]) not in kept:
                shutil.rmtree(folder, ignore_errors=True)
    return path


def restore(state_path: pathlib.Path, run_dir: pathlib.Path, params: dict, optimizer, scheduler, *, rank: int,
            world: int) -> dict:
    """Put a saved state back into the (not yet prepared) parameters, optimizer, scheduler and RNGs; returns the
    saved ``state`` (its ``step``, ``loss_history``, ``elapsed_s`` for the loop). A state saved by another number
    of processes is refused, naming the command that resumes it."""
    state = ck.load_state(state_path)
    saved_by = int(state.get("processes", 1))
    if saved_by != world:   # a step is `world` samples: on another count the run would resume elsewhere
        how = (f"accelerate launch --multi_gpu --num_processes {saved_by} train.py --resume {run_dir}"
               if saved_by > 1 else f"python train.py --resume {run_dir}")
        raise EngineError(f"This run was saved by {saved_by} training process(es) and this resume runs "
                          f"{world}: resume it as it was trained: {how}")
    grads = state["grads"]   # saved mid-accumulation: this process's own partial gradients
    grads = (grads[rank] if rank < len(grads) else {}) if isinstance(grads, list) else grads
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n].to(p.device, p.dtype))
            g = grads.get(n)
            p.grad = None if g is None else g.to(p.device, p.dtype)
    if state.get("optimizer") is not None:   # (under DeepSpeed its own checkpoint holds them)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    ck.restore_rng(state["rng"])
    return state


def restore_deepspeed(accelerator, run_dir: pathlib.Path, step: int) -> None:
    """After ``accelerator.prepare``: DeepSpeed's own checkpoint of ``step`` (model and optimizer), if any."""
    if _deepspeed(accelerator):
        ds_dir = run_dir / ck.STATE_DIR / f"deepspeed-{step:06d}"
        if ds_dir.is_dir():
            accelerator.load_state(str(ds_dir))
