"""The split-training cache: what stage 1 (``--task sft:data_process``) writes and stage 2 (``sft:train``) reads.

The project's own format, no pickles: in the run folder of stage 1,

- ``samples/000000.safetensors``: the encoded inputs' tensors (latents, prompt embeddings, Kontext / edit reference
  tokens, position ids), stored in the dtype they were computed in, named by their field (``kontext.tokens``);
- ``samples/000000.json``: the rest of the inputs (sizes, the inputs' class), the record's prompt and its distill
  settings / columns (seed, rand_device, num_inference_steps, cfg_scale) when present;
- ``cache_manifest.json``: family, encoder files, the size settings (height, width, max_pixels), the extra inputs,
  a hash of the captions (trigger word applied) and the trigger word, the tensors' widths the DiT must take, the
  count, and ``complete``.

Samples are written atomically (temporary name, then renamed; the JSON last, so a sample is there only when both
are), and a stage 1 resumed in the same folder skips the samples already written. Sample ``i`` is record ``i``
of the dataset in its own order, so a cache trains in exactly the order the records would.

For the Train tab: ``cache_key(config)`` names a run's cache folder (runs on the same data and encoders share one),
``list_caches(root)`` lists a folder of caches from their manifests; ``run_settings`` / ``settings_diffs`` are what
``--cache_dir`` (``engine.training.split``) checks a cache against before reusing or continuing it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ..conditions.kontext import KontextTokens
from ..errors import EngineError
from .args import TrainConfig
from .families import by_name
from .objective import TrainingInputs

MANIFEST = "cache_manifest.json"
SAMPLES = "samples"
FORMAT = "flux-studio-training-cache"
VERSION = 1


def _classes() -> dict:
    from .flux2 import Flux2TrainingInputs
    from .flux3 import Flux3TrainingInputs
    return {c.__name__: c for c in (TrainingInputs, KontextTokens, Flux2TrainingInputs, Flux3TrainingInputs)}


# ------------------------------------------------------------------------------------------ (de)serialising
def flatten(obj, prefix: str = "") -> tuple[dict, dict]:
    """``(tensors, fields)`` of an inputs dataclass: tensors by dotted field name, the rest JSON-ready (nested
    dataclasses as ``{"__type__": class name, ...}``)."""
    tensors, fields = {}, {"__type__": type(obj).__name__}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            tensors[prefix + f.name] = value.detach().to("cpu").contiguous()
            fields[f.name] = "__tensor__"
        elif dataclasses.is_dataclass(value):
            inner_t, inner_f = flatten(value, prefix + f.name + ".")
            tensors.update(inner_t)
            fields[f.name] = inner_f
        else:
            fields[f.name] = value
    return tensors, fields


def unflatten(tensors: dict, fields: dict, prefix: str = ""):
    classes = _classes()
    cls = classes.get(fields.get("__type__"))
    if cls is None:
        raise EngineError(f"The training cache holds inputs of an unknown kind ({fields.get('__type__')}): it was "
                          f"written by another version; re-run stage 1 (--task sft:data_process).")
    kwargs = {}
    for name, value in fields.items():
        if name == "__type__":
            continue
        if value == "__tensor__":
            kwargs[name] = tensors[prefix + name]
        elif isinstance(value, dict) and "__type__" in value:
            kwargs[name] = unflatten(tensors, value, prefix + name + ".")
        elif name == "sizes" and isinstance(value, list):
            kwargs[name] = [tuple(v) for v in value]
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_device(obj, device):
    """A copy of an inputs dataclass with every tensor on ``device`` (nested ones too)."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif dataclasses.is_dataclass(value):
            changes[f.name] = to_device(value, device)
    return dataclasses.replace(obj, **changes)


def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: pathlib.Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1), encoding="utf-8"))


