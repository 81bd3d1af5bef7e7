"""What the Train tab shows of a run, read from its ``events.jsonl`` (incrementally: only new lines each time), so a
run looks the same whether it trains in a thread, in a child process or was started before a restart."""
from __future__ import annotations

import math
import pathlib
from collections import deque
from typing import Optional

from engine.lora.names import lora_dir

MAX_LOG = 300                    # log lines kept for the tab
MAX_PLOT_POINTS = 1500           # the loss plot is thinned above this


def duration_text(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return ""
    s = int(round(max(0.0, float(seconds))))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class RunView:
    """One run's events so far: the latest launch, step, end, the loss per step, the samples and a log."""

    def __init__(self, run_dir):
        self.run_dir = pathlib.Path(run_dir)
        self.offset = 0
        self.losses: dict[int, tuple[float, float]] = {}   # step -> (loss, loss_avg); a redone step replaces
        self.samples: list[tuple[str, int]] = []            # (path, step)
        self.log: deque = deque(maxlen=MAX_LOG)
        self.start: Optional[dict] = None                   # the latest launch's start event
        self.last_step: Optional[dict] = None               # the latest step event since that start
        self.end: Optional[dict] = None                     # the latest end event (None while it trains)
        self.checkpoint: Optional[dict] = None
        self.cache: Optional[dict] = None                   # the latest "cache" event (cache-first: encoding)
        self.saved: dict[str, int] = {}                     # each saved LoRA / weights file -> its step
        self.log_count = 0                                  # lines ever logged (the tab resends the log on change)

    def _note(self, line: str) -> None:
        self.log.append(line)
        self.log_count += 1

    def update(self) -> "RunView":
        from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
        events, self.offset = ck.read_events(self.run_dir, self.offset)
        for event in events:
            self.add(event)
        return self

    def add(self, e: dict) -> None:
        kind = e.get("event")
        if kind == "start":
            self.start, self.last_step, self.end = e, None, None
            what = "Resumed" if e.get("resumed") else "Started"
            self._note(f"{what} at step {e.get('step', 0)} of {e.get('total_steps')}: "
                       f"{e.get('dataset_size')} images, {e.get('trainable_params', 0):,} trained parameters.")
        elif kind == "cache":
            self.cache = e
            if e.get("reused"):
                self._note(f"The dataset's cache is reused: {e.get('total')} encoded images, no encoder loaded.")
            elif e.get("done") == e.get("total"):
                self._note(f"Dataset encoded into the cache: {e.get('total')} images.")
        elif kind == "plan":
            self._note(str(e.get("summary") or "").lstrip("= "))
        elif kind == "step":
            self.last_step = e
            self.losses[int(e["step"])] = (float(e["loss"]), float(e.get("loss_avg", e["loss"])))
        elif kind == "sample":
            for path in e.get("paths") or []:
                if path not in {p for p, _ in self.samples}:
                    self.samples.append((path, int(e.get("step", 0))))
            self._note(f"Samples at step {e.get('step')}.")
        elif kind == "checkpoint":
            self.checkpoint = e
            if e.get("path") and e.get("path") != "None":
                self.saved[str(e["path"])] = int(e.get("step", 0))
            self._note(f"Saved step {e.get('step')}: {pathlib.Path(str(e.get('path'))).name}")
        elif kind == "log":
            self._note(str(e.get("message", "")))
        elif kind == "end":
            self.end = e
            if e.get("final") and e.get("status") == "finished":    # the last save, made after the loop
                self.saved.setdefault(str(e["final"]), int(e.get("step") or 0))
            line = f"Run {e.get('status')} at step {e.get('step')}"
            if e.get("error"):
                line += f": {e['error']}"
            self._note(line + ".")

    def checkpoints(self) -> list[dict]:
        """The saved files still on disk, oldest first: ``{"step", "path", "name", "samples"}`` with the samples
        drawn at that step (a grid per checkpoint)."""
        out = []
        for path, step in sorted(self.saved.items(), key=lambda item: item[1]):
            if pathlib.Path(path).is_file():
                out.append({"step": step, "path": path, "name": pathlib.Path(path).name,
                            "samples": [p for p, s in self.samples if s == step and pathlib.Path(p).is_file()]})
        return out

    def loss_series(self) -> list[dict]:
        steps = sorted(self.losses)
        if len(steps) > MAX_PLOT_POINTS:       # thin evenly, always keeping the latest step
            stride = math.ceil(len(steps) / MAX_PLOT_POINTS)
            steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
        return [{"step": s, "loss": self.losses[s][0], "loss_avg": self.losses[s][1]} for s in steps]


def run_status(view: RunView, run_dir: pathlib.Path, active: bool, handle) -> str:
    """idle, starting, running, stopping, finished, stopped, failed or interrupted. ``handle``: the engine's
    TrainingHandle when this studio launched the run, else None."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    if active:
        if ck.stop_requested(run_dir):
            return "stopping"
        if view.last_step is None or view.end is not None:
            return "starting"       # (a resumed run: the events so far end with the last launch's end)
        return "running"
    if view.end is not None and view.end.get("status") in ("finished", "stopped", "failed"):
        return view.end["status"]
    if handle is not None and handle.error is not None:
        # a child process that ended without its end event was killed or crashed: its last save resumes
        return "interrupted" if handle.mode == "process" else "failed"
    return ck.run_summary(run_dir)["status"]


def published_name(published: Optional[str], models_dir) -> Optional[str]:
    """The finished LoRA's name in the LoRA list (relative to ``<models>/loras/``)."""
    if not published:
        return None
    try:
        return pathlib.Path(published).relative_to(lora_dir(models_dir)).as_posix()
    except ValueError:
        return pathlib.Path(published).name


def idle_report(starting: Optional[str]) -> dict:
    """``report``'s keys when no run is on show (``starting``: a run being launched)."""
    return {"run": None, "run_dir": None, "status": "starting" if starting else "idle", "active": bool(starting),
            "step": 0, "total": None, "loss": [], "eta": "", "samples": [], "log": [], "log_count": 0,
            "final": None, "published": None, "lora_name": None, "error": None, "checkpoints": [], "kind": None,
            "text": "Starting…" if starting else "No run yet."}


def report(view: RunView, run_dir: pathlib.Path, active: bool, handle, models_dir) -> dict:
    """A run's state as plain values for the tab (see ``TrainingJobs.poll``), without ``busy``."""
    from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
    data = ck.read_run(run_dir)
    status = run_status(view, run_dir, active, handle)
    last = view.last_step or {}
    start = view.start or {}
    end = view.end or {}
    error = end.get("error") or data.get("error")
    if handle is not None and handle.error is not None and not error:
        error = str(handle.error)
    published = end.get("published") or data.get("published")
    out = {"run": run_dir.name, "run_dir": str(run_dir), "status": status, "active": active,
           "step": int(last.get("step") or start.get("step") or data.get("step") or 0),
           "total": last.get("total_steps") or start.get("total_steps") or data.get("total_steps"),
           "loss": view.loss_series(), "eta": duration_text(last.get("eta_s")) if status == "running" else "",
           "samples": [{"path": p, "step": s} for p, s in view.samples if pathlib.Path(p).is_file()],
           "log": list(view.log), "log_count": view.log_count, "final": end.get("final") or data.get("final"),
           "published": published, "lora_name": published_name(published, models_dir), "error": error,
           "checkpoints": view.checkpoints(), "kind": (data.get("kind") or "lora"), "cache": view.cache}
    out["text"] = status_text(out, last)
    return out


def status_text(p: dict, last: dict) -> str:
    """One line for the tab: where the run is and what to do next (``p``: ``report``'s values, ``last``: the
    latest step event)."""
    name, status, step, total = p["run"], p["status"], p["step"], p["total"]
    of = f"{step}/{total}" if total else str(step)
    if status == "starting" and p.get("cache") and not p["cache"].get("reused"):
        c = p["cache"]
        if c.get("done") == c.get("total"):
            return f"Starting '{name}': the dataset is encoded ({c['total']} images); loading the transformer…"
        return f"Starting '{name}': encoding the dataset into its cache, {c.get('done')}/{c.get('total')}…"
    if status == "starting":
        return f"Starting '{name}': loading the models…"
    if status == "running" and total and step >= total:
        return f"Training '{name}': step {of} done; saving the LoRA and the last samples…"
    if status == "running":
        bits = [f"Step {of}"]
        if last.get("loss") is not None:
            bits.append(f"loss {last['loss']:.4f} (avg {last.get('loss_avg', last['loss']):.4f})")
        if last.get("sec_per_step"):
            bits.append(f"{last['sec_per_step']:.2f} s/step")
        if p["eta"]:
            bits.append(f"about {p['eta']} left")
        return f"Training '{name}': " + " · ".join(bits)
    if status == "stopping":
        return f"Stopping '{name}' at step {of}: saving a state to resume from…"
    if status == "finished":
        text = f"Finished '{name}': {step} steps."
        if p["lora_name"]:
            text += f" The LoRA is in the Generate tab's LoRA list as {p['lora_name']}."
        elif p["final"]:
            text += f" Weights: {p['final']}."
        return text
    if status == "stopped":
        return f"Stopped '{name}' at step {of} (saved). Resume continues from step {step}."
    if status in ("failed", "interrupted"):
        from engine.training import checkpoints as ck  # noqa: PLC0415 - imports torch
        saved = ck.run_summary(p["run_dir"])["last_saved_step"]
        where = f" Resume continues from step {saved}." if saved is not None else ""
        return f"{status.capitalize()} '{name}' at step {of}: {p['error'] or 'see the log'}.{where}"
    return f"'{name}': {status}, step {of}."
