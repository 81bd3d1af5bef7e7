"""The Train tab's service: one run at a time on the engine's device, its progress as plain dicts, stop and resume,
the finished LoRA handed to the Generate tab's LoRA picker (see the package's docstring for an example).

While a run trains, ``busy_message()`` is what ``Engine.generate`` refuses with: training and image jobs share the
device's memory.
"""
from __future__ import annotations

import os
import pathlib
import threading
from typing import Optional

from engine.errors import EngineError
from engine.training.args import TrainConfig

from . import captions, datasets, models, presets, process, progress
from .commands import command_line
from .config import TARGET_PRESETS, RunPlan, build_config, config_notes, vram_limit

GENERATION_WAIT_S = 3.0          # how long start() waits for a generation that is just finishing
CACHES = "caches"                # <models>/train/caches/<key>/: split training's encoded datasets


class TrainingJobs:
    """One training run at a time for the studio, on the engine's device."""

    def __init__(self, engine, mode: str = process.DEFAULT_MODE):
        if mode not in process.MODES:
            raise ValueError("mode must be 'thread' or 'process'")
        self.engine = engine
        self.mode = mode
        self._lock = threading.RLock()
        self._handle = None                  # engine.training.api.TrainingHandle of the run started here
        self._starting: Optional[str] = None  # a run being launched (generation is refused meanwhile)
        # A run whose trainer is still alive (the studio restarted while it trained) is followed like our own:
        # generation waits for it and Stop reaches it (through its STOP file).
        self._adopted: Optional[pathlib.Path] = process.find_running(self.root)
        self._views: dict[str, progress.RunView] = {}
        self._shown: Optional[pathlib.Path] = self._adopted     # the run poll() reports on

    # ------------------------------------------------------------------------------------------------- folders
    @property
    def root(self) -> pathlib.Path:
        return process.runs_root(self.engine.models_dir)

    @property
    def datasets_root(self) -> pathlib.Path:
        return self.root / datasets.DATASETS

    @property
    def caches_root(self) -> pathlib.Path:
        """``<models>/train/caches/``: split training's encoded datasets, one folder per data + model + size."""
        return self.root / CACHES

    def _view(self, run_dir) -> progress.RunView:
        key = str(pathlib.Path(run_dir))
        with self._lock:          # several browser tabs poll at once: each event line is read once
            if key not in self._views:
                self._views[key] = progress.RunView(run_dir)
            return self._views[key].update()

    def _run_dir(self, run_dir) -> pathlib.Path:
        """A run folder of this studio (a name, or a path under ``<models>/train/``), or an EngineError."""
        text = str(run_dir or "").strip()
        path = pathlib.Path(text)
        if not path.is_absolute():
            path = self.root / text
        real = pathlib.Path(os.path.realpath(path))
        if not real.is_relative_to(pathlib.Path(os.path.realpath(self.root))) or not process.is_run(real):
            raise EngineError(f"{text or 'That'} is not one of this studio's training runs (the runs are in "
                              f"{self.root}). Choose one from the past runs list.")
        return path

    # ------------------------------------------------------------------------------------------------- state
    def _adopted_alive(self) -> bool:
        if self._adopted is None:
            return False
        if process.trainer_alive(self._adopted):
            return True
        self._adopted = None
        return False

    def running(self) -> bool:
        """True while a run is launching or training (image jobs are refused meanwhile)."""
        with self._lock:
            return bool(self._starting) or self._active_dir() is not None

    def _active_dir(self) -> Optional[pathlib.Path]:
        if self._handle is not None and self._handle.running:
            return self._handle.run_dir
        if self._adopted_alive():
            return self._adopted
        return None

    def busy_message(self) -> str:
        """"" when the device is free for image jobs, else why not and what to do."""
        with self._lock:
            if self._starting:
                return (f"Training run '{self._starting}' is starting on the {self._device_word()}. Image jobs wait "
                        f"until it ends: stop it in the Train tab.")
            run_dir = self._active_dir()
        if run_dir is None:
            return ""
        view = self._view(run_dir)
        where = ""
        if view.last_step:
            where = f" (step {view.last_step['step']}/{view.last_step['total_steps']})"
        elif view.start:
            where = f" (step {view.start.get('step', 0)}/{view.start.get('total_steps')})"
        return (f"Training run '{run_dir.name}' is using the {self._device_word()}{where}. Image jobs wait until it "
                f"ends: stop it in the Train tab.")

    def _device_word(self) -> str:
        device = str(self.engine.device or "")
        if device.startswith("cpu"):
            return "CPU"
        if device:
            return "GPU"
        import torch  # noqa: PLC0415 - only when the engine has not chosen its device yet
        return "GPU" if torch.cuda.is_available() else "CPU"

    # ------------------------------------------------------------------------------------------------- models
    @staticmethod
    def target_presets() -> list[tuple[str, str]]:
        """(key, label) of the LoRA target presets ``start`` takes as ``targets`` (or module names instead)."""
        return list(TARGET_PRESETS.items())

    @staticmethod
    def vram_presets(kind: str = "lora") -> list[dict]:
        """The VRAM presets: ``{"key": "12 GB", "settings": {form key: value}, "text": what it sets}`` each
        (``studio.training.presets``); ``kind``: "lora" or "full"."""
        return [{"key": p.key, "settings": p.settings(kind), "text": p.describe(kind)} for p in presets.PRESETS]

    def base_models(self) -> list[dict]:
        """The variants a run can train on (``studio.training.models.base_models``)."""
        return models.base_models(self.engine)

    # ------------------------------------------------------------------------------------------------- datasets
    def prepare_dataset(self, files, captions=None, name: Optional[str] = None) -> dict:
        """Uploaded images copied into a new folder under ``<models>/train/datasets/`` with a ``.txt`` caption each
        (``studio.training.datasets.prepare_dataset``)."""
        return datasets.prepare_dataset(self.engine.files, self.datasets_root, files, captions, name)

    def read_dataset(self, path, base=None) -> dict:
        """A folder of images with captions, or a metadata file (``studio.training.datasets.read_dataset``)."""
        return datasets.read_dataset(self.engine.files, path, base)

    def caption_changes(self, folder, rows) -> list[tuple[pathlib.Path, str]]:
        """The ``.txt`` files the table's captions would change; nothing written."""
        return datasets.caption_changes(self.engine.files, folder, rows)

    def save_captions(self, folder, rows) -> int:
        """Write the table's captions to the folder's ``.txt`` files (only those that changed); returns how many.
        Captions are read fresh by every run, so the next run trains with them."""
        return datasets.write_captions(self.caption_changes(folder, rows))

    def draft_captions(self, folder, rows, overwrite: bool = False, metadata=None) -> dict:
        """Captions for the table's images drafted by Qwen2.5-VL (``studio.training.captions``): the empty ones, or
        every one with ``overwrite``; nothing written to the .txt files. Returns ``{"rows", "drafted", "note"}``."""
        if metadata:
            raise EngineError(f"This dataset's captions are the prompt column of {pathlib.Path(str(metadata)).name}: "
                              f"edit that file, or load the images' folder instead to draft captions.")
        table, todo, path = captions.images_to_caption(self.engine.files, folder, rows, overwrite)
        if not todo:
            return {"rows": table, "drafted": 0, "note": "Every image has a caption already: tick \"Redo written "
                                                          "captions\" to draft new ones for all."}
        qwen, demo = captions.qwen_folder(self.engine.models_dir, self.engine.demo or self.engine.demo_only)
        if qwen is None:
            from engine.registry import QWEN_VL  # noqa: PLC0415
            raise EngineError(captions.QWEN_HELP.format(where=pathlib.Path(self.engine.models_dir) / QWEN_VL))
        with self._lock:
            if self._starting or self._active_dir() is not None:
                raise EngineError("A training run is using the device: draft captions when it has ended.")
        if not self.engine.wait_until_idle(GENERATION_WAIT_S):
            raise EngineError("An image job is running (Generate, Edit or Inpaint tab): wait for it to finish or "
                              "cancel it, then draft the captions.")
        device = self._device_name()
        if device != "cpu":
            self.engine.release_models()      # Qwen2.5-VL-7B needs the memory the image models hold
        return captions.draft(table, todo, path, qwen, device, demo)

    def _device_name(self) -> str:
        if self.engine.device:
            return str(self.engine.device)
        import sys  # noqa: PLC0415
        if "torch" not in sys.modules:       # the page being built: no torch import for it (cold start)
            return "cuda" if process.visible_cuda_devices() else "cpu"
        import torch  # noqa: PLC0415 - only when the engine has not chosen its device yet
        return "cuda" if torch.cuda.is_available() else "cpu"

    # ------------------------------------------------------------------------------------------------- a run
    def build_config(self, form: dict) -> tuple[TrainConfig, list[str], int]:
        """A TrainConfig from the tab's plain values (see ``start``), notes for the person, the run's steps. Writes
        nothing: the table's captions are written by ``start`` once the whole form is valid."""
        plan = self._plan(form)
        return plan.config, plan.notes, plan.total

    def _plan(self, form: dict) -> RunPlan:
        base = models.pick_base(self.base_models(), str(form.get("base_model") or ""))
        base = models.ensure_files(self.engine, base)       # a demo written on first use: now
        data, captions, notes = datasets.dataset_for_run(self.engine.files, form, base)
        config, total, per_epoch = build_config(form, base, data, output_path=self.root,
                                                models_dir=self.engine.models_dir,
                                                reserved=(datasets.DATASETS, CACHES), loras=self.engine.loras(),
                                                caches=self.caches_root)
        notes += config_notes(config, total, per_epoch, self.engine.vram_limit)
        if config.vram_limit:
            plan = memory_plan(config, config.vram_limit, self._device_name(), base.get("family"))
            notes.append(plan["summary"])
            if self._device_name() == "cpu":      # nothing to fit on a CPU: the plan is shown, not applied
                config = config.replace(vram_limit=None)
        return RunPlan(config, notes, total, captions)

    def plan(self, form: dict) -> dict:
        """The memory plan of the run the form describes, before anything loads: ``{"text": markdown, "fits",
        "summary"}`` (``engine.training.memory``: from the model files' headers). Nothing is written."""
        config = self._plan({**form, "captions": None, "vram_limit": None}).config
        family = models.pick_base(self.base_models(), str(form.get("base_model") or "")).get("family")
        limit = vram_limit(form)
        device = self._device_name()
        plan = memory_plan(config, limit, device, family)
        lines = [f"`{plan['summary']}`", *[f"- {line.strip()}" for line in plan.get("lines", [])[1:]]]
        if device == "cpu":
            lines.append("\nThis machine trains on the CPU: the plan is what a CUDA card of that size would run.")
        return {"text": "\n".join(lines), "fits": bool(plan.get("fits", True)), "summary": plan["summary"]}

    def caches(self) -> list[dict]:
        """Split training's encoded datasets under ``<models>/train/caches/`` (``engine.training.cache.list_caches``),
        newest first."""
        if not self.caches_root.is_dir():     # the usual case at start-up: no import for an empty list
            return []
        from engine.training.cache import list_caches  # noqa: PLC0415 - imports torch
        return list_caches(self.caches_root)

    def gpu_count(self) -> int:
        """The GPUs a run may spread over (``start``'s ``gpus``): the CUDA devices, 0 on a CPU (several CPU
        processes only with ``ACCELERATE_USE_CPU=true``: ``studio.training.process.gpu_count``)."""
        return process.gpu_count(self._device_name())

    def loras(self) -> list[str]:
        """The LoRA library's names (a differential LoRA's fused one is chosen among them)."""
        return [entry["name"] for entry in self.engine.loras()]

    def start(self, form: dict) -> dict:
        """Start a run from the tab's plain values:

        ``base_model`` (variant name), ``train`` ("lora" / "full"), ``lora_rank``, ``targets`` (a preset key of
        ``TARGET_PRESETS`` or module names), ``dataset`` (folder) and/or ``metadata`` (file), ``captions`` (the
        table's rows: written to the folder's .txt files first), ``repeat``, ``steps`` or ``epochs``,
        ``learning_rate``, ``resolution`` (the side of the pixel budget; ``fixed_size`` crops to a square of it)
        or ``max_pixels``, ``save_every`` (steps; empty = every epoch), ``sample_prompts`` (text, one per line),
        ``sample_seed``, ``sample_every``, ``sample_size``, ``sample_steps``, ``seed``, ``gradient_checkpointing``
        (and ``gradient_checkpointing_offload``: its activations in CPU memory), ``fp8_base``, ``run_name``,
        ``trigger_word`` (put before every caption while training; saved in the run's config, not in the .txt files),
        ``gpus`` (how many GPUs it trains on, at most ``gpu_count()``; 1 or empty: one process on the engine's device).

        Returns ``{"run_dir", "name", "total", "notes", "command"}``. Bad input is an EngineError naming the fix."""
        gpus = process.check_gpus(form.get("gpus"), self.gpu_count())
        plan = self._plan(form)
        with self._Claim(self, plan.config.run_name):
            datasets.write_captions(plan.captions)      # only now: a refused form writes nothing
            handle = process.launch(plan.config, self.mode, self.engine.device, gpus)
            with self._lock:
                self._handle, self._shown = handle, handle.run_dir
        return {"run_dir": str(handle.run_dir), "name": handle.run_dir.name, "total": plan.total,
                "notes": plan.notes, "command": command_line(plan.config, gpus)}

    class _Claim:
        """Marks a launch in progress (image jobs are refused), waits briefly for a finishing generation, frees the
        engine's loaded models for the run; undone if the launch fails."""

        def __init__(self, jobs, name):
            self.jobs, self.name = jobs, name

        def __enter__(self):
            jobs = self.jobs
            with jobs._lock:
                active = jobs._active_dir()
                if jobs._starting or active is not None:
                    what = jobs._starting or active.name
                    raise EngineError(f"Training run '{what}' is already going on: stop it (or wait for it to end) "
                                      f"before starting another.")
                jobs._starting = self.name
            try:
                if not jobs.engine.wait_until_idle(GENERATION_WAIT_S):
                    raise EngineError("An image job is running (Generate, Edit or Inpaint tab): wait for it to "
                                      "finish or cancel it, then start training.")
                jobs.engine.release_models()      # the run gets the device's memory
            except BaseException:
                jobs._starting = None
                raise
            return self

        def __exit__(self, *exc):
            self.jobs._starting = None
            return False

    def stop(self) -> str:
        """Ask the active run to stop: it saves a resumable state at the next step and ends as "stopped"."""
        with self._lock:
            run_dir = self._active_dir()
            if run_dir is None:
                raise EngineError("No training run is going on.")
            if self._handle is not None and self._handle.running:
                self._handle.stop()
            else:
                process.request_stop(run_dir)
        return f"Stopping '{run_dir.name}': it saves at the next step, then Resume continues from there."

    def resume(self, run_dir) -> dict:
        """Continue a stopped, failed or interrupted run in its own folder, at its saved step, to the same total, on
        as many GPUs as it started with."""
        text = str(run_dir or "").strip()
        if not text:
            raise EngineError("Choose a run to resume (the past runs list).")
        path = self._run_dir(text)
        summary = process.resumable(path)
        gpus = process.run_processes(path)       # a run resumes on as many GPUs as it started with
        if gpus > 1:
            process.check_gpus(gpus, self.gpu_count(), run=path.name)
        with self._Claim(self, path.name):
            handle = process.relaunch(path, self.mode, self.engine.device, gpus)
            with self._lock:
                self._handle, self._shown = handle, handle.run_dir
        return {"run_dir": str(path), "name": path.name, "step": summary["last_saved_step"],
                "total": summary["total_steps"]}

    # ------------------------------------------------------------------------------------------------- following
    def show(self, run_dir) -> None:
        """Make ``poll()`` report on this past run (the tab's "view" of a run)."""
        path = self._run_dir(run_dir)
        with self._lock:
            self._shown = path

    def poll(self) -> dict:
        """The run on show (the active one, else the last started or viewed) as plain values for the tab:
        ``{"run", "run_dir", "status" (idle, starting, running, stopping, finished, stopped, failed,
        interrupted), "active", "step", "total", "loss": [{"step", "loss", "loss_avg"}], "eta", "text",
        "samples": [{"path", "step"}], "log": [lines], "log_count", "final", "published", "lora_name", "error",
        "checkpoints": [{"step", "path", "name", "samples": [paths]}], "kind" (lora / full), "busy"}``."""
        with self._lock:
            run_dir = self._active_dir() or self._shown
            handle = self._handle if self._handle is not None and run_dir == self._handle.run_dir else None
            starting = self._starting
        if run_dir is None:
            return {**progress.idle_report(starting), "busy": self.busy_message()}
        view = self._view(run_dir)
        active = (handle is not None and handle.running) or run_dir == self._active_dir()
        out = progress.report(view, run_dir, active, handle, self.engine.models_dir)
        out["busy"] = self.busy_message() if active else ""
        return out

    def try_checkpoint(self, path) -> dict:
        """Put a saved LoRA of one of this studio's runs in the LoRA library (``<models>/loras/trained/<run>-<file>``;
        the same file again is not copied twice), so the Generate tab can use it. Returns ``{"lora_name", "path",
        "family"}`` (``lora_name``: its name in the LoRA list; ``family``: "FLUX.1" / "FLUX.2", None if unknown)."""
        file = pathlib.Path(str(path or "").strip())
        if not str(path or "").strip():
            raise EngineError("Choose a checkpoint first (the list under the checkpoint grid).")
        run_dir = self._run_dir(file.parent)
        file = run_dir / file.name
        if not file.is_file() or file.suffix != ".safetensors":
            raise EngineError(f"{file.name} is not a saved checkpoint of '{run_dir.name}' (it may have been deleted).")
        if (process.read_run(run_dir).get("kind") or "lora") != "lora":
            raise EngineError(f"'{run_dir.name}' trained full weights, not a LoRA: load {file} as the transformer "
                              f"instead (the LoRA list takes LoRAs only).")
        data = process.read_run(run_dir)
        final = data.get("published") if str(file) == str(data.get("final")) else None
        if final and pathlib.Path(final).is_file():      # the run's last save: already in the list
            published = pathlib.Path(final)
        else:
            published = process.publish_checkpoint(file, self.engine.models_dir, f"{run_dir.name}-{file.stem}")
        from engine.lora.family import file_family
        return {"lora_name": progress.published_name(str(published), self.engine.models_dir), "path": str(published),
                "family": file_family(published)}

    def runs(self) -> list[dict]:
        """Past runs, newest first (``studio.training.process.past_runs``)."""
        return process.past_runs(self.root)


def memory_plan(config: TrainConfig, limit, device: str, family: Optional[str] = "FLUX.1") -> dict:
    """``engine.training.memory.plan_for_config`` for the studio: a plan for a CUDA card even when the studio runs
    on the CPU (what the person is planning for), its refusal as an EngineError."""
    from engine.training import memory  # noqa: PLC0415 - imports torch
    if family in ("FLUX.2", "FLUX 3"):
        raise EngineError(f"A VRAM plan for training is made for FLUX.1 models here; {family} trains with every model "
                          "on the device (turn on gradient checkpointing and fp8 storage to use less).")
    try:
        plan = memory.plan_for_config(config, limit, "cuda" if device == "cpu" else device)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    if not plan.get("fits", True):
        raise EngineError(f"Train within {limit:g} GB: {(plan.get('notes') or ['it does not fit'])[0]}")
    return plan
