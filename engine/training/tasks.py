"""The training task (``--task``): what a run trains on, how a record becomes the transformer's inputs, what each
step draws, and which module computes the loss. The loop (``runner.Trainer``) asks the task and never branches on it.

Tasks, with the seed's names: ``sft`` (supervised flow matching) and ``direct_distill`` (the few-step sampler run with
gradients from each record's seeded noise, against the teacher image), each whole or split in two stages:

- ``<kind>:data_process`` (stage 1): the text encoders and the VAE only -- the DiT is left out of the model list, as
  the seed's split-training docs say -- encode every record once and write the cache (``engine.training.cache``)
  into the run folder (``--output_path``).
- ``<kind>:train`` (stage 2): ``--dataset_base_path`` is that cache; only the DiT is loaded (text encoders and VAE in
  the model list are passed over), and the cache is checked against the DiT and the run's settings first.
- ``<kind>`` with ``--cache_dir DIR`` (ours): both stages in one command and one run folder
  (``engine.training.split``).

Stage 1 trains nothing, so it does not check ``--lora_target_modules`` (the seed's stage-1 commands may leave the
generic default).

Records and cached samples reach the loop the same way: ``inputs(...) -> (TrainingInputs, meta)``; ``meta`` carries
what the per-step draw needs beyond the inputs (direct distill's seed, sampler steps and CFG scale).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..conditions import kontext as kontext_mod
from ..errors import EngineError
from .args import TrainConfig
from .objective import TrainingInputs, flow_matching_loss

KINDS = ("sft", "direct_distill")
STAGES = ("all", "data_process", "train")
TASKS = tuple(k if s == "all" else f"{k}:{s}" for k in KINDS for s in STAGES)
DISTILL_COLUMNS = ("seed", "rand_device", "num_inference_steps", "cfg_scale")


def parse_task(name) -> tuple[str, str]:
    """``(kind, stage)`` of a ``--task`` value; anything else is refused naming the valid ones."""
    text = (name or "sft").strip()
    kind, _, stage = text.partition(":")
    stage = stage or "all"
    if kind not in KINDS or stage not in STAGES or stage == "all" and ":" in text:
        raise EngineError(f"--task {name}: not a training task here; use one of {', '.join(TASKS)}.")
    return kind, stage


class FluxTrainingModule(torch.nn.Module):
    """The trained FLUX.1 transformer and its flow-matching loss, as one module (what DDP / DeepSpeed wrap)."""

    def __init__(self, dit, dtype: torch.dtype):
        super().__init__()
        self.dit = dit
        self.dtype = dtype

    def forward(self, inputs: TrainingInputs, sigma: float, weight: float, noise: torch.Tensor) -> torch.Tensor:
        return flow_matching_loss(self.dit, inputs, sigma, weight, noise, self.dtype)


@torch.no_grad()
def encode_flux1(pipe, item: dict, config: TrainConfig, device) -> TrainingInputs:
    """A FLUX.1 record as the transformer's inputs: VAE latents, T5 / CLIP embeddings, Kontext references."""
    image = item["image"]
    if isinstance(image, list):
        image = image[0]
    width, height = image.size
    latents = pipe.encode_image(image).to(device)
    prompt_emb, pooled = pipe.encode_prompt(item.get("prompt") or "", 512)
    kontext = None
    if "kontext_images" in config.extra_input_names() and item.get("kontext_images") is not None:
        kontext = kontext_mod.encode_references(item["kontext_images"], lambda im: pipe.encode_image(im),
                                                device=device)
    return TrainingInputs(latents=latents, prompt_emb=prompt_emb.to(device), pooled=pooled.to(device),
                          height=height, width=width, kontext=kontext)


def record_meta(kind: str, item: dict) -> dict:
    """What a record carries beyond its encoded inputs: the distill settings (validated for direct_distill; for
    sft the columns as given, when present, so one cache serves both)."""
    if kind == "direct_distill":
        from .distill import distill_settings
        return {"distill": distill_settings(item)}
    given = {k: item[k] for k in DISTILL_COLUMNS if item.get(k) not in (None, "")}
    return {"columns": {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in given.items()}} \
        if given else {}


