"""How a run trains, beyond "a LoRA or full weights": the Train tab's choices as ``TrainConfig`` fields.

- What: ``lora``, ``full``, or ``differential`` -- a LoRA trained over the base with another LoRA from the library
  fused into it first (the seed's ``--preset_lora_path``: the new LoRA learns only what the preset does not give).
- Method: ``standard`` (the seed's ``sft``), ``split`` (the seed's two-stage training: the dataset is encoded once
  into a cache by the text encoders and the VAE, then the transformer trains alone from it) or ``distill`` (the
  seed's ``direct_distill``: a few-step sampler trained to reach the images a teacher made, each from the seed,
  steps and CFG in its metadata row).

No torch here: the LoRA's family is read from its file's header.
"""
from __future__ import annotations

from engine.errors import EngineError

KINDS = ("lora", "full", "differential")
METHODS = ("standard", "split", "distill")
METHOD_LABELS = {
    "standard": "Standard",
    "split": "Cache first (split)",
    "distill": "Direct distill",
}
# The metadata columns of a distillation dataset (DiffSynth-Studio's Direct_Distill.md); only the seed is required.
DISTILL_COLUMNS = ("seed", "rand_device", "num_inference_steps", "cfg_scale")


def kind_of(form: dict) -> str:
    kind = str(form.get("train") or "lora").lower()
    if kind not in KINDS:
        raise EngineError(f"What to train must be one of {', '.join(KINDS)}, got {kind!r}.")
    return kind


def method_of(form: dict) -> str:
    method = str(form.get("method") or "standard").lower()
    if method not in METHODS:
        raise EngineError(f"The training method must be one of {', '.join(METHODS)}, got {method!r}.")
    return method


def preset_lora(form: dict, loras: list[dict], base: dict) -> dict:
    """``preset_lora_path`` / ``preset_lora_model`` of a differential LoRA run: the library LoRA named
    ``form["preset_lora"]``, of the base model's family."""
    name = str(form.get("preset_lora") or "").strip()
    if not name:
        raise EngineError("A differential LoRA trains over another LoRA fused into the base: choose that LoRA "
                          "(\"Fused LoRA\"), or train a plain LoRA.")
    found = next((entry for entry in loras if entry["name"] == name), None)
    if found is None:
        raise EngineError(f"The LoRA {name!r} is not in the LoRA folder any more; choose one of the list "
                          f"(↻ to refresh it).")
    from engine.lora.family import file_family, mismatch_message
    made_for = file_family(found["path"])
    family = base.get("family") or "FLUX.1"
    if made_for is not None and made_for != family:
        raise EngineError(mismatch_message(name, made_for, family, base.get("label")))
    return {"preset_lora_path": str(found["path"]), "preset_lora_model": "dit"}


def distill_check(data: dict, base: dict) -> None:
    """A distillation dataset is a metadata file whose rows carry the teacher's seed (and steps, CFG)."""
    columns = list(data.get("columns") or [])
    if not data.get("metadata") or "seed" not in columns:
        raise EngineError("Direct distillation trains on images a teacher model made: give a metadata file (CSV / "
                          "JSON) with image, prompt and seed columns (and num_inference_steps, cfg_scale, "
                          "rand_device: the few-step setting to learn, e.g. 4 steps at CFG 1).")
    if base.get("family") in ("FLUX.2", "FLUX 3"):
        raise EngineError(f"Direct distillation is for FLUX.1 models here; {base['family']} Klein is distilled "
                          f"already.")


def method_fields(form: dict, data: dict, base: dict) -> dict:
    """The TrainConfig fields of the chosen method: the seed's ``task`` (split training's cache folder is named
    from the whole config afterwards: ``config.build_config``)."""
    if method_of(form) == "distill":
        distill_check(data, base)
        return {"task": "direct_distill"}
    return {"task": "sft"}
