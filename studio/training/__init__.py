"""The studio's training runs (the Train tab's service): datasets, one run at a time on the engine's device, its
progress as plain dicts, stop and resume, the finished LoRA handed to the Generate tab's LoRA picker.

```python
jobs = engine.training                      # TrainingJobs(engine), made on first use
ds = jobs.prepare_dataset(["a.png", "b.png"], {"a.png": "a photo of sks dog"})  # copied: <models>/train/datasets/
jobs.start({"base_model": "FLUX.1-dev", "dataset": ds["folder"], "captions": ds["rows"], "steps": 500})
jobs.poll()       # {"status", "step", "total", "loss": [...], "eta", "samples", "log", "final", "published", ...}
jobs.stop(); jobs.resume(run_dir)
jobs.draft_captions(ds["folder"], ds["rows"])    # empty captions drafted by Qwen2.5-VL (the table only)
jobs.try_checkpoint(jobs.poll()["checkpoints"][0]["path"])   # a saved checkpoint into <models>/loras/trained/
```

- ``runs``: ``TrainingJobs``, the service (one run at a time, claiming the device from image jobs, poll)
- ``datasets``: uploaded images + ``.txt`` captions, folders and metadata files read as caption tables
- ``config``: the tab's form checked and turned into the engine's ``TrainConfig``
- ``models``: the variants a run can train on and their files
- ``process``: launching the trainer (a child process by default) and the run folders on disk
- ``progress``: a run's ``events.jsonl`` read into what the tab shows
- ``commands``: the equivalent ``train.py`` command
- ``presets``: the VRAM presets (12 / 16 / 20 / 24 GB) as form values
- ``captions``: captions drafted by Qwen2.5-VL (Step1X-Edit's) into the caption table

Runs go in ``<models>/train/<name>/`` (``engine.training``'s run folders: never written over, resumable); the
finished LoRA is copied into ``<models>/loras/trained/``, which ``engine.loras()`` lists. No gradio here, and no
torch at import (``engine.training``'s modules are imported when first used).
"""
from .runs import TrainingJobs

__all__ = ["TrainingJobs"]
