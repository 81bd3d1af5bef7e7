"""The Train tab's form (plain values) checked and turned into the engine's ``TrainConfig``.

Every number is checked with a message naming the field and the fix; nothing is written here (the caption table is
written by ``TrainingJobs.start`` once the whole form is valid).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import pathlib
import re
from typing import Any, Optional

from engine.errors import EngineError
from engine.training.args import TrainConfig

from . import methods

NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
REFERENCE_FAMILIES = ("FLUX.2", "FLUX 3")   # edit LoRAs from an edit_image column; true CFG in the samples

# What the LoRA is added to: key -> label. DiffSynth's names (the seed's scripts) and diffusers' names both resolve
# (engine.training.lora_targets; FLUX.2: engine.training.flux2); "" is the seed's automatic choice.
TARGET_PRESETS = {
    "attention+mlp": "Attention and MLP, as DiffSynth-Studio's scripts (FLUX.1: and the norms)",
    "attention": "Attention only (smaller, gentler)",
    "all": "Every linear layer of the blocks (automatic)",
}
DEFAULT_TARGETS = "attention+mlp"
ATTENTION_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
FLUX3_ATTENTION = "to_q,to_k,to_v,to_out.0"
FLUX3_TARGETS = FLUX3_ATTENTION + ",linear_in,linear_out"    # engine.training.flux3.DEFAULT_TARGETS


@dataclasses.dataclass
class RunPlan:
    """A checked form: the run's config, notes for the person, its steps, and the caption files to write first."""

    config: TrainConfig
    notes: list[str]
    total: int
    captions: list[tuple[pathlib.Path, str]]


def now_stamp() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def safe_name(text: Any, fallback: str = "") -> str:
    """A folder / file name from free text: letters, digits, ``. _ -``; others become ``-``."""
    name = NAME_RE.sub("-", str(text or "").strip()).strip(".-_")
    return name[:80] or fallback


def number(form: dict, key: str, kind, label: str, default=None, minimum=None):
    """``form[key]`` as an int or float (``default`` when empty), or an EngineError naming ``label``."""
    value = form.get(key, default)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        result = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise EngineError(f"{label} must be a number, got {value!r}.") from None
    if kind is int and float(value) != int(float(value)):
        raise EngineError(f"{label} must be a whole number, got {value!r}.")
    if result != result or result in (float("inf"), float("-inf")):
        raise EngineError(f"{label} must be a finite number, got {value!r}.")
    if minimum is not None and result < minimum:
        raise EngineError(f"{label} must be at least {minimum}, got {value!r}.")
    return result


def positive_or_none(form: dict, key: str, label: str) -> Optional[int]:
    """A whole number where 0 or empty means "not set" (steps, epochs, save / sample intervals)."""
    value = number(form, key, int, label, None)
    return value if value is not None and value >= 1 else None


def target_modules(choice: str, base: Optional[dict] = None) -> str:
    """The ``lora_target_modules`` of a preset key for ``base`` (an entry of ``base_models``), or the module names
    given instead of one. FLUX.2's "attention+mlp" is its DiffSynth-Studio scripts' list, with each single block's
    output projection by name (``attn.to_out`` for them all when the block count is not known)."""
    family = (base or {}).get("family")
    if family == "FLUX 3":   # one kind of block everywhere: separate q, k, v, out, and the MLP's in / out
        return {"attention+mlp": FLUX3_TARGETS, "attention": FLUX3_ATTENTION, "all": ""}.get(choice, choice.strip())
    if choice == "attention+mlp" and family == "FLUX.2":
        from engine.training.flux2 import DIFFSYNTH_FLUX2_TARGETS, diffsynth_targets  # noqa: PLC0415 - imports torch
        singles = base.get("num_single_layers")
        return diffsynth_targets(singles) if singles else DIFFSYNTH_FLUX2_TARGETS + ",attn.to_out"
    if choice == "attention+mlp":
        from engine.training.lora_targets import DIFFSYNTH_FLUX_TARGETS  # noqa: PLC0415 - imports torch
        return DIFFSYNTH_FLUX_TARGETS
    if choice == "attention":
        return ATTENTION_TARGETS
    if choice == "all":
        return ""
    return choice.strip()