# ------------------------------------------------------------------------------------------ model lists
def _entry_files(entry, family) -> list:
    """``[(role, file paths)]`` of one model entry, read from the files' headers (nothing loads): role ``dit``,
    an encoder's (text encoder / VAE / anything else recognised) or ``unknown``; ``[("unknown", [])]`` when the
    entry cannot be resolved (the loader names the problem later)."""
    from ..loading.files import read_state_dict, resolve_group
    from ..model_config import ModelConfig
    config = entry if isinstance(entry, ModelConfig) else ModelConfig(path=entry)
    try:
        items = config.resolve()
    except Exception:  # noqa: BLE001 - left to the loader, which names the problem
        return [("unknown", [])]
    out = []
    for item in items:
        try:
            group = resolve_group(item)
            keys = read_state_dict(group, device="meta").keys()
        except Exception:  # noqa: BLE001 - not a safetensors model: the loader decides
            out.append(("unknown", []))
            continue
        out.append((family.detect(keys)[0], list(group.files)))
    return out


def _entry_role(entry, family) -> str:
    """``dit``, ``encoder`` (text encoder / VAE / anything else recognised) or ``unknown`` for one model entry."""
    roles = {role for role, _files in _entry_files(entry, family)}
    if "dit" in roles:
        return "dit"
    return "unknown" if roles <= {"unknown"} else "encoder"


def encoder_files(config: TrainConfig, family=None) -> list[str]:
    """The names of the run's model files other than the DiT's (text encoders, VAE), sorted, from the headers: what
    a cache depends on (a cache is shared by runs on other DiTs with the same encoders)."""
    from .model import parse_model_configs
    if family is None:
        from .families import family_of
        family = family_of(config)
    names = set()
    for entry, _fp8 in parse_model_configs(config):
        for role, files in _entry_files(entry, family):
            if role not in ("dit", "unknown"):
                names.update(os.path.basename(str(f)) for f in files)
    return sorted(names)


def encoded_inputs(config: TrainConfig) -> list[str]:
    """The extra inputs that change what is encoded (Kontext / edit references); direct distill's metadata columns
    (``--extra_inputs seed,rand_device,...`` in the seed's commands) are carried along, not encoded."""
    return [x for x in config.extra_input_names() if x not in DISTILL_COLUMNS]


def stage_models(config: TrainConfig, stage: str, family, log: Callable[[str], None] = print) -> TrainConfig:
    """The run's config with only the models this stage uses: stage 1 everything but the DiT, stage 2 the DiT (and
    files it cannot tell apart); the whole list otherwise. What is passed over is logged."""
    if stage == "all":
        return config
    from ..model_config import ModelConfig
    keep_dit = stage == "train"
    dropped = []

    def keep(entry, label) -> bool:
        role = _entry_role(entry, family)
        wanted = role != "encoder" if keep_dit else role != "dit"
        if not wanted:
            dropped.append(label)
        return wanted

    paths = None
    if config.model_paths:
        listed = json.loads(config.model_paths)
        listed = listed if isinstance(listed, list) else [listed]
        paths = json.dumps([p for p in listed if keep(p, p if isinstance(p, str) else json.dumps(p))])
    ids = []
    for entry in (s.strip() for s in (config.model_id_with_origin_paths or "").split(",")):
        if not entry:
            continue
        if os.path.exists(entry):
            mc = ModelConfig(path=entry)
        elif ":" in entry:
            mc = ModelConfig(model_id=entry[: entry.rfind(":")], origin_file_pattern=entry[entry.rfind(":") + 1:])
        else:
            ids.append(entry)   # the loader's message names it
            continue
        if keep(mc, entry):
            ids.append(entry)
    if dropped:
        what = "the transformer (DiT)" if not keep_dit else "the text encoders / VAE"
        log(f"Stage {'2' if keep_dit else '1'} does not use {what}; not loaded: {', '.join(dropped)}.")
    return config.replace(model_paths=paths if paths is not None else config.model_paths,
                          model_id_with_origin_paths=",".join(ids) or None)


def load_encoders(config: TrainConfig, device, dtype: torch.dtype, family):
    """Stage 1's pipeline: the text encoders and the VAE (no transformer), resident on the device -- or, with
    ``--vram_limit``, placed by the inference planner (they run as they do for generation, one after the other)."""
    pipe = family.load_encoders(config, device, dtype)
    missing = [r for r in ("vae",) if getattr(pipe, r, None) is None]
    if missing or not any(r.startswith("text_encoder") for r in pipe.installed_models()):
        raise EngineError("Stage 1 (--task ...:data_process) encodes the images and captions: pass the text "
                          "encoders and the VAE in the model list (the DiT may be left out).")
    for module in pipe.installed_models().values():
        module.requires_grad_(False)
    return pipe


