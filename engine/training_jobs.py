"""The studio's training runs (the Train tab's service): datasets, one run at a time on the engine's device, its
progress as plain dicts, stop and resume, the finished LoRA handed to the Generate tab's LoRA picker.

```python
jobs = engine.training                      # TrainingJobs(engine), made on first use
ds = jobs.prepare_dataset(["a.png", "b.png"], {"a.png": "a photo of sks dog"})  # copied: <models>/train/datasets/
jobs.start({"base_model": "FLUX.1-dev", "dataset": ds["folder"], "captions": ds["rows"], "steps": 500})
jobs.poll()       # {"status", "step", "total", "loss": [...], "eta", "samples", "log", "final", "published", ...}
jobs.stop(); jobs.resume(run_dir)
```

Runs go in ``<models>/train/<name>/`` (``engine.training``'s run folders: never written over, resumable); the
finished LoRA is copied into ``<models>/loras/trained/``, which ``engine.loras()`` lists. While a run trains,
``busy_message()`` is what ``Engine.generate`` refuses with: training and image jobs share the device's memory.
No gradio here.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import pathlib
import re
import shlex
import threading
from collections import deque
from typing import Any, Optional

from . import registry, safe_files
from .errors import EngineError
from .model_config import ModelConfig
from .training import checkpoints as ck
from .training.api import list_runs, resume_training, runs_dir, start_training
from .training.args import TrainConfig
from .training.data import CAPTION_SUFFIX, IMAGE_SUFFIXES, read_metadata
from .training.lora_targets import DIFFSYNTH_FLUX_TARGETS

# Runs train in a child process (``python -m engine.training --resume <run>``): a crash or an out-of-memory error
# cannot take the studio down, every byte of the run's memory is returned when it ends, and the device is chosen
# by the child's environment. Measured on this 2-core CPU with the demo model: the child spends ~5 s importing
# torch/diffusers before its first step (a 3-step run: 6.9 s against 0.9 s in a thread) -- nothing next to a real
# run's minutes or hours, so "process" is the default; "thread" stays available (TrainingJobs(engine, mode=...)).
DEFAULT_MODE = "process"
DATASETS = "datasets"            # <models>/train/datasets/<name>/: uploaded images + .txt captions
MAX_LOG = 300                    # log lines kept for the tab
MAX_PLOT_POINTS = 1500           # the loss plot is thinned above this
GENERATION_WAIT_S = 3.0          # how long start() waits for a generation that is just finishing
NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")

# What the LoRA is added to. DiffSynth's names (the seed's scripts) and diffusers' names both resolve
# (engine.training.lora_targets); "" is the seed's automatic choice.
TARGET_PRESETS = {
    "attention+mlp": ("Attention, MLP and norms (the seed's FLUX scripts)", DIFFSYNTH_FLUX_TARGETS),
    "attention": ("Attention only (smaller, gentler)",
                  "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"),
    "all": ("Every linear layer of the blocks (automatic)", ""),
}
DEFAULT_TARGETS = "attention+mlp"
# Variants whose transformer takes inputs the trainer does not feed yet (mask / control channels, Qwen-VL).
UNTRAINABLE_INPAINT = ("fill", "flex")
TRAINABLE_EXTRA = ("kontext_images",)


def _now_stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def safe_name(text: Any, fallback: str = "") -> str:
    """A folder / file name from free text: letters, digits, ``. _ -``; others become ``-``."""
    name = NAME_RE.sub("-", str(text or "").strip()).strip(".-_")
    return name[:80] or fallback


def duration_text(seconds: Optional[float]) -> str:
    if seconds is None or seconds != seconds:
        return ""
    s = int(round(max(0.0, float(seconds))))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _write_text(path: pathlib.Path, text: str) -> None:
    safe_files.write_text(path, text)


def _image_ok(path: pathlib.Path) -> Optional[str]:
    """None for an image the trainer may decode; else why not (its header says too large, or not an image)."""
    from PIL import Image
    from .images import check_image_file
    try:
        check_image_file(path)                 # sizes from the header first: a decompression bomb is never opened
        with Image.open(path) as im:
            im.verify()
        return None
    except EngineError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any reader error: not an image we can train on
        return f"{type(exc).__name__}"


def _number(form: dict, key: str, kind, label: str, default=None, minimum=None, allow_empty=True):
    value = form.get(key, default)
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_empty:
            return default
        raise EngineError(f"{label} is empty: give a number.")
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise EngineError(f"{label} must be a number, got {value!r}.") from None
    if kind is int and float(value) != int(float(value)):
        raise EngineError(f"{label} must be a whole number, got {value!r}.")
    if number != number or number in (float("inf"), float("-inf")):
        raise EngineError(f"{label} must be a finite number, got {value!r}.")
    if minimum is not None and number < minimum:
        raise EngineError(f"{label} must be at least {minimum}, got {value!r}.")
    return number


def command_line(config: TrainConfig) -> str:
    """The same run as a ``train.py`` command (every setting that differs from the defaults)."""
    default = TrainConfig()
    parts = ["python train.py"]
    for key, value in config.to_json().items():
        if value == getattr(default, key) or key in ("publish_to",):
            continue
        if key == "validate_prompts":
            parts += [f"--validate_prompt {shlex.quote(p)}" for p in value]
        elif key == "validate_kontext_images":
            parts += [f"--validate_kontext_image {shlex.quote(p)}" for p in value]
        elif isinstance(value, bool):
            if value:
                parts.append(f"--{key}")
        elif value is not None:
            parts.append(f"--{key} {shlex.quote(str(value))}")
    if config.publish_to:
        parts.append(f"--publish_to {shlex.quote(config.publish_to)}")
    return " \\\n  ".join(parts)


# ------------------------------------------------------------------------------------------------- one run's view
class RunView:
    """What the tab shows of one run, read from its ``events.jsonl`` (incrementally: only new lines each time), so
    a run looks the same whether it trains in a thread, in a child process or was started before a restart."""

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
        self.log_count = 0                                  # lines ever logged (the tab resends the log on change)

    def _note(self, line: str) -> None:
        self.log.append(line)
        self.log_count += 1

    def update(self) -> "RunView":
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
            self._note(f"Saved step {e.get('step')}: {pathlib.Path(str(e.get('path'))).name}")
        elif kind == "log":
            self._note(str(e.get("message", "")))
        elif kind == "end":
            self.end = e
            line = f"Run {e.get('status')} at step {e.get('step')}"
            if e.get("error"):
                line += f": {e['error']}"
            self._note(line + ".")

    def loss_series(self) -> list[dict]:
        steps = sorted(self.losses)
        if len(steps) > MAX_PLOT_POINTS:       # thin evenly, always keeping the latest step
            stride = math.ceil(len(steps) / MAX_PLOT_POINTS)
            steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
        return [{"step": s, "loss": self.losses[s][0], "loss_avg": self.losses[s][1]} for s in steps]


# ------------------------------------------------------------------------------------------------------ the service
class TrainingJobs:
    """One training run at a time for the studio, on the engine's device (see the module's docstring)."""

    def __init__(self, engine, mode: str = DEFAULT_MODE):
        if mode not in ("thread", "process"):
            raise ValueError("mode must be 'thread' or 'process'")
        self.engine = engine
        self.mode = mode
        self._lock = threading.RLock()
        self._handle = None                  # engine.training.api.TrainingHandle of the run started here
        self._starting: Optional[str] = None  # a run being launched (generation is refused meanwhile)
        self._adopted: Optional[pathlib.Path] = None   # a run still training from before a studio restart
        self._views: dict[str, RunView] = {}
        self._shown: Optional[pathlib.Path] = None     # the run poll() reports on
        self._adopt_running()

    # ------------------------------------------------------------------------------------------------- folders
    @property
    def root(self) -> pathlib.Path:
        return runs_dir(self.engine.models_dir)

    @property
    def datasets_root(self) -> pathlib.Path:
        return self.root / DATASETS

    def _view(self, run_dir) -> RunView:
        key = str(pathlib.Path(run_dir))
        with self._lock:          # several browser tabs poll at once: each event line is read once
            if key not in self._views:
                self._views[key] = RunView(run_dir)
            return self._views[key].update()

    # ------------------------------------------------------------------------------------------------- state
    def _adopt_running(self) -> None:
        """A run whose trainer is still alive (the studio restarted while it trained) is followed like our own:
        generation waits for it and Stop reaches it (through its STOP file)."""
        for run in list_runs(self.root):
            if run["status"] in ("running", "starting"):
                data = ck.read_run(run["run_dir"])
                if ck.pid_alive(data.get("host_pid")) and data.get("host_pid") != os.getpid():
                    self._adopted = self._shown = pathlib.Path(run["run_dir"])
                    return

    def _adopted_alive(self) -> bool:
        if self._adopted is None:
            return False
        data = ck.read_run(self._adopted)
        if data.get("status") in ("running", "starting") and ck.pid_alive(data.get("host_pid")):
            return True
        self._adopted = None
        return False

    def running(self) -> bool:
        """True while a run is launching or training (image jobs are refused meanwhile)."""
        with self._lock:
            return bool(self._starting) or (self._handle is not None and self._handle.running) \
                or self._adopted_alive()

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
        import torch
        return "GPU" if torch.cuda.is_available() else "CPU"

    # ------------------------------------------------------------------------------------------------- models
    @staticmethod
    def target_presets() -> list[tuple[str, str]]:
        """(key, label) of the LoRA target presets ``start`` takes as ``targets`` (or module names instead)."""
        return [(key, label) for key, (label, _spec) in TARGET_PRESETS.items()]

    def base_models(self) -> list[dict]:
        """The variants a LoRA (or full weights) can be trained on, as the engine lists them (the demo included):
        ``{"name", "label", "available", "demo", "extra_inputs", "description", "note", "model_paths" (JSON list
        for TrainConfig), "model_id_with_origin_paths", "tokenizer_1_path", "tokenizer_2_path",
        "default_steps", "default_guidance"}``; the files only where ``available``."""
        out = []
        for info in self.engine.variants():
            variant = registry.get_variant(info["name"])
            extra = set(variant.extra_inputs)
            if variant.inpaint in UNTRAINABLE_INPAINT or extra - set(TRAINABLE_EXTRA):
                continue
            if not any(f.role == "dit" for f in variant.files) or any(f.role.startswith("step1x") for f in
                                                                        variant.files):
                continue
            entry = {"name": variant.name, "label": info.get("label", variant.label), "demo": variant.demo,
                     "extra_inputs": sorted(extra), "description": variant.description,
                     "default_steps": variant.default_steps, "default_guidance": variant.default_guidance,
                     "model_id_with_origin_paths": ",".join(f"{f.model_id}:{f.pattern}" for f in variant.files
                                                           if not f.role.startswith("tokenizer"))}
            try:
                entry.update(self._files(variant))
                entry["available"] = True
                entry["note"] = variant.description
            except Exception as exc:  # noqa: BLE001 - a missing file: listed, not offered
                entry["available"] = False
                entry["note"] = (f"Not in the models folder yet ({exc}). Generate with it once (it is downloaded) or "
                                 f"put its files in {self.engine.models_dir}, then train.")
            if "kontext_images" in extra:
                entry["note"] += (" Trains on pairs: a metadata file (CSV / JSON) with image, prompt and "
                                  "kontext_images columns.")
            out.append(entry)
        out.sort(key=lambda e: (not e["available"], e["demo"]))
        return out

    def _files(self, variant) -> dict:
        """Absolute files of a variant, without downloading (the child process reads them by path)."""
        models = pathlib.Path(self.engine.models_dir)
        paths, tokenizers = [], {}
        for spec in variant.files:
            files = ModelConfig(model_id=spec.model_id, origin_file_pattern=spec.pattern).resolve(
                models, allow_download=False)
            if spec.role.startswith("tokenizer"):
                tokenizers[f"{spec.role}_path"] = str(files[0])
            else:
                group = [str(p) for p in files]
                paths.append(group[0] if len(group) == 1 else group)   # sharded files: one entry, as the seed's
        return {"model_paths": json.dumps(paths), **tokenizers}

    def _base(self, name: str) -> dict:
        models = self.base_models()
        if not name:
            available = [m for m in models if m["available"]]
            if not available:
                raise EngineError("No model to train on: put FLUX.1-dev (or another FLUX.1 model) in the models "
                                  "folder, or start the studio with --demo.")
            return available[0]
        for m in models:
            if name in (m["name"], m["label"]):
                if not m["available"]:
                    raise EngineError(f"{m['name']}: {m['note']}")
                return m
        raise EngineError(f"{name!r} cannot be trained here. Choose one of: "
                          f"{', '.join(m['name'] for m in models if m['available']) or 'none installed'}.")

    # ------------------------------------------------------------------------------------------------- datasets
    def prepare_dataset(self, files, captions=None, name: Optional[str] = None) -> dict:
        """Copy uploaded images into a new folder ``<models>/train/datasets/<name>/`` with a same-named ``.txt``
        caption each (never writing over anything). ``captions``: {file name: caption} or a list in the images'
        order; an uploaded ``.txt`` whose name matches an image is its caption. Files that are not images are
        skipped and named in ``notes``. Returns ``{"folder", "rows": [[file, caption]], "notes", "originals" (copy
        name -> uploaded name)}``."""
        files = [pathlib.Path(str(f)) for f in (files or []) if f]
        if not files:
            raise EngineError("No files uploaded: add the training images (PNG, JPEG, WebP), with .txt captions of "
                              "the same names if you have them.")
        for f in files:
            self.engine.files.check(f, "an uploaded training file")
        images = [p for p in files if p.suffix.lower() != CAPTION_SUFFIX]
        from_txt = {}   # image -> its uploaded .txt: the same stem, in the same folder if several images share it
        for txt in (p for p in files if p.suffix.lower() == CAPTION_SUFFIX):
            same = [p for p in images if p.stem == txt.stem and p not in from_txt]
            pick = next((p for p in same if p.parent == txt.parent), same[0] if same else None)
            if pick is not None:
                from_txt[pick] = txt
        if isinstance(captions, (list, tuple)):
            captions = {images[i].name: c for i, c in enumerate(captions) if i < len(images)}
        captions = dict(captions or {})
        notes, kept = [], []
        for p in images:
            if not p.is_file():
                notes.append(f"{p.name}: the upload is gone; upload it again.")
            elif p.suffix.lower() not in IMAGE_SUFFIXES:
                notes.append(f"{p.name} skipped: not an image type the trainer reads ({', '.join(IMAGE_SUFFIXES)}).")
            elif (why := _image_ok(p)) is not None:
                notes.append(f"{p.name} skipped: it cannot be read as an image ({why}).")
            else:
                kept.append(p)
        if not kept:
            raise EngineError("None of the uploaded files is a readable image (PNG, JPEG, WebP, BMP). "
                              + " ".join(notes))
        base = safe_name(name, f"dataset-{_now_stamp()}")
        self.datasets_root.mkdir(parents=True, exist_ok=True)
        folder = ck.unique_path(self.datasets_root / base)
        folder.mkdir(parents=True)
        rows, originals = [], {}
        for p in kept:
            target = ck.unique_path(folder / (safe_name(p.stem, "image") + p.suffix.lower()))
            safe_files.copy_file(p, target)
            caption = captions.get(p.name)
            if caption is None and p in from_txt:
                caption = from_txt[p].read_text(encoding="utf-8", errors="replace")
            caption = str(caption or "").strip()
            _write_text(target.with_suffix(CAPTION_SUFFIX), caption)
            rows.append([target.name, caption])
            originals[target.name] = p.name
        empty = sum(1 for _, c in rows if not c)
        if empty:
            notes.append(f"{empty} of {len(rows)} images have no caption yet: write them in the table (an empty "
                         f"caption trains with an empty prompt).")
        return {"folder": str(folder), "metadata": None, "rows": rows, "notes": notes, "originals": originals}

    def read_dataset(self, path, base=None) -> dict:
        """A folder of images with ``.txt`` captions, or a metadata file (CSV / JSON / JSONL: image, prompt, extra
        columns; its paths relative to ``base``, by default its own folder): ``{"folder", "metadata" (None for a
        folder), "rows": [[file, caption]], "notes"}``."""
        text = str(path or "").strip()
        if not text:
            raise EngineError("No dataset path: give a folder of images with .txt captions, or a metadata file "
                              "(.csv, .json, .jsonl).")
        p = pathlib.Path(text).expanduser()
        # Only folders the person chose (models, outputs, --allow-dir) are listed: never any folder of the server.
        self.engine.files.check(p, "the dataset folder")
        if base:
            self.engine.files.check(base, "the dataset folder")
        if not p.exists():
            raise EngineError(f"{p} does not exist: give a folder of images or a metadata file.")
        notes: list[str] = []
        if p.is_dir():
            rows = []
            for image in sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES):
                caption = image.with_suffix(CAPTION_SUFFIX)
                rows.append([image.relative_to(p).as_posix(),
                             caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file()
                             else ""])
            if not rows:
                raise EngineError(f"{p} holds no images ({', '.join(IMAGE_SUFFIXES)}); a .txt is a caption, never an "
                                  f"image.")
            empty = sum(1 for _, c in rows if not c)
            if empty:
                notes.append(f"{empty} of {len(rows)} images have no caption (.txt): they train with an empty prompt "
                             f"unless you write one in the table.")
            return {"folder": str(p), "metadata": None, "rows": rows, "notes": notes}
        if p.suffix.lower() not in (".csv", ".json", ".jsonl"):
            raise EngineError(f"{p.name} is not a metadata file: give a .csv, .json or .jsonl file (image, prompt "
                              f"columns) or a folder of images.")
        records = read_metadata(p)
        if not records:
            raise EngineError(f"{p} has no records.")
        if not any("image" in r for r in records):
            raise EngineError(f"{p} has no 'image' column (columns: {', '.join(records[0])}).")
        folder = pathlib.Path(str(base)).expanduser() if base else p.parent
        self._check_metadata_files(records, folder, p.name)
        rows = [[str(r.get("image", "")), str(r.get("prompt") or "")] for r in records]
        missing = [f for f, _ in rows if f and not f.startswith("[") and not (folder / f).exists()]
        if missing:
            notes.append(f"{len(missing)} image(s) named in {p.name} are not in {folder} and will be skipped: "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}.")
        columns = sorted({k for r in records for k in r} - {"image", "prompt"})
        if columns:
            notes.append(f"Extra columns: {', '.join(columns)}.")
        return {"folder": str(folder), "metadata": str(p), "rows": rows, "notes": notes,
                "columns": columns}

    def _check_metadata_files(self, records: list, folder: pathlib.Path, name: str) -> None:
        """The files a metadata file names (image, kontext_images) must lie in the folders the person chose too."""
        for r in records:
            for key in ("image", "kontext_images"):
                value = r.get(key)
                values = value if isinstance(value, list) else [value]
                for v in values:
                    if isinstance(v, str) and v and not v.startswith("[") and not self.engine.files.contains(folder / v):
                        raise self.engine.files.refusal(f"{v!r} (named in {name})")

    def caption_changes(self, folder, rows) -> list[tuple[pathlib.Path, str]]:
        """The ``.txt`` files the table's captions would change: [(file, caption)], nothing written. Names outside
        the dataset folder, or images no longer there, are refused."""
        folder = self.engine.files.check(pathlib.Path(str(folder)).expanduser(), "the dataset folder")
        changes = []
        for name, caption in _rows(rows):
            image = (folder / name).resolve()
            if not image.is_relative_to(folder):
                raise EngineError(f"{name!r} is outside the dataset folder {folder}.")
            if not image.is_file():
                raise EngineError(f"{name} is not in the dataset folder {folder} (was it renamed or deleted?). "
                                  f"Load the folder again.")
            txt = image.with_suffix(CAPTION_SUFFIX)
            old = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
            if old != caption:
                changes.append((txt, caption))
        return changes

    def save_captions(self, folder, rows) -> int:
        """Write the table's captions to the folder's ``.txt`` files (only those that changed); returns how many.
        Captions are read fresh by every run, so the next run trains with them."""
        changes = self.caption_changes(folder, rows)
        for txt, caption in changes:
            _write_text(txt, caption)
        return len(changes)

    # ------------------------------------------------------------------------------------------------- a run
    def build_config(self, form: dict) -> tuple[TrainConfig, list[str], int]:
        """A TrainConfig from the tab's plain values (see ``start``), notes for the person, the run's steps. Writes
        nothing: the table's captions are written by ``start`` once the whole form is valid."""
        config, notes, total, _captions = self._plan(form)
        return config, notes, total

    def _plan(self, form: dict) -> tuple[TrainConfig, list[str], int, list]:
        """``build_config``'s work, plus the caption files to write before the run starts."""
        notes: list[str] = []
        captions: list = []
        base = self._base(str(form.get("base_model") or ""))
        folder = str(form.get("dataset") or "").strip()
        metadata = str(form.get("metadata") or "").strip() or None
        if not folder and not metadata:
            raise EngineError("No training images: upload images (or give a folder / metadata file) first.")
        if metadata and not folder:
            folder = str(pathlib.Path(metadata).expanduser().parent)
        data = self.read_dataset(metadata or folder, base=folder if metadata else None)
        rows = _rows(form.get("captions"))
        if rows and data["metadata"] is None:
            captions = self.caption_changes(data["folder"], rows)
            if captions:
                notes.append(f"{len(captions)} caption(s) saved to the dataset's .txt files.")
            table = dict(rows)
            data["rows"] = [[f, table.get(f, c)] for f, c in data["rows"]]
        elif rows and data["metadata"]:
            given = {f: c for f, c in rows}
            differ = [f for f, c in data["rows"] if f in given and given[f] != c]
            if differ:
                raise EngineError(f"Captions of a metadata dataset are its prompt column: edit "
                                  f"{pathlib.Path(data['metadata']).name} ({', '.join(differ[:3])} changed in the "
                                  f"table), or use a folder of images with .txt captions.")
        count = len(data["rows"])
        empty = sum(1 for _, c in data["rows"] if not c)
        if empty:
            notes.append(f"{empty} of {count} images have an empty caption: they train with an empty prompt.")
        kontext = "kontext_images" in base["extra_inputs"]
        if kontext and "kontext_images" not in (data.get("columns") or []):
            raise EngineError(f"{base['name']} trains on image pairs: give a metadata file with image, prompt and "
                              f"kontext_images columns (the reference image of each edit).")

        kind = str(form.get("train") or "lora").lower()
        if kind not in ("lora", "full"):
            raise EngineError(f"What to train must be 'lora' or 'full', got {kind!r}.")
        rank = _number(form, "lora_rank", int, "LoRA rank", 16)
        if kind == "lora" and rank < 1:
            raise EngineError(f"LoRA rank must be a positive whole number (4 to 128 is usual), got {rank}.")
        targets = str(form.get("targets") or DEFAULT_TARGETS)
        targets = TARGET_PRESETS[targets][1] if targets in TARGET_PRESETS else targets.strip()
        lr = _number(form, "learning_rate", float, "Learning rate", 1e-4 if kind == "lora" else 1e-5)
        if not lr > 0 or lr > 1:
            raise EngineError(f"Learning rate must be above 0 and at most 1 (1e-4 is usual for a LoRA, 1e-5 for "
                              f"full training), got {lr:g}.")
        repeat = _number(form, "repeat", int, "Repeats", 1, minimum=1)
        steps = _number(form, "steps", int, "Steps", None)
        epochs = _number(form, "epochs", int, "Epochs", None)
        if steps is not None and steps < 1:
            steps = None
        if epochs is not None and epochs < 1:
            epochs = None
        if steps is None and epochs is None:
            raise EngineError("Say how long to train: a number of steps or epochs (at least 1).")
        per_epoch = count * repeat
        num_epochs = epochs if steps is None else math.ceil(steps / per_epoch)
        total = steps if steps is not None else epochs * per_epoch
        resolution = _number(form, "resolution", int, "Resolution", 1024, minimum=64)
        if resolution > 4096:
            raise EngineError(f"Resolution must be at most 4096 px, got {resolution}.")
        max_pixels = _number(form, "max_pixels", int, "Max pixels", resolution * resolution, minimum=64 * 64)
        fixed = bool(form.get("fixed_size"))
        save_every = _number(form, "save_every", int, "Save every", None)
        if save_every is not None and save_every < 1:
            save_every = None    # 0 / empty: once per epoch (the seed's default)
        prompts = form.get("sample_prompts") or []
        if isinstance(prompts, str):
            prompts = prompts.splitlines()
        prompts = [str(p).strip() for p in prompts if str(p).strip()]
        sample_every = _number(form, "sample_every", int, "Sample every", None)
        if sample_every is not None and sample_every < 1:
            sample_every = None
        sample_size = _number(form, "sample_size", int, "Sample size", min(resolution, 1024), minimum=64)
        sample_steps = _number(form, "sample_steps", int, "Sample steps", min(20, base["default_steps"]), minimum=1)
        seed = _number(form, "seed", int, "Seed", 0, minimum=0)
        fp8 = bool(form.get("fp8_base"))
        if fp8 and kind == "full":
            raise EngineError("fp8 storage is for the frozen base of a LoRA run; full training updates the "
                              "transformer's own weights. Turn one of them off.")
        run_name = safe_name(form.get("run_name"), "")
        if not run_name:
            run_name = safe_name(f"{pathlib.Path(data['folder']).name}-{kind}", f"run-{_now_stamp()}")
        if run_name == DATASETS:
            run_name += "-run"
        dit_path = json.loads(base["model_paths"])[0]
        config = TrainConfig(
            dataset_base_path=data["folder"], dataset_metadata_path=data["metadata"], dataset_repeat=repeat,
            data_file_keys="image,kontext_images" if kontext else "image",
            extra_inputs="kontext_images" if kontext else None,
            model_paths=base["model_paths"], tokenizer_1_path=base.get("tokenizer_1_path"),
            tokenizer_2_path=base.get("tokenizer_2_path"), fp8_models=dit_path if fp8 else None,
            learning_rate=lr, num_epochs=num_epochs, max_steps=steps,
            output_path=str(self.root), save_steps=save_every,
            lora_base_model="dit" if kind == "lora" else None, lora_target_modules=targets, lora_rank=rank,
            trainable_models="dit" if kind == "full" else None,
            use_gradient_checkpointing=bool(form.get("gradient_checkpointing")),
            height=resolution if fixed else None, width=resolution if fixed else None, max_pixels=max_pixels,
            seed=seed, validate_prompts=prompts, validate_steps=sample_every if prompts else None,
            validate_seed=_number(form, "sample_seed", int, "Sample seed", 0, minimum=0),
            validate_height=sample_size, validate_width=sample_size, validate_num_inference_steps=sample_steps,
            validate_embedded_guidance=float(base["default_guidance"] or 3.5),
            publish_to=str(self.engine.models_dir) if kind == "lora" else None, run_name=run_name)
        if save_every is None:
            notes.append(f"A resumable save at the end of every epoch ({per_epoch} steps).")
        elif save_every > total:
            notes.append(f"Save every {save_every} steps is more than the run's {total} steps: it saves only at the "
                         f"end.")
        if self.engine.vram_limit:
            notes.append(f"Training keeps the model on the device as a whole; the studio's VRAM limit "
                         f"({self.engine.vram_limit:g} GB) is not applied to it. To use less memory, turn on gradient "
                         f"checkpointing and fp8 storage of the base.")
        return config, notes, total, captions

    def start(self, form: dict) -> dict:
        """Start a run from the tab's plain values:

        ``base_model`` (variant name), ``train`` ("lora" / "full"), ``lora_rank``, ``targets`` (a preset key of
        ``TARGET_PRESETS`` or module names), ``dataset`` (folder) and/or ``metadata`` (file), ``captions`` (the
        table's rows: written to the folder's .txt files first), ``repeat``, ``steps`` or ``epochs``,
        ``learning_rate``, ``resolution`` (the side of the pixel budget; ``fixed_size`` crops to a square of it)
        or ``max_pixels``, ``save_every`` (steps; empty = every epoch), ``sample_prompts`` (text, one per line),
        ``sample_seed``, ``sample_every``, ``sample_size``, ``sample_steps``, ``seed``, ``gradient_checkpointing``,
        ``fp8_base``, ``run_name``.

        Returns ``{"run_dir", "name", "total", "notes", "command"}``. Bad input is an EngineError naming the fix."""
        config, notes, total, captions = self._plan(form)
        with self._claim(config.run_name):
            for txt, caption in captions:      # only now: a refused form writes nothing
                _write_text(txt, caption)
            handle = start_training(config, mode=self.mode, **self._launch_kwargs())
            with self._lock:
                self._handle, self._shown = handle, handle.run_dir
        return {"run_dir": str(handle.run_dir), "name": handle.run_dir.name, "total": total, "notes": notes,
                "command": command_line(config)}

    def _launch_kwargs(self) -> dict:
        if self.mode != "process":
            return {}
        env = {}
        device = str(self.engine.device or "")
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""          # accelerate picks the GPU whenever it sees one
        elif device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        return {"env": env}

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
                lock = jobs.engine._lock
                if not lock.acquire(timeout=GENERATION_WAIT_S):
                    raise EngineError("An image job is running (Generate, Edit or Inpaint tab): wait for it to "
                                      "finish or cancel it, then start training.")
                lock.release()
                jobs.engine.release_models()      # the run gets the device's memory
            except BaseException:
                jobs._starting = None
                raise
            return self

        def __exit__(self, *exc):
            self.jobs._starting = None
            return False

    def _claim(self, name: str) -> "_Claim":
        return self._Claim(self, name)

    def _run_dir(self, run_dir) -> pathlib.Path:
        """A run folder of this studio (a name, or a path under ``<models>/train/``), or an EngineError."""
        text = str(run_dir or "").strip()
        path = pathlib.Path(text)
        if not path.is_absolute():
            path = self.root / text
        real = pathlib.Path(os.path.realpath(path))
        if not real.is_relative_to(pathlib.Path(os.path.realpath(self.root))) or not (real / ck.RUN_FILE).is_file():
            raise EngineError(f"{text or 'That'} is not one of this studio's training runs (the runs are in "
                              f"{self.root}). Choose one from the past runs list.")
        return path

    def stop(self) -> str:
        """Ask the active run to stop: it saves a resumable state at the next step and ends as "stopped"."""
        with self._lock:
            run_dir = self._active_dir()
            if run_dir is None:
                raise EngineError("No training run is going on.")
            if self._handle is not None and self._handle.running:
                self._handle.stop()
            else:
                ck.request_stop(run_dir)
        return f"Stopping '{run_dir.name}': it saves at the next step, then Resume continues from there."

    def resume(self, run_dir) -> dict:
        """Continue a stopped, failed or interrupted run in its own folder, at its saved step, to the same total."""
        text = str(run_dir or "").strip()
        if not text:
            raise EngineError("Choose a run to resume (the past runs list).")
        path = self._run_dir(text)
        summary = ck.run_summary(path)
        if summary["status"] == "finished":
            raise EngineError(f"'{path.name}' has finished ({summary['step']} steps); there is nothing to resume. "
                              f"Start a new run to train longer.")
        if summary["status"] in ("running", "starting") and ck.pid_alive(ck.read_run(path).get("host_pid")):
            raise EngineError(f"'{path.name}' is still training.")
        if not summary["resumable"]:
            raise EngineError(f"'{path.name}' stopped before its first save, so there is no state to resume from: "
                              f"start it again (its settings are in {path / ck.RUN_FILE}).")
        with self._claim(path.name):
            handle = resume_training(path, mode=self.mode, **self._launch_kwargs())
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
        "busy"}``."""
        with self._lock:
            run_dir = self._active_dir() or self._shown
            handle = self._handle if self._handle is not None and run_dir == self._handle.run_dir else None
            starting = self._starting
        if run_dir is None:
            return {"run": None, "run_dir": None, "status": "starting" if starting else "idle",
                    "active": bool(starting), "step": 0, "total": None, "loss": [], "eta": "", "samples": [],
                    "log": [], "log_count": 0, "final": None, "published": None, "lora_name": None, "error": None,
                    "text": "Starting…" if starting else "No run yet.", "busy": self.busy_message()}
        view = self._view(run_dir)
        data = ck.read_run(run_dir)
        active = (handle is not None and handle.running) or run_dir == self._active_dir()
        if active:
            if ck.stop_requested(run_dir):
                status = "stopping"
            elif view.last_step is None or view.end is not None:
                status = "starting"       # (a resumed run: the events so far end with the last launch's end)
            else:
                status = "running"
        elif view.end is not None and view.end.get("status") in ("finished", "stopped", "failed"):
            status = view.end["status"]
        elif handle is not None and handle.error is not None:
            # a child process that ended without its end event was killed or crashed: its last save resumes
            status = "interrupted" if handle.mode == "process" else "failed"
        else:
            status = ck.run_summary(run_dir)["status"]
        last = view.last_step or {}
        step = int(last.get("step") or (view.start or {}).get("step") or data.get("step") or 0)
        total = last.get("total_steps") or (view.start or {}).get("total_steps") or data.get("total_steps")
        end = view.end or {}
        error = end.get("error") or data.get("error")
        if handle is not None and handle.error is not None and not error:
            error = str(handle.error)
        final = end.get("final") or data.get("final")
        published = end.get("published") or data.get("published")
        lora_name = None
        if published:
            try:
                from .lora.library import lora_dir
                lora_name = pathlib.Path(published).relative_to(lora_dir(self.engine.models_dir)).as_posix()
            except ValueError:
                lora_name = pathlib.Path(published).name
        eta = duration_text(last.get("eta_s")) if status == "running" else ""
        out = {"run": run_dir.name, "run_dir": str(run_dir), "status": status, "active": active, "step": step,
               "total": total, "loss": view.loss_series(), "eta": eta,
               "samples": [{"path": p, "step": s} for p, s in view.samples if pathlib.Path(p).is_file()],
               "log": list(view.log), "log_count": view.log_count, "final": final, "published": published,
               "lora_name": lora_name, "error": error, "busy": self.busy_message() if active else ""}
        out["text"] = status_text(out, last, data)
        return out

    def runs(self) -> list[dict]:
        """Past runs, newest first: ``{"name", "run_dir", "status", "step", "total", "loss", "created", "final",
        "published", "resumable", "last_saved_step", "kind"}``."""
        out = []
        for run in list_runs(self.root):
            data = ck.read_run(run["run_dir"])
            out.append({"name": run["name"], "run_dir": run["run_dir"], "status": run["status"],
                        "step": run["step"], "total": run["total_steps"], "loss": run["loss"],
                        "created": run["created"], "final": run["final"], "published": data.get("published"),
                        "resumable": run["resumable"], "last_saved_step": run["last_saved_step"],
                        "kind": run["kind"], "error": run["error"]})
        return out


def _rows(rows) -> list[tuple[str, str]]:
    """The caption table's rows as (file, caption) pairs; blank rows dropped."""
    out = []
    for row in rows or []:
        if isinstance(row, dict):
            name, caption = row.get("file"), row.get("caption")
        else:
            row = list(row)
            name, caption = (row + [None, None])[:2]
        name = "" if name is None else str(name).strip()
        if not name or name.lower() == "nan":
            continue
        caption = "" if caption is None or (isinstance(caption, float) and caption != caption) else str(caption)
        out.append((name, caption.strip()))
    return out


def status_text(p: dict, last: dict, data: dict) -> str:
    """One line for the tab: where the run is and what to do next."""
    name, status, step, total = p["run"], p["status"], p["step"], p["total"]
    of = f"{step}/{total}" if total else str(step)
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
        saved = ck.run_summary(p["run_dir"])["last_saved_step"]
        where = f" Resume continues from step {saved}." if saved is not None else ""
        return f"{status.capitalize()} '{name}' at step {of}: {p['error'] or 'see the log'}.{where}"
    return f"'{name}': {status}, step {of}."