def sample_paths(folder, index: int) -> tuple[pathlib.Path, pathlib.Path]:
    base = pathlib.Path(folder) / SAMPLES / f"{index:06d}"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def write_sample(folder, index: int, inputs, prompt: str, meta: dict) -> None:
    """One sample; inputs dataclasses in ``meta`` (direct distill's negative prompt encoding) are stored as the
    inputs are, their tensors under ``<key>.``."""
    tensors, fields = flatten(inputs)
    meta = dict(meta)
    for key, value in list(meta.items()):
        if dataclasses.is_dataclass(value):
            inner_t, meta[key] = flatten(value, key + ".")
            tensors.update(inner_t)
    seen = set()
    for key, t in tensors.items():   # safetensors refuses tensors sharing memory: each its own copy
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[key] = t.clone()
        seen.add(ptr)
    st, js = sample_paths(folder, index)
    st.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(st, lambda p: save_file(tensors, str(p)))
    _write_json(js, {"inputs": fields, "prompt": prompt, **meta})


def read_sample(folder, index: int) -> tuple[object, dict]:
    st, js = sample_paths(folder, index)
    try:
        data = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(st))
    except (OSError, ValueError) as exc:
        raise EngineError(f"Cached sample {index} in {folder} cannot be read ({exc}); re-run stage 1 "
                          f"(--task sft:data_process) into a new folder.") from None
    meta = {k: unflatten(tensors, v, k + ".") if isinstance(v, dict) and "__type__" in v else v
            for k, v in data.items() if k != "inputs"}
    return unflatten(tensors, data["inputs"]), meta


def sample_done(folder, index: int) -> bool:
    return all(p.is_file() for p in sample_paths(folder, index))


# ---------------------------------------------------------------------------------------------- the manifest
def captions_hash(prompts, trigger_word: Optional[str]) -> str:
    """A hash of the captions in record order (trigger word already applied) and the trigger word."""
    blob = json.dumps({"prompts": list(prompts), "trigger_word": (trigger_word or "").strip() or None})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def input_dims(inputs) -> dict:
    """The widths of the cached tensors the DiT must take (checked against its config in stage 2)."""
    if hasattr(inputs, "pooled"):   # FLUX.1: latents (1, C, h, w) are packed 2x2 into 4C channels
        return {"in_channels": int(inputs.latents.shape[1]) * 4,
                "joint_attention_dim": int(inputs.prompt_emb.shape[-1]),
                "pooled_projection_dim": int(inputs.pooled.shape[-1])}
    return {"in_channels": int(inputs.latents.shape[-1]), "joint_attention_dim": int(inputs.prompt_emb.shape[-1])}


