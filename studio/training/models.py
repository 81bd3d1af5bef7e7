"""The models a run can train on: the engine's variants whose transformer the trainer feeds (FLUX.1, FLUX.2 and the
FLUX 3 base),
with their files found in the models folder (never downloaded here: the child process reads them by path). A
random-weight demo whose files are not written yet (the FLUX.2 demo is written on first use) is offered all the
same, and written when a run on it starts (``ensure_files``)."""
from __future__ import annotations

import json
import pathlib
from typing import Optional

from engine import registry
from engine.errors import EngineError
from engine.model_config import ModelConfig

from ..families import family_of

# Variants whose transformer takes inputs the trainer does not feed yet (mask / control channels, Qwen-VL).
UNTRAINABLE_INPAINT = ("fill", "flex")
TRAINABLE_EXTRA = ("kontext_images",)


TRAINABLE_FAMILIES = ("FLUX.1", "FLUX.2", "FLUX 3")
FAMILY_NOTES = {
    "FLUX.2": " LoRAs in DiffSynth-Studio's FLUX.2 format; for an edit LoRA give a metadata file with image, prompt "
              "and edit_image columns (the reference images).",
    "FLUX 3": " LoRAs in DiffSynth-Studio's FLUX 3 format (BFL's module names), trained on the base model; they apply "
              "to FLUX 3 Image Klein too. For an edit LoRA give a metadata file with image, prompt and edit_image "
              "columns (one reference, or a JSON list of up to ten).",
}


def trainable(variant) -> bool:
    if variant.inpaint in UNTRAINABLE_INPAINT or set(variant.extra_inputs) - set(TRAINABLE_EXTRA):
        return False
    family = family_of(variant).name
    if family not in TRAINABLE_FAMILIES:
        return False
    if family == "FLUX 3":   # the step-distilled model is a flow map: LoRAs train on the base (engine.training.flux3)
        from engine.flux3.variants import is_base
        if not is_base(variant):
            return False
    roles = [f.role for f in variant.files]
    return "dit" in roles and not any(role.startswith(("step1x", "nexus_gen")) for role in roles)


def num_single_layers(model_paths: str) -> Optional[int]:
    """The transformer's single blocks, from the ``config.json`` beside its first file (FLUX.2's diffusers folder);
    None when there is none."""
    first = json.loads(model_paths)[0]
    first = pathlib.Path(first[0] if isinstance(first, list) else first)
    folder = first if first.is_dir() else first.parent
    try:
        return int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_single_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_files(models_dir, variant) -> dict:
    """Absolute files of a variant, without downloading: ``{"model_paths" (a JSON list for TrainConfig),
    "tokenizer_1_path", "tokenizer_2_path"}`` (FLUX.1) or ``{"model_paths", "tokenizer_path"}`` (FLUX.2)."""
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
    """The variants a LoRA (or full weights) can be trained on, as the engine lists them (the demos included):
    ``{"name", "label", "family" ("FLUX.1" / "FLUX.2" / "FLUX 3"), "available", "demo", "extra_inputs", "description", "note",
    "model_paths" (JSON list for TrainConfig), "model_id_with_origin_paths", "tokenizer_1_path", "tokenizer_2_path"
    (FLUX.1) or "tokenizer_path" (FLUX.2, FLUX 3), "num_single_layers" (FLUX.2), "default_steps", "default_guidance",
    "default_cfg"}``; the files only where ``available`` (a demo not written yet: "write_demo" and no files until
    ``ensure_files``). Installed models first."""
    out = []
    for info in engine.variants():
        variant = registry.get_variant(info["name"])
        if not trainable(variant):
            continue
        family = family_of(variant).name
        entry = {"name": variant.name, "label": info.get("label", variant.label), "demo": variant.demo,
                 "family": family, "extra_inputs": sorted(variant.extra_inputs), "description": variant.description,
                 "default_steps": variant.default_steps, "default_guidance": variant.default_guidance,
                 "default_cfg": getattr(variant, "default_cfg", 1.0),
                 "model_id_with_origin_paths": ",".join(f"{f.model_id}:{f.pattern}" for f in variant.files
                                                       if not f.role.startswith("tokenizer"))}
        try:
            entry.update(with_files(engine, variant))
            entry["available"] = True
            entry["note"] = variant.description
        except Exception as exc:  # noqa: BLE001 - a missing file: listed, not offered
            if variant.demo and info.get("available") and hasattr(engine, "catalogue"):
                entry.update(available=True, write_demo=True, note=variant.description)   # written at the start
            else:
                entry["available"] = False
                entry["note"] = (f"Not in the models folder yet ({exc}). Generate with it once (it is downloaded) "
                                 f"or put its files in {engine.models_dir}, then train.")
        entry["note"] += FAMILY_NOTES.get(family, "")
        if "kontext_images" in variant.extra_inputs:
            entry["note"] += (" Trains on pairs: a metadata file (CSV / JSON) with image, prompt and "
                              "kontext_images columns.")
        out.append(entry)
    out.sort(key=lambda e: (not e["available"], e["demo"]))
    return out


def with_files(engine, variant) -> dict:
    """``model_files`` of a variant, and FLUX.2's single-block count (its LoRA targets name each block)."""
    files = model_files(engine.models_dir, variant)
    if family_of(variant).name == "FLUX.2":
        files["num_single_layers"] = num_single_layers(files["model_paths"])
    return files


def ensure_files(engine, base: dict) -> dict:
    """``base`` with its files: a demo not written yet is written now (a few seconds, once)."""
    if not base.get("write_demo"):
        return base
    variant = registry.get_variant(base["name"])
    engine.catalogue.write_demo(variant)
    return {**base, **with_files(engine, variant), "write_demo": False}


def pick_base(models: list[dict], name: str) -> dict:
    """The entry of ``models`` (``base_models``) named ``name`` (name or label; the first installed one when
    empty), or an EngineError saying what can be trained."""
    if not name:
        available = [m for m in models if m["available"]]
        if not available:
            raise EngineError("No model to train on: put FLUX.1-dev or FLUX.2 [klein] (or another FLUX model) in "
                              "the models folder, or start the studio with --demo.")
        return available[0]
    for m in models:
        if name in (m["name"], m["label"]):
            if not m["available"]:
                raise EngineError(f"{m['name']}: {m['note']}")
            return m
    raise EngineError(f"{name!r} cannot be trained here. Choose one of: "
                      f"{', '.join(m['name'] for m in models if m['available']) or 'none installed'}.")
