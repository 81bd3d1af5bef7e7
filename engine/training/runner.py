"""The training loop: one run from its first (or resumed) step to the end, a stop, or an error.

The same loop trains FLUX.1, FLUX.2 and FLUX 3: the family is read from the model files when the run starts
(``engine.training.families``), and its loading, LoRA targets, inputs, objective and LoRA file come from the family's
module (``flux1``, ``flux2``, ``flux3``).

``Trainer(config, run_dir).run()`` trains in the calling thread. Progress goes three ways at once: the
``on_progress`` callback (same process), ``events.jsonl`` in the run folder (the Train tab in another process, or a
person with ``tail -f``), and ``run.json`` (the run's last known status, for listing runs).

Multi-GPU runs go through accelerate exactly as the seed's: ``accelerate launch train.py ...`` (DDP, or DeepSpeed
ZeRO from an accelerate config). Each process trains on its share of every epoch's shuffled order; only the main
process writes files and calls back.

Reproducibility: the data order of epoch ``e`` is seeded by (seed, e), and each sample's timestep and noise by
(seed, e, its place in that order), so a run resumed from the state saved at step ``s`` draws exactly what the
uninterrupted run drew, and 2 processes draw what 1 process with 2 accumulation steps draws. What a resume state
holds, and how it is put back, is ``engine.training.states``.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pathlib
import threading
import time
from typing import Callable, Optional

import torch

from ..errors import EngineError
from . import checkpoints as ck
from . import export
from . import families
from . import states
from . import tasks
from .args import TrainConfig
from .lora_targets import check_target_names
from .data import epoch_order, order_position, steps_per_epoch
from .model import add_lora, enable_checkpointing, load_full_weights, resolve_dtype, trainable_parameters
from .objective import TrainingInputs, sample_generator
from .tasks import TrainingTask
from .memory import training_memory_plan
from .offload import apply_training_plan, make_optimizer

SUPPORTED_TASKS = tasks.TASKS


def _identity(x):
    return x


def iter_items(dataset, indices, num_workers: int = 0):
    """The records at ``indices`` in order; with workers, loaded ahead by a DataLoader (the seed's
    --dataset_num_workers) over exactly those indices, so the order never depends on the worker count."""
    if not num_workers:
        return (dataset[i] for i in indices)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=list(indices), num_workers=num_workers,
                                         collate_fn=_identity)
    return iter(loader)


def train_step(accelerator, model, optimizer, scheduler, inputs: TrainingInputs, draw: dict) -> torch.Tensor:
    """One step as the seed's loop takes it: loss, backward, optimizer and LR-scheduler step (accelerate applies
    the gradient accumulation: the optimizer steps every ``gradient_accumulation_steps`` calls). ``draw``: the
    step's random part from the task (sft: sigma, weight, noise), the module's keyword arguments."""
    with accelerator.accumulate(model):
        loss = model(inputs, **draw)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss


def make_accelerator(config: TrainConfig):
    import accelerate
    try:
        accelerator = accelerate.Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            kwargs_handlers=[accelerate.DistributedDataParallelKwargs(
                find_unused_parameters=config.find_unused_parameters)])
    except (ImportError, ModuleNotFoundError) as exc:
        if "deepspeed" in str(exc).lower():
            raise EngineError("This accelerate configuration uses DeepSpeed (ZeRO), but the deepspeed package is not "
                              "installed: pip install deepspeed (on the CUDA machine), or launch with an accelerate "
                              "config without DeepSpeed (plain DDP).") from exc
        raise
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        try:
            importlib.import_module("deepspeed")
        except ImportError:
            raise EngineError("This accelerate configuration uses DeepSpeed (ZeRO), but the deepspeed package is "
                              "not installed: pip install deepspeed.") from None
        # No data loader goes through prepare(), so DeepSpeed is told the per-GPU batch (1, as the seed's).
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    return accelerator


def optimizer_class(name: Optional[str]):
    if not name:
        return torch.optim.AdamW
    module, _, cls = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError):
        raise EngineError(f"--customized_optimizer {name}: no such class (e.g. torch.optim.Adam).") from None


class Trainer:
    """One run. ``run_dir`` must exist (``checkpoints.new_run_dir``); a saved state in it is resumed."""

    def __init__(self, config: TrainConfig, run_dir, on_progress: Optional[Callable[[dict], None]] = None,
                 stop_event: Optional[threading.Event] = None, log: Optional[Callable[[str], None]] = None):
        self.config = config
        self.run_dir = pathlib.Path(run_dir)
        self.on_progress = on_progress
        self.stop_event = stop_event or threading.Event()
        self._print = log or print
        self.is_main = True
        self.family = families.FLUX1   # read from the model files when the run starts
        self.task = TrainingTask.from_config(config) if config.task in tasks.TASKS else TrainingTask()
        self.result: dict = {}

    # ------------------------------------------------------------------------------------------- reporting
    def log(self, message: str) -> None:
        if self.is_main:
            self._print(message)
            self.emit({"event": "log", "message": message})

    def emit(self, event: dict) -> None:
        if not self.is_main:
            return
        event = {"run_dir": str(self.run_dir), "time": time.time(), **event}
        ck.append_event(self.run_dir, event)
        if self.on_progress is not None:
            try:
                self.on_progress(event)
            except Exception as exc:  # noqa: BLE001 - a broken UI callback must not kill the run
                self._print(f"progress callback failed: {type(exc).__name__}: {exc}")

    def _stop_wanted(self, accelerator) -> bool:
        wanted = self.stop_event.is_set() or ck.stop_requested(self.run_dir)
        if accelerator.num_processes > 1:   # every process stops at the same step
            flag = torch.tensor([1.0 if wanted else 0.0], device=accelerator.device)
            wanted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        return wanted

    # --------------------------------------------------------------------------------------------- checks
    def _check_config(self) -> None:
        c = self.config
        self.task = TrainingTask.from_config(c)   # an unknown task is refused naming the valid ones
        if c.offload_models and self.task.stage == "all":
            raise EngineError("--offload_models is the seed's split-training flag: use it with --task "
                              "sft:data_process / sft:train (each stage loads only the models it uses).")
        roles = set(c.trainable()) | ({c.lora_base_model} if c.lora_base_model else set())
        if not roles:
            raise EngineError("Nothing to train: pass --lora_base_model dit (LoRA) or --trainable_models dit (full).")
        if roles - {"dit"}:
            raise EngineError(f"Training {', '.join(sorted(roles - {'dit'}))} is not supported; the FLUX "
                              f"transformer (dit) is.")
        if c.is_lora and c.trainable():
            raise EngineError("Pass either --lora_base_model (LoRA) or --trainable_models (full), not both.")
        if c.gradient_accumulation_steps < 1 or c.num_epochs < 1 or c.lora_rank < 1:
            raise EngineError("--gradient_accumulation_steps, --num_epochs and --lora_rank must be at least 1.")
        if c.save_steps is not None and c.save_steps < 1:
            raise EngineError("--save_steps must be at least 1 (or empty: every epoch).")

    def _check_family(self) -> None:
        """The family, from the model files; the extra inputs and LoRA format it takes."""
        c = self.config
        self.family = family = families.family_of(c)
        if c.is_lora and self.task.stage != "data_process":   # a typo is reported before any model loads, with
            check_target_names(c.lora_target_modules, family.name)   # the closest names (stage 1 trains none)
        bad = [x for x in c.extra_input_names() if x not in family.extra_inputs   # direct distill: the seed's
               and not (self.task.kind == "direct_distill" and x in tasks.DISTILL_COLUMNS)]   # metadata columns
        if bad:
            raise EngineError(f"--extra_inputs {', '.join(bad)}: training {family.name} with these inputs is not "
                              f"supported (supported: {', '.join(family.extra_inputs)}).")
        family.check_open_format(c)

    # ------------------------------------------------------------------------------------------ the inputs
    def encode(self, pipe, item: dict, device) -> TrainingInputs:
        """A record as the transformer's inputs, with the family's encoders (``tasks.encode_flux1``)."""
        return self.family.encode(pipe, item, self.config, device)

    # ---------------------------------------------------------------------------------------------- saving
    def _info(self, step: int, epoch: int) -> dict:
        c = self.config
        return {"family": self.family.name, "base_model": self.base_files, "steps": step,
                "epochs": epoch, "dataset_size": self.dataset_size, "dataset": self.dataset_source,
                "learning_rate": c.learning_rate, "seed": c.seed,
                "targets": c.lora_target_modules if c.is_lora else None, "trainable_models": c.trainable_models,
                "preset_lora": c.preset_lora_path, "run": self.run_dir.name, "flux_studio": "train.py"}

    def save_output(self, name: str, step: int, epoch: int, accelerator) -> Optional[pathlib.Path]:
        """The trained LoRA / weights as ``<run>/<name>.safetensors`` (main process)."""
        accelerator.wait_for_everyone()
        self.last_output_step = step
        c = self.config
        path = self.run_dir / f"{name}.safetensors"
        # Internal names are the seed's "pipe.dit.<module>"; --remove_prefix_in_ckpt takes its start off.
        full, cut = "pipe.dit.", c.remove_prefix_in_ckpt or ""
        prefix = full[len(cut):] if cut and full.startswith(cut) else full
        with states.gathered(accelerator, self.params):   # every process enters (a collective under ZeRO-3)
            if not self.is_main:
                pass
            elif c.is_lora:
                fmt = c.opensource_format if c.align_to_opensource_format else "native"
                self.family.save_lora(self.dit, path, fmt, self.dtype, self._info(step, epoch),
                                      prefix=prefix if fmt == "native" else "")
            else:
                export.save_full(self.dit, path, [n[len("dit."):] for n in self.params], self.dtype,
                                 self._info(step, epoch), prefix=prefix)
        if not self.is_main:
            return None
        self.outputs.append(str(path))
        ck.write_run(self.run_dir, outputs=self.outputs)
        return path

    def save_state(self, step: int, accelerator, optimizer, scheduler) -> Optional[pathlib.Path]:
        """The resume state after ``step`` steps (``engine.training.states``); its path on the main process."""
        self.last_state_step = step
        return states.save(self.run_dir, step, accelerator, self.params, optimizer, scheduler, is_main=self.is_main,
                           accumulation_steps=self.config.gradient_accumulation_steps, losses=self.losses,
                           elapsed_s=lambda: self.elapsed_before + self._elapsed(), keep=self.config.keep_states)

    # ------------------------------------------------------------------------------------------------ run
    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self) -> dict:
        c = self.config
        self._check_config()
        accelerator = make_accelerator(c)
        self.is_main = accelerator.is_main_process
        rank, world = accelerator.process_index, accelerator.num_processes
        device = accelerator.device
        self.dtype = dtype = resolve_dtype(c.torch_dtype, device)
        torch.manual_seed(c.seed)
        state_path = ck.latest_state(self.run_dir)
        if self.is_main:
            ck.clear_stop(self.run_dir)
            ck.write_run(self.run_dir, status="starting", host_pid=__import__("os").getpid(),
                         config=c.to_json(), kind="lora" if c.is_lora else "full")
        try:
            return self._run(accelerator, rank, world, device, dtype, state_path)
        except BaseException as exc:
            if self.is_main:
                msg = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
                ck.write_run(self.run_dir, status="failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                             error=msg)
                self.emit({"event": "end", "status": "failed", "error": msg})
            raise

    def _run(self, accelerator, rank, world, device, dtype, state_path) -> dict:
        """Stage 1 alone (the cache), or a training run: its data, the trained model and its optimizer, a saved
        state put back, the steps, the end."""
        c = self.config
        self._check_family()
        self.task.check(c, self.family)
        if self.task.stage == "data_process":   # stage 1: the cache, no training
            result = tasks.run_data_process(self, accelerator, rank, world, device, dtype)
            return self._finish(result, accelerator)
        dataset = self._dataset(accelerator, rank, world, device, dtype)
        if isinstance(dataset, dict):   # stopped while encoding the cache
            return self._finish(dataset, accelerator)
        pipe = self._load_model(dataset, device, dtype)
        module, optimizer, scheduler = self._optimizer(pipe, device)
        start = self._restore(state_path, rank, world, optimizer, scheduler)
        model, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
        if state_path is not None:
            states.restore_deepspeed(accelerator, self.run_dir, start)
        accelerator.step = start   # where gradient accumulation stands

        spe = steps_per_epoch(len(dataset), world)
        total = c.num_epochs * spe
        if c.max_steps:
            total = min(total, int(c.max_steps))
        schedule = self.family.schedule(module.dtype)
        run = _Steps(accelerator, model, optimizer, scheduler, dataset, self.task, schedule, rank, world, device,
                     start, total, spe)
        self._announce(run, resumed=state_path is not None, dtype=dtype)
        status, step = self._train(run)
        final = self.outputs[-1] if self.outputs else None
        result = {"status": status, "step": step, "total_steps": total, "final": final, "run_dir": str(self.run_dir),
                  "loss": self.losses[-1] if self.losses else None}
        if self.is_main and status == "finished" and final and c.publish_to and c.is_lora:
            result["published"] = str(publish_lora(final, c.publish_to, self.run_dir.name))
        return self._finish(result, accelerator)

    # ------------------------------------------------------------------------------- setting up the run
    def _dataset(self, accelerator, rank, world, device, dtype):
        """The task's dataset; with --cache_dir the cache is made (or reused) first and this run trains on it as
        stage 2 (``self.task`` becomes that stage). A dict (the run's result) when stopped while encoding."""
        c = self.config
        if c.cache_dir:   # split training in one command: the cache first (engine.training.split), then stage 2
            from .split import cache_first
            dataset = cache_first(self, accelerator, rank, world, device, dtype)
            if isinstance(dataset, dict):
                return dataset
        else:
            dataset = self.task.dataset(c, self.log)
        self.dataset_size, self.dataset_source = dataset.num_records, dataset.source
        self.log(f"Dataset: {dataset.describe()}.")
        return dataset

    def _load_model(self, dataset, device, dtype):
        """The stage's models loaded, all frozen but the DiT, which gets the LoRA (or is trained whole), the
        weights to start from and gradient checkpointing; in train mode."""
        c = self.config
        if not self.family.memory_plan:   # no training memory plan: its flags are refused before anything loads
            training_memory_plan(c, device, self.family)
        pipe = self.family.load_pipeline(tasks.stage_models(c, self.task.stage, self.family, self.log), device, dtype,
                                         log=self.log)
        if self.task.stage == "train":   # the cache must fit this DiT
            dataset.check_models(self.family.name, pipe.dit)
        self.pipe, self.dit = pipe, pipe.dit
        self.base_files = {r: [pathlib.Path(f).name for f in fs] for r, fs in pipe.model_files.items()}
        for role, module in pipe.installed_models().items():
            if module is not pipe.dit:
                module.requires_grad_(False)
        if c.is_lora:
            add_lora(pipe.dit, c, log=self.log, resolve=self.family.resolve_targets)
            for path in (c.lora_checkpoint, c.resume_from_checkpoint):
                if path:
                    n = self.family.load_lora_weights(pipe.dit, path, c.lora_rank)
                    self.log(f"LoRA weights from {path}: {n} layers.")
        else:
            pipe.dit.requires_grad_(True)
            if c.resume_from_checkpoint:
                load_full_weights(pipe.dit, c.resume_from_checkpoint)
        if c.use_gradient_checkpointing or c.use_gradient_checkpointing_offload:
            enable_checkpointing(pipe.dit, c.use_gradient_checkpointing_offload)
        pipe.dit.train()
        return pipe

    def _optimizer(self, pipe, device):
        """The memory plan applied (before the optimizer: it decides where the optimizer's states live), the
        task's module and its trainable parameters, the optimizer and the seed's LR scheduler."""
        c = self.config
        plan = getattr(pipe, "training_plan", None)   # engine.training.memory: --vram_limit, the offload flags
        if plan is not None:
            self.emit({"event": "plan", **plan.as_dict()})
            apply_training_plan(pipe, plan, device, self.log)
        module = self.family.training_module(pipe, self.task.kind)
        self.params = trainable_parameters(module)
        optimizer = make_optimizer(plan, list(self.params.values()), optimizer_class(c.customized_optimizer),
                                   lr=c.learning_rate, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)   # the seed's (its defaults included)
        return module, optimizer, scheduler

    def _restore(self, state_path, rank, world, optimizer, scheduler) -> int:
        """The first step: 0, or a saved state's, put back (before ``accelerator.prepare``) into the parameters,
        optimizer, scheduler and RNGs, with its loss history and time spent."""
        self.losses, self.elapsed_before = [], 0.0
        if state_path is None:
            return 0
        state = states.restore(state_path, self.run_dir, self.params, optimizer, scheduler, rank=rank, world=world)
        start = int(state["step"])
        self.losses = list(state.get("loss_history", []))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.log(f"Resuming from {state_path.name} (step {start}).")
        return start

    def _announce(self, run: "_Steps", resumed: bool, dtype) -> None:
        """run.json and the 'start' event (main process), and the log line saying what is trained and for how long."""
        c = self.config
        n_params = sum(p.numel() for p in self.params.values())
        self.outputs = list(ck.read_run(self.run_dir).get("outputs", [])) if self.is_main else []
        if self.is_main:
            ck.write_run(self.run_dir, status="running", step=run.start, total_steps=run.total,
                         dataset_size=run.dataset.num_records, base_model=self.base_files, trainable_params=n_params)
            self.emit({"event": "start", "step": run.start, "total_steps": run.total, "steps_per_epoch": run.spe,
                       "dataset_size": run.dataset.num_records, "trainable_params": n_params,
                       "kind": "lora" if c.is_lora else "full", "resumed": resumed})
        self.log(f"Training {n_params:,} parameters for {run.total - run.start} steps ({c.num_epochs} epochs of "
                 f"{run.spe}) on {run.device}, {dtype}.")

    # -------------------------------------------------------------------------------------------- the steps
    def _train(self, run: "_Steps") -> tuple[str, int]:
        """The steps from ``run.start``, then what the end (or a stop) saves: ``(status, step reached)``. The loss
        CSV stays open for the whole of it."""
        self.t0 = time.perf_counter()
        self.last_output_step = self.last_state_step = run.start
        loss_file = open(self.run_dir / ck.LOSS_FILE, "a", encoding="utf-8") if self.is_main else None
        try:
            status, step = self._steps(run, loss_file)
            self._end_of_steps(run, status, step)
        finally:
            if loss_file is not None:
                loss_file.close()
        return status, step

    def _steps(self, run: "_Steps", loss_file) -> tuple[str, int]:
        """Train until ``run.total`` or a stop: ``("finished", total)`` or ``("stopped", the step not taken)``."""
        c, order_epoch, items = self.config, -1, None
        for step in range(run.start, run.total):
            if self._stop_wanted(run.accelerator):
                return "stopped", step
            epoch, pos = divmod(step, run.spe)
            if epoch != order_epoch:   # a new epoch (or a resumed one, from where it stood): its order, seeded
                order, order_epoch = epoch_order(len(run.dataset), c.seed, epoch, run.rank, run.world), epoch
                items = iter_items(run.dataset, order[pos:], c.dataset_num_workers)
            item = next(items)
            inputs, meta = run.task.inputs(lambda record: self.encode(self.pipe, record, run.device), item, run.device)
            g = sample_generator(c.seed, epoch, order_position(pos, run.rank, run.world))
            draw = run.task.draw(g, run.schedule, inputs, meta)   # sft: sigma, weight, noise
            loss = train_step(run.accelerator, run.model, run.optimizer, run.scheduler, inputs, draw)
            done = step + 1
            value = float(loss.detach().float().item())
            self.losses.append(value)
            if loss_file is not None:
                loss_file.write(f"{done},{value:.6g}\n")
                loss_file.flush()
            self._report_step(done, run.total, epoch, run.spe, value, run.start, run.optimizer)
            self._after_step(run, done, epoch)
        return "finished", run.total

    def _after_step(self, run: "_Steps", done: int, epoch: int) -> None:
        """The seed's saving (every --save_steps, else every epoch), a resume state with each output, validation."""
        c = self.config
        epoch_end = done % run.spe == 0
        saved = None
        if c.save_steps and done % c.save_steps == 0:
            saved = self.save_output(f"step-{done}", done, epoch + (1 if epoch_end else 0), run.accelerator)
        elif c.save_steps is None and epoch_end:
            saved = self.save_output(f"epoch-{epoch}", done, epoch + 1, run.accelerator)
        if self.last_output_step == done:
            st = self.save_state(done, run.accelerator, run.optimizer, run.scheduler)
            if self.is_main:
                ck.write_run(self.run_dir, step=done, saved_step=done)
                self.emit({"event": "checkpoint", "step": done, "path": str(saved), "state": str(st)})
        if c.validate_prompts and c.validate_steps and done % c.validate_steps == 0 and done != run.total:
            self._sample(done)

    def _end_of_steps(self, run: "_Steps", status: str, step: int) -> None:
        """Stopped: the state to resume from. Finished: the last output, its state and the validation samples."""
        c, total = self.config, run.total
        if status == "stopped":
            self.log(f"Stopped at step {step}; saving the state to resume from.")
            if self.last_state_step != step:
                self.save_state(step, run.accelerator, run.optimizer, run.scheduler)
            return
        if self.last_output_step != total:   # the seed's on_training_end: step-N unless just saved
            self.save_output(f"step-{total}", total, math.ceil(total / run.spe), run.accelerator)
        if self.last_state_step != total:
            self.save_state(total, run.accelerator, run.optimizer, run.scheduler)
        if c.validate_prompts:
            self._sample(total)

    def _finish(self, result: dict, accelerator) -> dict:
        if self.is_main:
            ck.write_run(self.run_dir, status=result["status"], step=result["step"], final=result["final"],
                         loss=result["loss"], published=result.get("published"))
            self.emit({"event": "end", **result})
        accelerator.wait_for_everyone()
        self.result = result
        return result

    def _report_step(self, done, total, epoch, spe, loss, start, optimizer):
        if not self.is_main:
            return
        elapsed = self._elapsed()
        per_step = elapsed / max(1, done - start)
        recent = self.losses[-20:]
        lr = optimizer.param_groups[0]["lr"]
        ck_every = 10 if total > 200 else 1
        if done % ck_every == 0 or done == total:
            ck.write_run(self.run_dir, step=done, loss=loss)
        self.emit({"event": "step", "step": done, "total_steps": total, "epoch": epoch, "steps_per_epoch": spe,
                   "loss": loss, "loss_avg": sum(recent) / len(recent), "lr": lr, "elapsed_s": elapsed,
                   "sec_per_step": per_step, "eta_s": per_step * (total - done)})

    def _sample(self, step: int) -> None:
        if not self.is_main:
            return
        from .validate import sample_into_run
        paths = sample_into_run(self.pipe, self.run_dir, self.config, step)
        self.emit({"event": "sample", "step": step, "paths": paths})


@dataclasses.dataclass
class _Steps:
    """What the step loop works with, set up by ``Trainer._run``."""
    accelerator: object
    model: object          # the task's module as accelerate prepared it (DDP / DeepSpeed wrapped)
    optimizer: object
    scheduler: object
    dataset: object
    task: TrainingTask
    schedule: object       # the family's timestep schedule
    rank: int
    world: int
    device: object
    start: int             # the first step: 0, or the resumed state's
    total: int
    spe: int               # steps per epoch (per process)


def publish_lora(path, models_dir, name: str) -> pathlib.Path:
    """Copy a trained LoRA into the studio's LoRA library, ``<models>/loras/trained/<name>.safetensors`` (a new name
    if that exists; temporary name, then renamed)."""
    import os
    import shutil

    from ..lora.library import lora_dir
    folder = lora_dir(models_dir) / "trained"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.safetensors"
    n = 2
    while target.exists():
        target = folder / f"{name}_{n}.safetensors"
        n += 1
    tmp = folder / f".{target.name}.tmp-{os.getpid()}"
    shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    return target