def read_manifest(folder) -> Optional[dict]:
    try:
        return json.loads((pathlib.Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EngineError(f"{pathlib.Path(folder) / MANIFEST} cannot be read ({exc}); re-run stage 1.") from None


def write_manifest(folder, manifest: dict) -> pathlib.Path:
    path = pathlib.Path(folder) / MANIFEST
    _write_json(path, manifest)
    return path


def size_settings(config: TrainConfig) -> dict:
    return {"height": config.height, "width": config.width, "max_pixels": int(config.max_pixels)}


# ---------------------------------------------------------------------------------- one run's cache (--cache_dir)
def run_settings(config: TrainConfig, kind: str, family: str, dataset, dtype=None) -> dict:
    """What a cache must have been made with to serve this run (``dataset``: its records, read from the data;
    nothing loads): the manifest's fields, as this run would write them."""
    from .tasks import encoded_inputs, encoder_files
    out = {"family": family, "task": kind, "encoder_files": encoder_files(config, by_name(family)),
           "extra_inputs": encoded_inputs(config), "source": os.path.abspath(dataset.source),
           "count": dataset.num_records, "trigger_word": dataset.trigger_word,
           "captions_sha256": captions_hash([r["prompt"] for r in dataset.records], dataset.trigger_word),
           **size_settings(config)}
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    return out


_LABELS = {"family": "model family", "task": "--task", "encoder_files": "text encoder / VAE files",
           "extra_inputs": "--extra_inputs", "dtype": "dtype", "source": "dataset", "count": "records",
           "trigger_word": "--trigger_word", "height": "--height", "width": "--width", "max_pixels": "--max_pixels"}


def settings_diffs(manifest: dict, expected: dict) -> list[str]:
    """What differs between a cache's manifest and a run's ``run_settings``, one phrase each."""
    m = dict(manifest)
    if "encoder_files" not in m:   # a manifest from before the field: the per-role lists
        m["encoder_files"] = sorted({f for fs in (m.get("encoders") or {}).values() for f in fs})
    diffs = []
    for key, mine in expected.items():
        theirs = m.get(key)
        if key == "extra_inputs":
            theirs, mine = sorted(theirs or []), sorted(mine)
        if theirs == mine:
            continue
        if key == "captions_sha256":
            diffs.append("the captions differ" + (f" (stage 1 skipped {len(m.get('skipped'))} unreadable records)"
                                                  if m.get("skipped") else ""))
        elif isinstance(mine, list):
            diffs.append(f"{_LABELS[key]} {', '.join(map(str, theirs or [])) or '(none)'} (cache) vs "
                         f"{', '.join(map(str, mine)) or '(none)'} (this run)")
        else:
            diffs.append(f"{_LABELS[key]} {theirs} (cache) vs {mine} (this run)")
    return diffs


def _slug(text: str) -> str:
    out = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-_")
    return "-".join(part for part in out.split("-") if part)[:40] or "data"


def cache_key(config: TrainConfig) -> str:
    """A stable folder name for this run's cache: ``<dataset>-<size>-<hash>``, the hash of the dataset source, the
    text encoder / VAE files, the size settings, the captions (trigger word applied), the encoded extra inputs, the
    task kind and the dtype -- so runs on the same data and encoders share a cache (another DiT, rank or learning
    rate does not matter) and anything that changes the encodings gives another folder. Reads the captions and
    the model files' headers; loads nothing."""
    from .data import TrainingDataset
    from .tasks import encoded_inputs, encoder_files, parse_task
    kind, _stage = parse_task(config.task)
    dataset = TrainingDataset(config.dataset_base_path, config.dataset_metadata_path, 1, config.data_keys(),
                              config.height, config.width, config.max_pixels, log=lambda _m: None,
                              trigger_word=config.trigger_word)
    ident = {"source": os.path.abspath(dataset.source), "encoder_files": encoder_files(config),
             "sizes": size_settings(config), "extra_inputs": sorted(encoded_inputs(config)), "task": kind,
             "dtype": config.torch_dtype,
             "captions": captions_hash([r["prompt"] for r in dataset.records], dataset.trigger_word)}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    source = pathlib.Path(dataset.source)
    name = source.parent.name if config.dataset_metadata_path else source.name
    size = f"{config.width}x{config.height}" if config.height and config.width else \
        f"max{int(round(config.max_pixels ** 0.5))}"
    return f"{_slug(name)}-{size}-{digest}"


def _folder_stats(folder: pathlib.Path) -> tuple[int, int]:
    """(sample JSON files, bytes) under ``folder/samples`` -- directory entries only, no sample is read."""
    count = size = 0
    try:
        entries = list(os.scandir(folder / SAMPLES))
    except OSError:
        return 0, 0
    for entry in entries:
        if entry.name.startswith("."):   # a sample being written
            continue
        count += entry.name.endswith(".json")
        try:
            size += entry.stat().st_size
        except OSError:
            pass
    return count, size


def list_caches(root) -> list[dict]:
    """The caches in ``root`` (its sub-folders, and ``root`` itself if it is one), newest first: ``{"name",
    "folder", "samples", "total", "complete", "size_mb", "family", "created", "dataset", "size_settings", "task",
    "encoders"}``, from the manifests and the folder listings only."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        return []
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    out = []
    for folder in folders:
        try:
            m = read_manifest(folder)
        except EngineError:
            continue
        if not m or m.get("format") != FORMAT:
            continue
        samples, size = _folder_stats(folder)
        size += (folder / MANIFEST).stat().st_size
        total = int(m.get("count") or 0)
        out.append({"name": folder.name, "folder": str(folder), "samples": total if m.get("complete") else samples,
                    "total": total, "complete": bool(m.get("complete")), "size_mb": round(size / 2 ** 20, 3),
                    "family": m.get("family"), "created": m.get("created"), "dataset": m.get("source"),
                    "size_settings": {k: m.get(k) for k in ("height", "width", "max_pixels")},
                    "task": m.get("task"), "encoders": m.get("encoder_files")
                    or sorted({f for fs in (m.get("encoders") or {}).values() for f in fs})})
    return sorted(out, key=lambda c: -(c["created"] or 0))


# ------------------------------------------------------------------------------------------------- stage 2
RERUN = "re-run stage 1 (--task {kind}:data_process) with this run's settings, into a new --output_path"


class CachedDataset(torch.utils.data.Dataset):
    """Stage 2's dataset: the cache at ``--dataset_base_path``, ``--dataset_repeat`` times per epoch (index ``i``
    is sample ``i % count``, as the records' dataset). Items are ``{"cached": inputs, "meta": {...}}``."""

    def __init__(self, config: TrainConfig, kind: str = "sft", log: Callable[[str], None] = print):
        self.folder = pathlib.Path(config.dataset_base_path or ".").expanduser()
        self.kind = kind
        self.repeat = max(1, int(config.dataset_repeat))
        manifest = read_manifest(self.folder)
        if manifest is None or manifest.get("format") != FORMAT:
            raise EngineError(f"--task {kind}:train reads the cache that stage 1 wrote, but {self.folder} holds none "
                              f"({MANIFEST} is missing): run stage 1 first (--task {kind}:data_process with "
                              f"--output_path {self.folder}), then pass that folder as --dataset_base_path.")
        if not manifest.get("complete"):
            raise EngineError(f"The cache in {self.folder} is incomplete ({manifest.get('written', 0)} of "
                              f"{manifest.get('count')} samples): resume stage 1 (train.py --resume {self.folder}).")
        self.manifest = manifest
        self.count = int(manifest["count"])
        self.source = str(self.folder)
        self.trigger_word = manifest.get("trigger_word")
        self.check_settings(config)

    def check_settings(self, config: TrainConfig) -> None:
        """Refuse a cache made with other size, caption or input settings than this run's (naming what differs)."""
        m, fix = self.manifest, RERUN.format(kind=self.kind)
        diffs = []
        for key, mine in size_settings(config).items():
            if m.get(key) != mine:
                diffs.append(f"--{key} {m.get(key)} (cache) vs {mine} (this run)")
        from .tasks import encoded_inputs
        if sorted(m.get("extra_inputs") or []) != sorted(encoded_inputs(config)):
            diffs.append(f"--extra_inputs {','.join(m.get('extra_inputs') or []) or '(none)'} (cache) vs "
                         f"{','.join(encoded_inputs(config)) or '(none)'}")
        trigger = (config.trigger_word or "").strip() or None
        if trigger is not None and trigger != m.get("trigger_word"):
            diffs.append(f"--trigger_word {m.get('trigger_word')!r} (cache) vs {trigger!r} (this run)")
        if config.dataset_metadata_path:
            from .data import read_metadata, with_trigger
            rows = read_metadata(pathlib.Path(config.dataset_metadata_path).expanduser())
            prompts = [with_trigger("" if r.get("prompt") is None else str(r.get("prompt")),
                                    trigger or m.get("trigger_word")) for r in rows]
            if captions_hash(prompts, trigger or m.get("trigger_word")) != m.get("captions_sha256"):
                skipped = len(m.get("skipped") or [])
                diffs.append(f"the captions of {config.dataset_metadata_path} differ from the cached ones"
                             + (f" (stage 1 skipped {skipped} unreadable records)" if skipped else ""))
        if self.kind == "direct_distill" and not m.get("distill"):
            diffs.append("the cache has no direct-distill settings (it was written by sft:data_process without the "
                         "seed / num_inference_steps / cfg_scale columns)")
        if diffs:
            raise EngineError(f"The cache in {self.folder} was made for other settings: {'; '.join(diffs)}. "
                              f"Use the same settings, or {fix}.")

    def check_family(self, family: Optional[str]) -> None:
        """Refuse a cache made for another model family (before the DiT loads; the family is read from its file)."""
        m = self.manifest
        if family is not None and m.get("family") != family:
            raise EngineError(f"The cache in {self.folder} was made for {m.get('family')} (encoders "
                              f"{', '.join(f for fs in (m.get('encoders') or {}).values() for f in fs)}), but this "
                              f"run's transformer is {family}: {RERUN.format(kind=self.kind)}.")

    def check_models(self, family: str, dit) -> None:
        """Refuse a cache made for another model family, or whose tensors this DiT cannot take."""
        m, fix = self.manifest, RERUN.format(kind=self.kind)
        self.check_family(family)
        config = getattr(dit, "config", {})
        diffs = [f"{k} {v} (cache) vs {config.get(k)} (this DiT)" for k, v in (m.get("dims") or {}).items()
                 if config.get(k) is not None and config.get(k) != v]
        if diffs:
            raise EngineError(f"The cache in {self.folder} does not fit this transformer: {'; '.join(diffs)} (it "
                              f"was encoded for another model): {fix}.")

    def __len__(self) -> int:
        return self.count * self.repeat

    @property
    def num_records(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        inputs, meta = read_sample(self.folder, index % self.count)
        if self.kind == "direct_distill" and "distill" not in meta:   # an sft cache with the distill columns
            from .distill import distill_settings
            meta["distill"] = distill_settings(dict(meta.get("columns") or {}))
        return {"cached": inputs, "meta": meta, "prompt": meta.get("prompt", "")}

    def describe(self) -> str:
        s = f"{self.count} cached samples from {self.folder} ({self.manifest.get('family')})"
        if self.repeat > 1:
            s += f", repeated {self.repeat}x"
        return s


# ------------------------------------------------------------------------------------------------- stage 1
def write_cache(folder, dataset, prepare: Callable, manifest: dict, rank: int = 0, world: int = 1,
                on_sample: Optional[Callable[[int, int, bool], None]] = None,
                stop: Optional[Callable[[], bool]] = None) -> tuple[int, bool]:
    """Encode (``prepare(record) -> (inputs, meta)``) this process's share of the records (``rank::world``, in
    record order) into ``folder``; samples already there are skipped. The main process (rank 0) writes the manifest
    first (``complete`` false; ``finish_cache`` completes it). Returns (samples written here, stopped)."""
    folder = pathlib.Path(folder)
    n = dataset.num_records
    manifest = dict(manifest, format=FORMAT, version=VERSION, count=n, complete=False,
                    captions_sha256=captions_hash([r["prompt"] for r in dataset.records], dataset.trigger_word),
                    trigger_word=dataset.trigger_word, created=time.time())
    if rank == 0:
        old = read_manifest(folder)
        if old is not None and old.get("captions_sha256") != manifest["captions_sha256"]:
            raise EngineError(f"{folder} already holds a cache of other captions: pass a new --output_path.")
        keep = {"dims"} | ({"created"} if old else set())   # a resumed stage 1 keeps its first date
        write_manifest(folder, dict(old or {}, **{k: v for k, v in manifest.items() if k not in keep}))
    written = 0
    for i in range(rank, n, world):
        if stop is not None and stop():
            return written, True
        skipped = sample_done(folder, i)
        if not skipped:
            item = dataset.load_record(i)
            inputs, meta = prepare(item)
            write_sample(folder, i, inputs, item.get("prompt") or "", meta)
            written += 1
        if on_sample is not None:
            on_sample(i, n, skipped)
    return written, False


def finish_cache(folder) -> dict:
    """Mark the cache complete (main process, after every process wrote its share): the DiT-facing widths from the
    first sample and whether every sample carries distill settings."""
    folder = pathlib.Path(folder)
    manifest = read_manifest(folder)
    n = int(manifest["count"])
    missing = [i for i in range(n) if not sample_done(folder, i)]
    if missing:
        raise EngineError(f"Stage 1 left {len(missing)} of {n} samples unwritten in {folder} (e.g. {missing[0]}): "
                          f"resume it (train.py --resume {folder}).")
    metas = [json.loads(sample_paths(folder, i)[1].read_text(encoding="utf-8")) for i in range(n)]
    first, _ = read_sample(folder, 0)
    manifest.update(dims=input_dims(first), complete=True, written=n,
                    distill=all("distill" in m or m.get("columns") for m in metas))
    write_manifest(folder, manifest)
    return manifest