# ------------------------------------------------------------------------------------------------ the task
@dataclass
class TrainingTask:
    kind: str = "sft"
    stage: str = "all"
    family: Optional[str] = None   # the run's model family, set by check()

    @classmethod
    def from_config(cls, config: TrainConfig) -> "TrainingTask":
        kind, stage = parse_task(config.task)
        return cls(kind, stage)

    @property
    def name(self) -> str:
        return self.kind if self.stage == "all" else f"{self.kind}:{self.stage}"

    def check(self, config: TrainConfig, family) -> None:
        """What this task refuses for this run, before any model loads; remembers the run's family (read from the
        model files), which a stage-2 cache must have been made for."""
        self.family = family.name
        family.check_task(self.kind)
        if config.cache_dir and self.stage != "all":
            raise EngineError(f"--cache_dir runs both stages in one command: use it with --task {self.kind} (stage 1 "
                              f"alone writes to --output_path; stage 2 reads --dataset_base_path).")
        if (self.stage == "train" or config.cache_dir) and config.validate_prompts:
            raise EngineError("Training from a cache (--task ...:train or --cache_dir) loads only the DiT, so it "
                              "cannot draw validation samples: leave out --validate_prompt (sample the trained LoRA "
                              "afterwards).")

    def dataset(self, config: TrainConfig, log: Callable[[str], None]):
        """The records (raw data), or the cache in stage 2 (checked against the run's size and caption settings)."""
        if self.stage == "train":
            from .cache import CachedDataset
            dataset = CachedDataset(config, self.kind, log=log)
            dataset.check_family(self.family)
            return dataset
        from .cache import read_manifest
        from .data import TrainingDataset
        if config.dataset_base_path and not config.dataset_metadata_path and read_manifest(config.dataset_base_path):
            raise EngineError(f"{config.dataset_base_path} is a split-training cache (stage 1's output): train from "
                              f"it with --task {self.kind}:train, or pass the images' folder for --task {self.name}.")
        repeat = 1 if self.stage == "data_process" else config.dataset_repeat
        return TrainingDataset(config.dataset_base_path, config.dataset_metadata_path, repeat, config.data_keys(),
                               config.height, config.width, config.max_pixels, log=log,
                               trigger_word=config.trigger_word)

    def inputs(self, encode: Callable, item: dict, device) -> tuple:
        """``(inputs, meta)`` of one item: a cached sample moved to the device, or a record encoded."""
        if "cached" in item:
            from .cache import to_device
            return to_device(item["cached"], device), item["meta"]
        return self.encode_record(encode, item)

    def encode_record(self, encode: Callable, item: dict) -> tuple:
        """``(inputs, meta)`` of a record; direct distill with a CFG scale also encodes the negative (the empty
        prompt, the seed's training negative) for the student's true-CFG passes."""
        meta = record_meta(self.kind, item)
        if self.kind == "direct_distill" and float(meta["distill"]["cfg_scale"]) != 1.0:
            meta["negative"] = encode({**item, "prompt": ""})
        return encode(item), meta

    def draw(self, generator: torch.Generator, schedule, inputs, meta: dict) -> dict:
        """The step's random part, as keyword arguments of the module's forward."""
        if self.kind == "direct_distill":
            from .distill import distill_noise
            s = meta["distill"]
            draw = {"noise": distill_noise(s, tuple(inputs.latents.shape)),
                    "num_inference_steps": int(s["num_inference_steps"]), "cfg_scale": float(s["cfg_scale"])}
            if meta.get("negative") is not None:
                draw["negative"] = meta["negative"]
            return draw
        _i, sigma, weight = schedule.sample(generator)
        noise = torch.randn(inputs.latents.shape, generator=generator, dtype=torch.float32)
        return {"sigma": sigma, "weight": weight, "noise": noise}


