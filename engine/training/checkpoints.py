"""Run folders and resume states: nothing is ever written over an earlier run, every file appears whole.

A run folder::

    run.json              the run's TrainConfig, status, step, totals, outputs (rewritten atomically)
    events.jsonl          one JSON object per progress event (step, loss, ETA, samples, checkpoints, end)
    loss.csv              step,loss (the seed's CSV log)
    step-50.safetensors   the trained LoRA / weights at step 50 (the seed's names: step-N or epoch-N)
    samples/              validation images, step-000050-0.png ...
    state/step-000050.pt  what resuming needs: trained weights, optimizer, LR scheduler, step, accumulated
                          gradients, RNG states (the last ``keep_states`` kept)
    STOP                  present = a stop was requested (the trainer saves and exits at the next step)

Every file is written to a temporary name in the same folder and renamed, so a run killed at any moment leaves the
previous state intact and never a truncated file under a real name.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import random
import re
from typing import Optional

RUN_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
LOSS_FILE = "loss.csv"
STATE_DIR = "state"
SAMPLES_DIR = "samples"
STOP_FILE = "STOP"
_STATE_RE = re.compile(r"^step-(\d+)\.pt$")


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    from .. import safe_files
    safe_files.write_text(path, text)


def new_run_dir(output_path, run_name: Optional[str] = None) -> pathlib.Path:
    """A new, empty folder for a run. ``output_path`` itself when it does not exist or is empty (as the seed's
    scripts expect); beside it with ``_2``, ``_3`` ... when it already holds a run; inside it, named by the time,
    when it is some other non-empty folder (such as a models folder)."""
    base = pathlib.Path(output_path).expanduser()
    if run_name:
        base = base / run_name
    candidates = []
    if not base.exists() or (base.is_dir() and not any(base.iterdir())):
        candidates.append(base)
    if base.exists() and not (base / RUN_FILE).exists() and not run_name:
        stamp = _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
        candidates += [base / stamp] + [base / f"{stamp}_{n}" for n in range(2, 1000)]
    else:
        candidates += [base.with_name(f"{base.name}_{n}") for n in range(2, 10000)]
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.is_dir() and not any(path.iterdir()):
                claim = path / RUN_FILE       # claim the empty folder atomically
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                return path
            path.mkdir()                      # fails if another run took it meanwhile
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"No free run folder name beside {base}.")


def read_run(run_dir) -> dict:
    path = pathlib.Path(run_dir) / RUN_FILE
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else {}
    except FileNotFoundError:
        return {}


def write_run(run_dir, **fields) -> dict:
    """Update run.json with ``fields`` (atomic rewrite); returns the new content."""
    data = read_run(run_dir)
    data.update(fields, updated=now())
    atomic_write_text(pathlib.Path(run_dir) / RUN_FILE, json.dumps(data, indent=2, ensure_ascii=False, default=str))
    return data


def append_event(run_dir, event: dict) -> None:
    with open(pathlib.Path(run_dir) / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")


def read_events(run_dir, offset: int = 0) -> tuple[list[dict], int]:
    """Events written since byte ``offset`` (complete lines only) and the new offset."""
    path = pathlib.Path(run_dir) / EVENTS_FILE
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]
    return events, offset + end


def request_stop(run_dir) -> None:
    (pathlib.Path(run_dir) / STOP_FILE).touch()


def stop_requested(run_dir) -> bool:
    return (pathlib.Path(run_dir) / STOP_FILE).exists()


def clear_stop(run_dir) -> None:
    try:
        (pathlib.Path(run_dir) / STOP_FILE).unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------------------- resume states
# torch is imported in the functions that use it: listing runs (the Train tab, while the page is built) needs none.
def rng_states() -> dict:
    import torch
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    if not state:
        return
    import torch
    torch.set_rng_state(state["torch"])
    if state.get("python") is not None:
        random.setstate(_to_tuples(state["python"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def state_files(run_dir) -> list[tuple[int, pathlib.Path]]:
    folder = pathlib.Path(run_dir) / STATE_DIR
    if not folder.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_RE.match(p.name))]
    return sorted(out)


def latest_state(run_dir) -> Optional[pathlib.Path]:
    files = state_files(run_dir)
    return files[-1][1] if files else None


def save_state(run_dir, step: int, state: dict, keep: int = 2) -> pathlib.Path:
    """Write ``state`` as ``state/step-<step>.pt`` (temporary name, then renamed) and delete all but the newest
    ``keep`` states."""
    folder = pathlib.Path(run_dir) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{int(step):06d}.pt"
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    import torch
    torch.save(state, tmp)
    os.replace(tmp, path)
    for _step, old in state_files(run_dir)[: -max(1, int(keep))]:
        old.unlink(missing_ok=True)
    return path


def unique_path(path) -> pathlib.Path:
    """``path`` if free, else ``<stem>_2<suffix>``, ``_3`` ... (nothing is ever written over)."""
    path = pathlib.Path(path)
    if not path.exists():
        return path
    for n in range(2, 100000):
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise RuntimeError(f"No free name beside {path}.")


def load_state(path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


# -------------------------------------------------------------------------------------------------- listing
def pid_alive(pid) -> bool:
    """Whether a process with this id exists (a run's trainer or the studio that started it)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False


def run_summary(run_dir) -> dict:
    run_dir = pathlib.Path(run_dir)
    data = read_run(run_dir)
    status = data.get("status", "unknown")
    if status == "running" and data.get("host_pid") and not pid_alive(data.get("host_pid")):
        status = "interrupted"   # the process died without saying so (killed, power loss)
    states = state_files(run_dir)
    samples = sorted(str(p) for p in (run_dir / SAMPLES_DIR).glob("*.png")) if (run_dir / SAMPLES_DIR).is_dir() else []
    return {
        "run_dir": str(run_dir), "name": run_dir.name, "status": status,
        "step": data.get("step", 0), "total_steps": data.get("total_steps"), "loss": data.get("loss"),
        "created": data.get("created"), "updated": data.get("updated"), "kind": data.get("kind"),
        "outputs": data.get("outputs", []), "final": data.get("final"), "samples": samples,
        "resumable": bool(states) and status not in ("finished",), "last_saved_step": states[-1][0] if states else None,
        "error": data.get("error"), "dataset_size": data.get("dataset_size"),
    }


def list_runs(root) -> list[dict]:
    """Summaries of the runs in ``root`` (and ``root`` itself if it is one), newest first."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        return []
    dirs = [root] if (root / RUN_FILE).exists() else []
    dirs += [d for d in root.iterdir() if d.is_dir() and (d / RUN_FILE).exists()]
    runs = [run_summary(d) for d in dirs]
    return sorted(runs, key=lambda r: r.get("created") or "", reverse=True)
