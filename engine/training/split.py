"""Split training in one command (``--cache_dir DIR`` with ``--task sft`` / ``direct_distill``): one run folder,
stage 1 then stage 2 in the same process.

1. The records are read (captions, sizes: nothing loads) and compared with the cache in ``DIR``, if any, as stage 2
   compares them -- and more, since the data is at hand: the dataset, the captions, the text encoder / VAE files,
   the dtype. A cache made for anything else is refused naming what differs; it is never overwritten.
2. A complete cache is used as it is (no encoder loads). Otherwise the text encoders and the VAE encode the records
   still missing (a stopped or killed run continues where it stopped) and are released before the DiT loads.
3. Training runs from the cache exactly as ``--task <kind>:train`` would, which trains as one-stage training does
   (the same loss curve and weights: ``tests/test_training_split.py``).

Progress: the encoding reports ``{"event": "cache", "done", "total", "encoded"}`` (``encoded`` false: found in the
cache), a reused cache one ``{"event": "cache", "reused": true}``; the training reports its usual events.
"""
from __future__ import annotations

import os
import pathlib

from ..errors import EngineError
from . import cache
from .tasks import TrainingTask, encode_into


def check_folder(folder: pathlib.Path, manifest, expected: dict) -> None:
    """Refuse a cache folder this run must not write into or train from (every process, before anything loads)."""
    if manifest is None:
        if folder.exists() and not folder.is_dir():
            raise EngineError(f"--cache_dir {folder} is a file: pass a folder (it is created if missing).")
        others = [p.name for p in folder.iterdir() if p.name != cache.SAMPLES] if folder.is_dir() else []
        if others:
            raise EngineError(f"--cache_dir {folder} holds other files ({', '.join(sorted(others)[:3])}) and no "
                              f"training cache: pass an empty or new folder.")
        return
    if manifest.get("format") != cache.FORMAT:
        raise EngineError(f"--cache_dir {folder}: {cache.MANIFEST} there is not a training cache's; pass another "
                          f"folder.")
    diffs = cache.settings_diffs(manifest, expected)
    if diffs:
        raise EngineError(f"--cache_dir {folder} holds a cache made for other settings: {'; '.join(diffs)}. It is "
                          f"kept as it is: pass another --cache_dir for this run (or delete that folder).")


def cache_first(trainer, accelerator, rank: int, world: int, device, dtype):
    """Stage 1 into ``--cache_dir`` (or the complete cache found there), then the trainer switched to stage 2.
    Returns the cached dataset to train from, or the run's result when it was stopped while encoding."""
    c, kind = trainer.config, trainer.task.kind
    folder = pathlib.Path(c.cache_dir).expanduser()
    stage1 = TrainingTask(kind, "data_process", trainer.task.family)
    records = stage1.dataset(c, trainer.log)
    trainer.log(f"Dataset: {records.describe()}.")
    expected = cache.run_settings(c, kind, trainer.task.family, records, dtype)
    manifest = cache.read_manifest(folder)
    check_folder(folder, manifest, expected)
    accelerator.wait_for_everyone()   # every process checked before the main one writes
    n = records.num_records
    if manifest is not None and manifest.get("complete"):
        trainer.log(f"The cache in {folder} is complete ({n} samples): training from it, no encoder loaded.")
        trainer.emit({"event": "cache", "done": n, "total": n, "reused": True})
    else:
        if trainer.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        trainer.task = stage1   # the records' encoding, with the run's stop file
        try:
            _written, stopped = encode_into(trainer, folder, records, accelerator, rank, world, device, dtype)
        finally:
            trainer.task = TrainingTask(kind, "all", stage1.family)
        if world > 1:   # every process stops, or none (one that went on would wait for the others forever)
            stopped = trainer._stop_wanted(accelerator)
        if stopped:
            done = sum(cache.sample_done(folder, i) for i in range(n))
            trainer.log(f"Stopped while encoding ({done} of {n} samples in {folder}); the same command (or --resume "
                        f"{trainer.run_dir}) continues from there.")
            return {"status": "stopped", "step": 0, "total_steps": None, "final": None,
                    "run_dir": str(trainer.run_dir), "loss": None, "cache": str(folder)}
        accelerator.wait_for_everyone()
        if trainer.is_main:
            cache.finish_cache(folder)
        accelerator.wait_for_everyone()
    trainer.task = TrainingTask(kind, "train", stage1.family)
    dataset = cache.CachedDataset(c.replace(dataset_base_path=str(folder), dataset_metadata_path=None), kind,
                                  log=trainer.log)
    dataset.source = os.path.abspath(records.source)   # the trained files name the data, not the cache
    return dataset
