"""The training API the studio's Train tab calls: start a run in the background, follow it, stop, resume, list.

```python
from engine.training import TrainConfig, start_training, resume_training, list_runs, runs_dir

config = TrainConfig(dataset_base_path="data/my_photos",                 # images + same-named .txt captions
                     model_id_with_origin_paths="black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,...",
                     lora_base_model="dit", lora_target_modules=DIFFSYNTH_FLUX_TARGETS, lora_rank=16,
                     num_epochs=10, save_steps=100, output_path=str(runs_dir(models)), run_name="my-style",
                     validate_prompts=["a photo in my style"], validate_steps=100, publish_to=str(models))
handle = start_training(config, on_progress=print, mode="process")     # or mode="thread"
handle.stop()          # saves a resumable state at the next step, then ends ("stopped")
handle.wait()          # -> {"status", "step", "total_steps", "final", "run_dir", "loss", ...}
handle = resume_training(handle.run_dir, on_progress=print)             # continues at the saved step
list_runs(runs_dir(models))                                             # summaries, newest first
```

Progress events (the callback's one argument; the same objects are lines of ``<run>/events.jsonl``), each with
``event``, ``run_dir`` and ``time``:

- ``start``: ``step`` (where it starts: 0, or the resumed step), ``total_steps``, ``steps_per_epoch``,
  ``dataset_size``, ``trainable_params``, ``kind`` ("lora" / "full"), ``resumed``
- ``step``: ``step`` (done), ``total_steps``, ``epoch``, ``loss``, ``loss_avg`` (last 20), ``lr``, ``elapsed_s``,
  ``sec_per_step``, ``eta_s``
- ``sample``: ``step``, ``paths`` (the validation images just written under ``<run>/samples/``)
- ``checkpoint``: ``step``, ``path`` (the LoRA / weights file), ``state`` (the resume state)
- ``log``: ``message`` (dataset notes, skipped images, LoRA targets, resume)
- ``end``: ``status`` ("finished", "stopped", "failed"), ``step``, ``final`` (the last file), ``error``,
  ``published`` (the copy in ``<models>/loras/trained/``)

``mode="thread"`` trains in this process (callbacks are direct; the models stay loaded until the thread ends);
``mode="process"`` runs ``python -m engine.training --resume <run>`` in a child process (all its memory is returned
when it ends, a crash cannot take the studio down; callbacks come from a thread that follows ``events.jsonl``).

Several GPUs: ``start_training(config, mode="process", num_processes=2)`` starts ``accelerate launch --multi_gpu
--num_processes 2 -m engine.training --resume <run>`` instead (``cli.accelerate_command``; ``accelerate_config``: an
accelerate config file such as the seed's DeepSpeed ZeRO-2 one). Only the main process writes ``events.jsonl``, so it
is followed the same way; the count is kept in run.json (``processes``) and ``resume_training`` relaunches with it (a
state saved by N processes resumes only on N). ``kill()`` ends the launcher and every worker under it.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from engine.errors import EngineError

from . import checkpoints as ck
from .args import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[2]


def runs_dir(models_dir) -> pathlib.Path:
    """Where the studio keeps training runs: ``<models>/train/`` (the seed's scripts write ``./models/train/...``)."""
    return pathlib.Path(models_dir) / "train"


def list_runs(root) -> list[dict]:
    """Each run under ``root``: ``run_dir``, ``name``, ``status`` (running, finished, stopped, failed, interrupted),
    ``step``, ``total_steps``, ``loss``, ``outputs``, ``final``, ``samples``, ``resumable``, ``last_saved_step``,
    ``created``, ``updated``, ``error``; newest first."""
    return ck.list_runs(root)


def prepare_run(config: TrainConfig, processes: Optional[int] = None,
                accelerate_config: Optional[str] = None) -> pathlib.Path:
    """A new run folder for ``config`` with its run.json (status "created"; ``processes``: how many training
    processes it runs on, which its resumes must use too -- unknown when None, see ``run_processes``)."""
    run_dir = ck.new_run_dir(config.output_path, config.run_name)
    extra = {"processes": int(processes)} if processes else {}
    if accelerate_config:
        extra["accelerate_config"] = str(accelerate_config)
    ck.write_run(run_dir, status="created", created=ck.now(), config=config.to_json(),
                 kind="lora" if config.is_lora else "full", **extra)
    return run_dir


def run_processes(run_dir) -> int:
    """How many training processes ``run_dir`` trains on: run.json's ``processes`` (runs the studio started), else
    the count its newest resume state was saved by (runs started by ``accelerate launch train.py``), else 1."""
    recorded = ck.read_run(run_dir).get("processes")
    if recorded:
        return int(recorded)
    latest = ck.latest_state(run_dir)
    if latest is None:
        return 1
    import torch  # noqa: PLC0415
    state = torch.load(latest, map_location="cpu", weights_only=True, mmap=True)   # mmap: no tensor is read
    return int(state.get("processes", 1))


def _kill_tree(pid: int) -> None:
    """Kill ``pid`` and every process under it: accelerate launch's workers would otherwise keep training and
    holding their GPUs. (Not a process group of its own: Ctrl+C in the studio's terminal still reaches the run.)"""
    import psutil  # noqa: PLC0415 - accelerate's dependency
    try:
        root = psutil.Process(pid)
        root.suspend()                       # starts no worker while its tree is listed
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _free_port() -> int:
    """A port for the processes' rendezvous (accelerate's default 29500 may be taken by another run or program)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_config(run_dir) -> TrainConfig:
    data = ck.read_run(run_dir)
    if not data.get("config"):
        raise FileNotFoundError(f"{run_dir} is not a training run (no run.json with a config).")
    return TrainConfig.from_json(data["config"])


def run_training(config: TrainConfig, run_dir=None, on_progress: Optional[Callable[[dict], None]] = None,
                 stop_event: Optional[threading.Event] = None) -> dict:
    """Train in the calling thread (a new run folder unless ``run_dir`` names a prepared or resumable one)."""
    from .runner import Trainer
    run_dir = prepare_run(config) if run_dir is None else pathlib.Path(run_dir)
    return Trainer(config, run_dir, on_progress=on_progress, stop_event=stop_event).run()


class TrainingHandle:
    """A run going on in the background."""

    def __init__(self, run_dir, config: TrainConfig, mode: str, on_progress=None, num_processes: int = 1):
        self.run_dir = pathlib.Path(run_dir)
        self.config = config
        self.mode = mode
        self.num_processes = int(num_processes)
        self.on_progress = on_progress
        self.events: list[dict] = []
        self.result: Optional[dict] = None
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.process: Optional[subprocess.Popen] = None

    # ------------------------------------------------------------------ state
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def status(self) -> str:
        if self.running:
            return "running"
        if self.result:
            return self.result.get("status", "finished")
        return "failed" if self.error else ck.run_summary(self.run_dir)["status"]

    @property
    def last_step(self) -> Optional[dict]:
        steps = [e for e in self.events if e.get("event") == "step"]
        return steps[-1] if steps else None

    def _deliver(self, event: dict) -> None:
        self.events.append(event)
        if self.on_progress is not None:
            try:
                self.on_progress(event)
            except Exception:  # noqa: BLE001 - the UI's problem, not the run's
                pass

    # ------------------------------------------------------------------ control
    def stop(self, wait: bool = False, timeout: Optional[float] = None) -> None:
        """Ask the run to stop: it saves a resumable state at the next step boundary and ends as "stopped"."""
        self._stop.set()
        ck.request_stop(self.run_dir)
        if wait:
            self.wait(timeout)

    def kill(self) -> None:
        """End a process-mode run at once, every process of it (no save: it resumes from its last saved state)."""
        if self.process is not None and self.process.poll() is None:
            _kill_tree(self.process.pid)
            self.process.kill()

    def wait(self, timeout: Optional[float] = None) -> Optional[dict]:
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None and not self.running:
            raise self.error
        return self.result

    # ------------------------------------------------------------------ runners
    def _start_thread(self):
        from .runner import Trainer

        def target():
            try:
                self.result = Trainer(self.config, self.run_dir, on_progress=self._deliver, stop_event=self._stop,
                                      log=lambda m: None).run()
            except BaseException as exc:  # noqa: BLE001 - kept for wait() / status
                self.error = exc

        self._thread = threading.Thread(target=target, name=f"train-{self.run_dir.name}", daemon=True)
        self._thread.start()

    def _command(self, python: str, accelerate_config: Optional[str]) -> tuple[list[str], dict]:
        """One process: ``python -m engine.training --resume RUN``; several: the same under ``accelerate launch``."""
        if self.num_processes <= 1 and not accelerate_config:
            return [python, "-m", "engine.training", "--resume", str(self.run_dir)], {}
        from .cli import accelerate_command
        return accelerate_command(self.run_dir, self.num_processes, config_file=accelerate_config,
                                  main_process_port=_free_port(), python=python)

    def _start_process(self, python: str, env: Optional[dict], accelerate_config: Optional[str] = None):
        command, extra = self._command(python, accelerate_config)
        log = open(self.run_dir / "process.log", "ab")
        environment = {**os.environ, **extra, **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
        _, offset = ck.read_events(self.run_dir)   # follow only what this process writes
        self.process = subprocess.Popen(command, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, env=environment)
        log.close()

        def follow():
            nonlocal offset
            while True:
                alive = self.process.poll() is None
                events, offset = ck.read_events(self.run_dir, offset)
                for event in events:
                    self._deliver(event)
                    if event.get("event") == "end":
                        self.result = {k: v for k, v in event.items() if k not in ("event", "time")}
                if not alive:
                    break
                time.sleep(0.2)
            if self.result is None:
                code = self.process.returncode
                self.error = RuntimeError(f"The training process ended with exit code {code} before finishing; see "
                                          f"{self.run_dir / 'process.log'}. It resumes from its last saved state.")
                self._deliver({"event": "end", "status": "interrupted", "run_dir": str(self.run_dir),
                               "error": str(self.error), "time": time.time()})

        self._thread = threading.Thread(target=follow, name=f"train-follow-{self.run_dir.name}", daemon=True)
        self._thread.start()


def _check_processes(num_processes, mode: str, run_dir=None) -> int:
    if mode not in ("thread", "process"):
        raise ValueError("mode must be 'thread' or 'process'")
    n = int(num_processes)
    if n < 1:
        raise EngineError(f"num_processes {n}: a run needs at least 1 training process.")
    if n > 1 and mode != "process":
        what = f"'{pathlib.Path(run_dir).name}' trains" if run_dir else "A run"
        raise EngineError(f"{what} on {n} processes: start it with mode='process' (one thread is one process).")
    return n


def _launch(run_dir, config, on_progress, mode, python, env, processes=1, accelerate_config=None) -> TrainingHandle:
    ck.clear_stop(run_dir)
    handle = TrainingHandle(run_dir, config, mode, on_progress, num_processes=processes)
    if mode == "thread":
        handle._start_thread()
    else:
        handle._start_process(python or sys.executable, env, accelerate_config)
    return handle


def start_training(config: TrainConfig, on_progress: Optional[Callable[[dict], None]] = None, mode: str = "thread",
                   python: Optional[str] = None, env: Optional[dict] = None, num_processes: int = 1,
                   accelerate_config: Optional[str] = None) -> TrainingHandle:
    """Start a new run in the background (a new run folder under ``config.output_path``). ``num_processes`` > 1
    (one per GPU; ``mode="process"`` only) launches it with ``accelerate launch``; ``accelerate_config``: an
    accelerate config file for that launch (DeepSpeed ZeRO-2, say)."""
    n = _check_processes(num_processes, mode)
    return _launch(prepare_run(config, n, accelerate_config), config, on_progress, mode, python, env, n,
                   accelerate_config)


def resume_training(run_dir, on_progress: Optional[Callable[[dict], None]] = None, mode: str = "thread",
                    python: Optional[str] = None, env: Optional[dict] = None,
                    num_processes: Optional[int] = None) -> TrainingHandle:
    """Continue a stopped, killed or failed run from its last saved state, in its own folder, to the same total, on
    the processes it trained on (``run_processes``; ``num_processes`` overrides it, and the trainer refuses a count
    that differs from its saved state's, naming the command that resumes it)."""
    config = load_config(run_dir)
    n = _check_processes(run_processes(run_dir) if num_processes is None else num_processes, mode, run_dir)
    return _launch(pathlib.Path(run_dir), config, on_progress, mode, python, env, n,
                   ck.read_run(run_dir).get("accelerate_config"))
