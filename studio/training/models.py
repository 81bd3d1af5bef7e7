"""The models a run can train on: the engine's variants whose transformer the trainer feeds, with their files
found in the models folder (never downloaded here: the child process reads them by path)."""
from __future__ import annotations

import json
import pathlib

from engine import registry
from engine.errors import EngineError
from engine.model_config import ModelConfig

from ..families import family_of

# Variants whose transformer takes inputs the trainer does not feed yet (mask / control channels, Qwen-VL).
UNTRAINABLE_INPAINT = ("fill", "flex")
TRAINABLE_EXTRA = ("kontext_images",)


def trainable(variant) -> bool:
    if variant.inpaint in UNTRAINABLE_INPAINT or set(variant.extra_inputs) - set(TRAINABLE_EXTRA):
        return False
    roles = [f.role for f in variant.files]
    if family_of(variant).name != "FLUX.1":      # the trainer feeds FLUX.1 transformers only (FLUX.2: not yet)
        return False
    return "dit" in roles and not any(role.startswith("step1x") for role in roles)


def model_files(models_dir, variant) -> dict:
    """Absolute files of a variant, without downloading: ``{"model_paths" (a JSON list for TrainConfig),
    "tokenizer_1_path", "tokenizer_2_path"}``."""
    models = pathlib.Path(models_dir)
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


def base_models(engine) -> list[dict]:
    """The variants a LoRA (or full weights) can be trained on, as the engine lists them (the demo included):
    ``{"name", "label", "available", "demo", "extra_inputs", "description", "note", "model_paths" (JSON list
    for TrainConfig), "model_id_with_origin_paths", "tokenizer_1_path", "tokenizer_2_path",
    "default_steps", "default_guidance"}``; the files only where ``available``. Installed models first."""
    out = []
    for info in engine.variants():
        variant = registry.get_variant(info["name"])
        if not trainable(variant):
            continue
        entry = {"name": variant.name, "label": info.get("label", variant.label), "demo": variant.demo,
                 "extra_inputs": sorted(variant.extra_inputs), "description": variant.description,
                 "default_steps": variant.default_steps, "default_guidance": variant.default_guidance,
                 "model_id_with_origin_paths": ",".join(f"{f.model_id}:{f.pattern}" for f in variant.files
                                                       if not f.role.startswith("tokenizer"))}
        try:
            entry.update(model_files(engine.models_dir, variant))
            entry["available"] = True
            entry["note"] = variant.description
        except Exception as exc:  # noqa: BLE001 - a missing file: listed, not offered
            entry["available"] = False
            entry["note"] = (f"Not in the models folder yet ({exc}). Generate with it once (it is downloaded) or "
                             f"put its files in {engine.models_dir}, then train.")
        if "kontext_images" in variant.extra_inputs:
            entry["note"] += (" Trains on pairs: a metadata file (CSV / JSON) with image, prompt and "
                              "kontext_images columns.")
        out.append(entry)
    out.sort(key=lambda e: (not e["available"], e["demo"]))
    return out


def pick_base(models: list[dict], name: str) -> dict:
    """The entry of ``models`` (``base_models``) named ``name`` (name or label; the first installed one when
    empty), or an EngineError saying what can be trained."""
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