def adapter_settings(form: dict, base: Optional[dict] = None) -> dict:
    """What is trained and how fast: ``kind`` (lora / full; a differential LoRA is a LoRA here), ``rank``,
    ``targets``, ``lr``, ``fp8``."""
    kind = "full" if methods.kind_of(form) == "full" else "lora"
    rank = number(form, "lora_rank", int, "LoRA rank", 16)
    if kind == "lora" and rank < 1:
        raise EngineError(f"LoRA rank must be a positive whole number (4 to 128 is usual), got {rank}.")
    lr = number(form, "learning_rate", float, "Learning rate", 1e-4 if kind == "lora" else 1e-5)
    if not lr > 0 or lr > 1:
        raise EngineError(f"Learning rate must be above 0 and at most 1 (1e-4 is usual for a LoRA, 1e-5 for "
                          f"full training), got {lr:g}.")
    fp8 = bool(form.get("fp8_base"))
    if fp8 and kind == "full":
        raise EngineError("fp8 storage is for the frozen base of a LoRA run; full training updates the "
                          "transformer's own weights. Turn one of them off.")
    return {"kind": kind, "rank": rank, "targets": target_modules(str(form.get("targets") or DEFAULT_TARGETS), base),
            "lr": lr, "fp8": fp8}


def run_length(form: dict, count: int) -> dict:
    """How long the run trains on ``count`` images: ``repeat``, ``steps`` (or None), ``num_epochs``, ``total``
    steps, ``per_epoch`` steps."""
    repeat = number(form, "repeat", int, "Repeats", 1, minimum=1)
    steps = positive_or_none(form, "steps", "Steps")
    epochs = positive_or_none(form, "epochs", "Epochs")
    if steps is None and epochs is None:
        raise EngineError("Say how long to train: a number of steps or epochs (at least 1).")
    per_epoch = count * repeat
    return {"repeat": repeat, "steps": steps, "per_epoch": per_epoch,
            "num_epochs": epochs if steps is None else math.ceil(steps / per_epoch),
            "total": steps if steps is not None else epochs * per_epoch}


def image_settings(form: dict) -> dict:
    """The training images' size: ``resolution`` (the side of the pixel budget), ``max_pixels``, ``fixed``
    (crop every image to a square of ``resolution``)."""
    resolution = number(form, "resolution", int, "Resolution", 1024, minimum=64)
    if resolution > 4096:
        raise EngineError(f"Resolution must be at most 4096 px, got {resolution}.")
    return {"resolution": resolution, "fixed": bool(form.get("fixed_size")),
            "max_pixels": number(form, "max_pixels", int, "Max pixels", resolution * resolution, minimum=64 * 64)}


def sample_settings(form: dict, resolution: int, base: dict) -> dict:
    """The samples drawn while training, as TrainConfig's ``validate_*`` fields (FLUX.2 and FLUX 3: the variant's CFG,
    above 1 for the base models)."""
    prompts = form.get("sample_prompts") or []
    if isinstance(prompts, str):
        prompts = prompts.splitlines()
    prompts = [str(p).strip() for p in prompts if str(p).strip()]
    every = positive_or_none(form, "sample_every", "Sample every")
    size = number(form, "sample_size", int, "Sample size", min(resolution, 1024), minimum=64)
    return {"validate_prompts": prompts, "validate_steps": every if prompts else None,
            "validate_seed": number(form, "sample_seed", int, "Sample seed", 0, minimum=0),
            "validate_height": size, "validate_width": size,
            "validate_num_inference_steps": number(form, "sample_steps", int, "Sample steps",
                                                   min(20, base["default_steps"]), minimum=1),
            "validate_embedded_guidance": float(base["default_guidance"] or 3.5),
            "validate_cfg_scale": float(base.get("default_cfg") or 1.0) if base.get("family") in REFERENCE_FAMILIES
            else 1.0}


def first_references(data: dict) -> list[str]:
    """An edit dataset's first record's reference images (``edit_image``: one path or a JSON list), for the samples
    drawn while training: they show that record's edit."""
    from engine.training.data import cell_paths, read_metadata  # noqa: PLC0415 - imports torch
    records = read_metadata(pathlib.Path(data["metadata"]))
    paths = cell_paths(records[0].get("edit_image")) if records else None
    return [str(pathlib.Path(data["folder"]) / p) for p in paths or []]


def trigger_word(form: dict) -> Optional[str]:
    """The trigger word put before every caption (None when empty); one line, at most 100 characters."""
    text = str(form.get("trigger_word") or "").strip()
    if "\n" in text or len(text) > 100:
        raise EngineError("The trigger word must be one short line (a rare word such as 'sks' or 'ohwx person'), "
                          "at most 100 characters.")
    return text or None


def run_name(form: dict, folder: str, kind: str, reserved) -> str:
    """The run folder's name: the one given, else ``<dataset folder>-<kind>``; never one of ``reserved``."""
    name = safe_name(form.get("run_name"), "")
    if not name:
        name = safe_name(f"{pathlib.Path(folder).name}-{kind}", f"run-{now_stamp()}")
    return name + "-run" if name in ((reserved,) if isinstance(reserved, str) else tuple(reserved)) else name


