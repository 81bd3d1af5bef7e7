"""Where a run trains, and its folder on disk as the studio sees it (launching, finding a trainer still alive,
asking it to stop, the past runs).

Runs train in a child process (``python -m engine.training --resume <run>``): a crash or an out-of-memory error
cannot take the studio down, every byte of the run's memory is returned when it ends, and the device is chosen
by the child's environment. Measured on this 2-core CPU with the demo model: the child spends ~5 s importing
torch/diffusers before its first step (a 3-step run: 6.9 s against 0.9 s in a thread) -- nothing next to a real
run's minutes or hours, so "process" is the default; "thread" stays available (TrainingJobs(engine, mode=...)).

A run on several GPUs (the tab's "GPUs") always trains in child processes: ``accelerate launch --multi_gpu
--num_processes N`` (one process per GPU, the first N the studio sees), its count kept in the run's run.json so that
Resume relaunches it on as many. On a machine without CUDA, ``ACCELERATE_USE_CPU=true`` in the studio's environment
(accelerate's own switch) lets a run use several CPU processes over gloo instead (tests; ``gpu_count``).

``engine.training``'s modules import torch: they are imported inside the functions that use them.
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

from engine.errors import EngineError

DEFAULT_MODE = "process"
MODES = ("thread", "process")
LIVE = ("running", "starting")      # the statuses of a run whose trainer may still be at work


def runs_root(models_dir) -> pathlib.Path:
    """``<models>/train/``: the run folders (never written over, resumable)."""
    from engine.training.api import runs_dir  # noqa: PLC0415 - imports torch
    return runs_dir(models_dir)


def cpu_processes() -> int:
    """How many CPU training processes a run may use when ``ACCELERATE_USE_CPU`` is set (0 when it is not): one per
    core, at least 2 (gloo runs more processes than cores, only slower)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() not in ("1", "true", "yes"):
        return 0
    return max(2, os.cpu_count() or 1)


def gpu_count(device: str) -> int:
    """The GPUs a run may spread over: the CUDA devices (0 when the studio runs on the CPU), or the CPU processes
    allowed by ``ACCELERATE_USE_CPU``."""
    if cpu_processes():
        return cpu_processes()
    if str(device).startswith("cpu"):
        return 0
    import sys  # noqa: PLC0415
    if "torch" not in sys.modules:       # the page being built: counted without importing torch (cold start)
        return visible_cuda_devices()
    import torch  # noqa: PLC0415
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_cuda_devices() -> int:
    """The CUDA devices this process may use, told without importing torch: CUDA_VISIBLE_DEVICES when set, else the
    NVIDIA driver's entries under /proc (Linux); 0 when neither says (torch decides when a run starts)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([d for d in listed.split(",") if d.strip() and not d.strip().startswith("-")])
    gpus = pathlib.Path("/proc/driver/nvidia/gpus")
    return sum(1 for _ in gpus.iterdir()) if gpus.is_dir() else 0


def check_gpus(value, available: int, run: Optional[str] = None) -> int:
    """The form's ``gpus`` (empty = 1) as a count this machine has, else an EngineError naming how many it has
    (``run``: the name of a run being resumed, which must use the count it started with)."""
    try:
        n = 1 if value in (None, "") else int(float(value))
    except (TypeError, ValueError):
        raise EngineError(f"GPUs: {value!r} is not a number; choose how many GPUs the run trains on (1 = one).") \
            from None
    if n < 1:
        raise EngineError(f"GPUs: {n}; a run trains on at least 1 GPU.")
    if n == 1 or n <= available:
        return n
    has = ("no CUDA GPU (the studio trains on the CPU)" if available == 0
           else f"{available} GPU" + ("s" if available > 1 else ""))
    if run:
        raise EngineError(f"'{run}' trained on {n} GPUs and this machine has {has}: a run resumes on as many GPUs as "
                          f"it started with. Resume it where {n} are present (accelerate launch --multi_gpu "
                          f"--num_processes {n} train.py --resume <its folder>).")
    fix = "set GPUs to 1" if available <= 1 else f"set GPUs to {available} or fewer"
    raise EngineError(f"A run on {n} GPUs needs {n} of them and this machine has {has}: {fix}.")


def launch_env(mode: str, device, gpus: int = 1) -> dict:
    """The child's environment for the engine's device (accelerate picks the GPU whenever it sees one). Several GPUs:
    the ones the studio sees (accelerate gives process k the k-th)."""
    if mode != "process":
        return {}
    device = str(device or "")
    if device == "cpu":
        return {"env": {"CUDA_VISIBLE_DEVICES": ""}}
    if device.startswith("cuda:") and gpus <= 1:
        return {"env": {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}}
    return {"env": {}}


def launch(config, mode: str, device, gpus: int = 1):
    """Start a new run of ``config`` on ``gpus`` processes (engine.training.api.TrainingHandle); several always in
    child processes."""
    from engine.training.api import start_training  # noqa: PLC0415 - imports torch
    mode = "process" if gpus > 1 else mode
    return start_training(config, mode=mode, num_processes=gpus, **launch_env(mode, device, gpus))


def run_processes(run_dir) -> int:
    """How many processes (GPUs) the run trains on: its resumes must use as many."""
    from engine.training.api import run_processes as count  # noqa: PLC0415 - imports torch
    return count(run_dir)


def relaunch(run_dir, mode: str, device, gpus: int = 1):
    """Continue a run in its own folder from its last save on the ``gpus`` processes it trained on
    (engine.training.api.TrainingHandle)."""
    from engine.training.api import resume_training  # noqa: PLC0415 - imports torch
    mode = "process" if gpus > 1 else mode
    return resume_training(run_dir, mode=mode, num_processes=gpus, **launch_env(mode, device, gpus))


def read_run(run_dir) -> dict:
    """The run's ``run.json`` ({} when there is none)."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    return ck.read_run(run_dir)


