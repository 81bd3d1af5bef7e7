"""Training FLUX.1, FLUX.2 and FLUX 3 LoRAs and full weights: the seed's ``train.py`` (DiffSynth-Studio's arguments) on
this engine.

- ``args``: the argument set (``TrainConfig``, ``parse_args``)
- ``data``: the metadata / folder dataset, dynamic resolution, skipped broken images
- ``objective``: the seed's flow-matching loss (shift-3 timesteps, bell weighting)
- ``lora_targets``: ``--lora_target_modules`` (DiffSynth's or diffusers' names) onto the transformer's layers
- ``model``: loading for training, preset-LoRA fusion, fp8 storage, PEFT LoRA, gradient checkpointing
- ``export``: the trained LoRA (native / kohya / diffusers keys) and full weights as files, with metadata
- ``families``: which family a run trains (read from its files) and what differs by family, one row each:
  ``flux1`` (FLUX.1 over ``model`` / ``objective`` / ``export``), ``flux2`` (FLUX.2 [klein], base, [dev]: loading,
  targets, its objective, edit references, the seed's FLUX.2 LoRA file), ``flux3`` (FLUX 3 Image Klein base: its
  shift, the reference stream, DiffSynth's BFL-named LoRA keys)
- ``checkpoints``: run folders, atomic files, resume states, listing runs
- ``runner``: the training loop (accelerate: one process, DDP, DeepSpeed)
- ``validate``: sampling with the trained weights
- ``api``: background runs for the studio (start, progress, stop, resume, list)
- ``cli``: ``train.py`` / ``python -m engine.training``

Imports are lazy so ``import engine.training`` does not load torch.
"""
_EXPORTS = {
    "TrainConfig": ".args", "parse_args": ".args", "build_parser": ".args",
    "start_training": ".api", "resume_training": ".api", "run_training": ".api", "list_runs": ".api",
    "runs_dir": ".api", "prepare_run": ".api", "load_config": ".api", "TrainingHandle": ".api",
    "Trainer": ".runner", "publish_lora": ".runner",
    "TrainingDataset": ".data", "DIFFSYNTH_FLUX_TARGETS": ".lora_targets", "resolve_targets": ".lora_targets",
    "validate_lora": ".validate", "main": ".cli",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine.training' has no attribute {name!r}")