def vram_limit(form: dict) -> Optional[float]:
    """The GB of VRAM a run may use (``train.py --vram_limit``); None when empty (the whole card, as the seed)."""
    value = number(form, "vram_limit", float, "Train within (GB)", None)
    if value is None or value == 0:
        return None
    if value < 1 or value > 1024:
        raise EngineError(f"Train within (GB) must be between 1 and 1024 GB of VRAM, or empty for the whole card; "
                          f"got {value:g}.")
    return value


def build_config(form: dict, base: dict, data: dict, *, output_path, models_dir, reserved, loras=(),
                 caches=None) -> tuple:
    """``(TrainConfig, total steps, steps per epoch)`` of a run on ``base`` (an entry of ``base_models``) with
    ``data`` (``read_dataset``'s answer), its folders under ``output_path``; ``reserved``: names runs may not take;
    ``loras``: the LoRA library (a differential LoRA's fused one is chosen from it); ``caches``: the folder of the
    split-training caches (each run's is named by ``engine.training.cache.cache_key``)."""
    kontext = "kontext_images" in base["extra_inputs"]
    edit = base.get("family") in REFERENCE_FAMILIES and "edit_image" in (data.get("columns") or [])   # an edit LoRA
    adapter = adapter_settings(form, base)
    length = run_length(form, len(data["rows"]))
    image = image_settings(form)
    kind, fixed = adapter["kind"], image["fixed"]
    dit_path = json.loads(base["model_paths"])[0]
    config = TrainConfig(
        dataset_base_path=data["folder"], dataset_metadata_path=data["metadata"], dataset_repeat=length["repeat"],
        data_file_keys="image,kontext_images" if kontext else "image,edit_image" if edit else "image",
        extra_inputs="kontext_images" if kontext else "edit_image" if edit else None,
        model_paths=base["model_paths"], tokenizer_1_path=base.get("tokenizer_1_path"),
        tokenizer_2_path=base.get("tokenizer_2_path"), tokenizer_path=base.get("tokenizer_path"),
        fp8_models=dit_path if adapter["fp8"] else None,
        learning_rate=adapter["lr"], num_epochs=length["num_epochs"], max_steps=length["steps"],
        output_path=str(output_path), save_steps=positive_or_none(form, "save_every", "Save every"),
        lora_base_model="dit" if kind == "lora" else None, lora_target_modules=adapter["targets"],
        lora_rank=adapter["rank"], trainable_models="dit" if kind == "full" else None,
        use_gradient_checkpointing=bool(form.get("gradient_checkpointing")),
        use_gradient_checkpointing_offload=bool(form.get("gradient_checkpointing_offload")),
        height=image["resolution"] if fixed else None, width=image["resolution"] if fixed else None,
        max_pixels=image["max_pixels"], seed=number(form, "seed", int, "Seed", 0, minimum=0),
        **sample_settings(form, image["resolution"], base),
        validate_edit_images=first_references(data) if edit else [],
        publish_to=str(models_dir) if kind == "lora" else None,
        run_name=run_name(form, data["folder"], kind, reserved), trigger_word=trigger_word(form),
        vram_limit=vram_limit(form), **methods.method_fields(form, data, base),
        **(methods.preset_lora(form, list(loras), base) if methods.kind_of(form) == "differential" else {}))
    if methods.method_of(form) == "split":     # the transformer trains alone: no text encoder to sample with
        from engine.training.cache import cache_key  # noqa: PLC0415 - imports torch
        config = config.replace(cache_dir=str(pathlib.Path(caches) / cache_key(config)), validate_prompts=[],
                                validate_steps=None)
    return config, length["total"], length["per_epoch"]


def config_notes(config: TrainConfig, total: int, per_epoch: int, vram_limit) -> list[str]:
    """What the person should know about how the run saves and uses memory."""
    notes = []
    if config.save_steps is None:     # 0 / empty: once per epoch (the seed's default)
        notes.append(f"A resumable save at the end of every epoch ({per_epoch} steps).")
    elif config.save_steps > total:
        notes.append(f"Save every {config.save_steps} steps is more than the run's {total} steps: it saves only at "
                     f"the end.")
    save_every = config.save_steps or per_epoch
    if config.validate_prompts and config.validate_steps and save_every % config.validate_steps:
        notes.append(f"Samples every {config.validate_steps} steps and saves every {save_every}: the checkpoint grid "
                     f"shows the saves that fall on a sample step (and the last). Set both to the same number to see "
                     f"every save.")
    if vram_limit and not config.vram_limit:
        notes.append(f"No training VRAM limit is set: the run may use the whole card, beyond the studio's "
                     f"{vram_limit:g} GB for images. Set \"Train within (GB)\" under Memory to plan the run for it.")
    if config.cache_dir:
        notes.append("Cache first: the dataset is encoded once (text encoders and VAE), then the transformer trains "
                     "alone from the cache; a later run on the same data and model reuses it. No samples are drawn "
                     "while it trains (the text encoders are not loaded): try a checkpoint in Generate.")
    return notes