# ------------------------------------------------------------------------------------------------- stage 1
def cache_manifest(trainer, dataset, dtype, encoders: dict) -> dict:
    """What a cache records of the run that wrote it (``cache.write_cache`` adds the count, captions hash, ...)."""
    from . import cache
    c = trainer.config
    return {"family": trainer.family.name, "task": trainer.task.kind, "encoders": encoders,
            "encoder_files": sorted({f for fs in encoders.values() for f in fs}), "extra_inputs": encoded_inputs(c),
            "dtype": str(dtype).replace("torch.", ""), "source": os.path.abspath(dataset.source),
            "skipped": dataset.skipped, **cache.size_settings(c)}


def encode_into(trainer, folder, dataset, accelerator, rank: int, world: int, device, dtype,
                release: bool = True) -> tuple[int, bool]:
    """Load the encoders (no DiT), encode this process's share of the records into ``folder`` (samples already
    there are kept) and release the encoders (``release``; else they stay in ``trainer.pipe``). Progress:
    ``{"event": "cache", "done", "total", "encoded"}`` per record (``encoded`` false: found in the cache), not
    training steps. Returns (samples written here, stopped)."""
    import gc

    from . import cache
    from . import checkpoints as ck
    c, task = trainer.config, trainer.task
    pipe = load_encoders(stage_models(c, "data_process", trainer.family, trainer.log), device, dtype, trainer.family)
    trainer.pipe = pipe
    encoders = {r: sorted(os.path.basename(str(f)) for f in fs) for r, fs in pipe.model_files.items()}
    n = dataset.num_records
    trainer.log(f"Encoding {n} records into {folder} ({trainer.family.name}; the DiT is not "
                f"loaded).")
    t0 = time.perf_counter()

    def progress(i, total, skipped):
        elapsed = time.perf_counter() - t0
        trainer.emit({"event": "cache", "done": i + 1, "total": total, "encoded": not skipped, "elapsed_s": elapsed,
                      "eta_s": elapsed / (i + 1) * (total - i - 1)})

    try:
        return cache.write_cache(
            folder, dataset, lambda item: task.encode_record(lambda r: trainer.encode(pipe, r, device), item),
            cache_manifest(trainer, dataset, dtype, encoders), rank, world, progress,
            stop=lambda: trainer.stop_event.is_set() or ck.stop_requested(trainer.run_dir))
    finally:   # the text encoders and VAE leave the device: the DiT loads after them
        if release:
            trainer.pipe = pipe = None
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()


def run_data_process(trainer, accelerator, rank: int, world: int, device, dtype) -> dict:
    """Stage 1: encode every record once into the run folder (the cache); the result is the loop's result form."""
    from . import cache
    from . import checkpoints as ck
    c, task = trainer.config, trainer.task
    if c.dataset_repeat > 1:
        trainer.log(f"--dataset_repeat {c.dataset_repeat}: stage 1 encodes each record once (give the repeats to "
                    f"stage 2).")
    dataset = task.dataset(c, trainer.log)
    trainer.dataset_size, trainer.dataset_source = dataset.num_records, dataset.source
    trainer.log(f"Dataset: {dataset.describe()}.")
    n = dataset.num_records
    if trainer.is_main:   # the run list shows a cache, not a LoRA run
        ck.write_run(trainer.run_dir, kind="cache", task=task.name, total_steps=n, dataset_size=n)
    trainer.emit({"event": "start", "step": 0, "total_steps": n, "steps_per_epoch": n, "dataset_size": n,
                  "trainable_params": 0, "kind": "data_process", "resumed": cache.sample_done(trainer.run_dir, 0)})
    written, stopped = encode_into(trainer, trainer.run_dir, dataset, accelerator, rank, world, device, dtype,
                                   release=False)   # (the process ends here: its models with it)
    accelerator.wait_for_everyone()
    status, final = "stopped" if stopped else "finished", None
    if not stopped and trainer.is_main:
        cache.finish_cache(trainer.run_dir)
        final = str(trainer.run_dir / cache.MANIFEST)
    trainer.log(f"Stage 1 {status}: {written} samples encoded"
                + (f"; train from them with --task {task.kind}:train --dataset_base_path {trainer.run_dir}"
                   if not stopped else "") + ".")
    return {"status": status, "step": n if not stopped else written, "total_steps": n, "final": final,
            "run_dir": str(trainer.run_dir), "loss": None, "cache": str(trainer.run_dir)}