def trainer_alive(run_dir) -> bool:
    """Whether the run says it trains and the process hosting its trainer still exists."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    data = ck.read_run(run_dir)
    return data.get("status") in LIVE and ck.pid_alive(data.get("host_pid"))


def find_running(root) -> Optional[pathlib.Path]:
    """A run under ``root`` still training in another process (the studio restarted while it trained)."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    for run in ck.list_runs(root):
        if run["status"] in LIVE:
            host = ck.read_run(run["run_dir"]).get("host_pid")
            if ck.pid_alive(host) and host != os.getpid():
                return pathlib.Path(run["run_dir"])
    return None


def is_run(path: pathlib.Path) -> bool:
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    return (path / ck.RUN_FILE).is_file()


def request_stop(run_dir) -> None:
    """Ask the run's trainer, wherever it runs, to save and stop at the next step (its STOP file)."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    ck.request_stop(run_dir)


def resumable(path: pathlib.Path) -> dict:
    """The run's summary if it can be resumed, else an EngineError saying why not."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    summary = ck.run_summary(path)
    if summary["status"] == "finished":
        raise EngineError(f"'{path.name}' has finished ({summary['step']} steps); there is nothing to resume. "
                          f"Start a new run to train longer.")
    if summary["status"] in LIVE and ck.pid_alive(ck.read_run(path).get("host_pid")):
        raise EngineError(f"'{path.name}' is still training.")
    cache_first = bool((ck.read_run(path).get("config") or {}).get("cache_dir"))
    if not summary["resumable"] and cache_first:     # stopped while encoding: the cache so far is kept and reused
        return {**summary, "last_saved_step": summary["last_saved_step"] or 0}
    if not summary["resumable"]:
        raise EngineError(f"'{path.name}' stopped before its first save, so there is no state to resume from: "
                          f"start it again (its settings are in {path / ck.RUN_FILE}).")
    return summary


def past_runs(root) -> list[dict]:
    """Past runs, newest first: ``{"name", "run_dir", "status", "step", "total", "loss", "created", "final",
    "published", "resumable", "last_saved_step", "kind", "error"}``."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    out = []
    for run in ck.list_runs(root):
        out.append({"name": run["name"], "run_dir": run["run_dir"], "status": run["status"],
                    "step": run["step"], "total": run["total_steps"], "loss": run["loss"],
                    "created": run["created"], "final": run["final"],
                    "published": ck.read_run(run["run_dir"]).get("published"),
                    "resumable": run["resumable"], "last_saved_step": run["last_saved_step"],
                    "kind": run["kind"], "error": run["error"]})
    return out


def publish_checkpoint(file: pathlib.Path, models_dir, name: str) -> pathlib.Path:
    """``file`` in the LoRA library as ``trained/<name>.safetensors``; a copy already there with the same bytes is
    used again (pressing "try" twice makes no second file)."""
    import filecmp  # noqa: PLC0415

    from engine.lora.names import lora_dir  # noqa: PLC0415
    from engine.training.runner import publish_lora  # noqa: PLC0415 - imports torch
    existing = pathlib.Path(lora_dir(models_dir)) / "trained" / f"{name}.safetensors"
    if existing.is_file() and filecmp.cmp(existing, file, shallow=False):
        return existing
    return publish_lora(file, models_dir, name)
