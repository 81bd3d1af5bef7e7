"""The studio layer itself (studio/): no torch or gradio at import, no private names across its modules, typed
requests with the same keys and messages as the tabs know, the Feature seam (a feature added as one module + one
entry runs end to end: its key accepted, its state typed, its finishing, recipe entry, input copy and restore), and
recipes written before the studio layer existed restoring to the same requests.
"""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from studio import recipes
from studio.features import FEATURES, Feature
from tests.helpers import linked_models

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = "FLUX.1-dev-random-demo"
SMALL = {"variant": DEMO, "prompt": "a red boat", "width": 80, "height": 64, "num_inference_steps": 2, "seed": 5}
# The request keys the tabs and API clients send (before the studio layer: engine.service.REQUEST_DEFAULTS).
KEYS = {"prompt", "negative_prompt", "width", "height", "num_inference_steps", "embedded_guidance", "cfg_scale",
        "seed", "num_images", "t5_sequence_length", "schedule", "sigma_shift", "rand_device", "loras",
        "kontext_images", "step1x_reference_image", "edit_images", "inpaint_image", "inpaint_mask", "mask_invert",
        "mask_feather",
        "controls", "eligen_entity_prompts", "eligen_entity_masks", "eligen_enable_on_negative",
        "eligen_enable_inpaint", "input_image", "flux_redux_image", "flux_redux_strength",
        "init_image", "denoising_strength", "hires_scale", "hires_strength",
        "ipadapter_images", "ipadapter_scale", "infinityou_id_image", "infinityou_guidance",
        "lora_encode", "lora_encoder_scale", "lora_fusion", "tea_cache_l1_thresh", "nexus_gen_reference_image",
        "upsample_prompt"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("studio-layer")


@pytest.fixture(scope="module")
def models(demo_dir, root):
    return linked_models(root / "models", demo_dir)


@pytest.fixture(scope="module")
def engine(models, root):
    from studio.engine import Engine
    return Engine(models_dir=models, demo=True, outputs_dir=root / "outputs")


# ------------------------------------------------------------------------------------------------- the layer
def test_the_studio_imports_without_torch_or_gradio():
    code = ("import sys, studio, studio.engine, studio.features, studio.requests, studio.recipes, studio.runner, "
            "studio.models, studio.features.inpaint_page, studio.features.eligen_page\n"
            "from studio import get_engine, configure_engine\n"
            "bad = [m for m in ('torch', 'gradio') if m in sys.modules]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_module_of_the_studio_imports_another_ones_private_names():
    found = []
    for path in sorted((REPO / "studio").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                found += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, found


def test_the_request_keys_are_those_the_tabs_send():
    from studio.engine import REQUEST_DEFAULTS
    assert set(REQUEST_DEFAULTS) == KEYS
    owners = {}
    for feature in FEATURES:
        for key in feature.defaults():
            assert key not in owners, f"{key} declared by {owners[key]} and {feature.name}"
            owners[key] = feature.name
    assert owners["controls"] == "inpaint" and owners["kontext_images"] == "edit"


# ------------------------------------------------------------------------------------------------- typed requests
@pytest.mark.parametrize("request_, words", [
    ({"colour": "red"}, "Unknown settings ['colour']"),
    ({"controls": "a.png"}, "controls must be a list, got str"),
    ({"seed": "abc"}, "A setting has the wrong type: seed must be a whole number"),
    ({"cfg_scale": float("nan")}, "A setting has the wrong type: cfg_scale must be a number"),
    ({"t5_sequence_length": 9000}, "between 1 and 512"),
    ({"schedule": "karras"}, "Unknown schedule"),
    ({"width": "wide"}, "Width and height must be whole numbers"),
    ({"num_images": 99}, "Number of images"),
])
def test_bad_settings_are_named(engine, request_, words):
    with pytest.raises(EngineError, match=words.replace("[", r"\[").replace("]", r"\]")):
        engine.validate({**SMALL, **request_})


def test_a_valid_job_holds_typed_states_not_annotated_dicts(engine, root):
    photo = root / "outputs" / "in" / "photo.png"
    photo.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (100, 70), (10, 200, 30)).save(photo)
    mask = photo.with_name("mask.png")
    Image.new("L", (100, 70), 255).save(mask)                   # repaint everything
    job = engine.validate({**SMALL, "inpaint_image": str(photo), "inpaint_mask": str(mask),
                           "controls": [{"image": str(photo), "preprocessor": "canny"}], "seed": "7"})
    assert (job.width, job.height) == (112, 80) and job.settings.seed == 7 and job.variant.name == DEMO
    state = job.states["inpaint"]
    assert dataclasses.is_dataclass(state) and state.inpainting.size == (100, 70)
    assert state.controls[0].controlnet == "Union-alpha" and state.controls[0].fitted.size == (100, 70)
    assert set(job.states) == {"inpaint"}        # features the request does not use hold no state


# ------------------------------------------------------------------------------------------------- the seam
@dataclasses.dataclass(frozen=True)
class MirrorInputs:
    mirror: bool = False
    mirror_note: str = ""


@dataclasses.dataclass
class MirrorState:
    note: str


class MirrorFeature(Feature):
    """A feature as a later one is added: flips the result, records itself and saves a copy beside the result."""

    name = "mirror"
    Inputs = MirrorInputs
    seen: list = []

    def validate(self, inputs, job):
        return MirrorState(str(inputs.mirror_note)) if inputs.mirror else None

    def pipe_kwargs(self, state, job, notes):
        self.seen.append(state.note)
        return {}

    def finish(self, state, job, image):
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def recipe(self, state, job, copies):
        copies.add(Image.new("RGB", (8, 8), (1, 2, 3)), "mir")
        return {"mirror": True, "mirror_note": state.note}


def test_a_feature_added_in_one_place_runs_end_to_end(models, root, engine):
    from studio.engine import Engine
    mirrored_engine = Engine(models_dir=models, demo=True, outputs_dir=root / "mirror-out",
                             features=FEATURES + (MirrorFeature(),))
    [plain] = mirrored_engine.generate(SMALL)
    [flipped] = mirrored_engine.generate({**SMALL, "mirror": True, "mirror_note": "hi"})
    assert MirrorFeature.seen == ["hi"]
    a, b = (np.asarray(Image.open(r["path"])) for r in (plain, flipped))
    assert np.array_equal(a[:, ::-1], b)
    assert flipped["recipe"]["mirror_note"] == "hi" and "mirror" not in plain["recipe"]
    assert recipes.beside(flipped["path"], ".mir0.png").is_file()
    assert mirrored_engine.read_recipe(flipped["path"])["mirror_note"] == "hi"
    assert "mirror" not in mirrored_engine.read_recipe(plain["path"])
    with pytest.raises(EngineError, match="Unknown settings"):       # the studio without it does not know the key
        engine.validate({**SMALL, "mirror": True})


# ------------------------------------------------------------------------------------------- recipes from before
def _old_result(folder: pathlib.Path, recipe: dict, copies: dict) -> str:
    """A result as the engine wrote it before the studio layer: the PNG with its recipe and the copies beside it."""
    path = recipes.save_image(Image.new("RGB", (100, 70), (90, 90, 90)), recipe, folder)
    for suffix, image in copies.items():
        image.save(recipes.beside(path, suffix))
    return str(path)


BASE = {"variant": DEMO, "prompt": "a cat", "negative_prompt": "", "width": 100, "height": 70,
        "num_inference_steps": 8, "embedded_guidance": 3.5, "cfg_scale": 1.0, "t5_sequence_length": 512,
        "schedule": "seed", "sigma_shift": None, "rand_device": "cpu", "seed": 42, "app": "FLUX Studio",
        "engine_version": "0.1.0", "model_files": {"dit": [{"file": "x/flux1-dev.safetensors", "fingerprint": "ab"}]},
        "loras": [{"name": "style/ink.safetensors", "file": "style/ink.safetensors", "weight": 0.5},
                  {"name": "EliGen", "file": "DiffSynth-Studio/Eligen/model_bf16.safetensors", "weight": 1.0,
                   "feature": True}]}


def test_an_inpainting_result_from_before_restores_its_inputs(engine):
    recipe = {**BASE, "work_size": [112, 80], "mask_invert": True, "mask_feather": 4,
              "inpaint_image": {"file": "photo.png", "copy": ".ref0.png", "size": [100, 70], "fingerprint": "1"},
              "inpaint_mask": {"file": "mask.png", "copy": ".ref1.png", "size": [100, 70]},
              "controls": [{"preprocessor": "canny", "controlnet": "Union-alpha", "scale": 0.7, "start": 0.0,
                            "end": 0.5, "file": "c.png", "copy": ".ctl0.png", "size": [64, 64]},
                           {"preprocessor": "none", "controlnet": "Upscaler", "scale": 1.0, "start": 0.0, "end": 1.0,
                            "file": "gone.png", "copy": ".ctl1.png", "size": [64, 64]}]}
    copies = {".ref0.png": Image.new("RGB", (100, 70)), ".ref1.png": Image.new("L", (100, 70)),
              ".ctl0.png": Image.new("RGB", (64, 64))}
    path = _old_result(engine.outputs_dir / "old", recipe, copies)
    found = engine.read_recipe(path)
    stem = path[:-len(".png")]
    assert found["inpaint_image"] == stem + ".ref0.png" and found["inpaint_mask"] == stem + ".ref1.png"
    assert found["mask_invert"] is True and found["mask_feather"] == 4
    assert found["controls"] == [{"preprocessor": "canny", "controlnet": "Union-alpha", "scale": 0.7, "start": 0.0,
                                  "end": 0.5, "image": stem + ".ctl0.png"}]          # the missing copy left out
    assert found["loras"] == [{"name": "style/ink.safetensors", "weight": 0.5}]      # EliGen's comes with EliGen
    assert {k: found[k] for k in ("prompt", "seed", "width", "height", "variant")} == {
        "prompt": "a cat", "seed": 42, "width": 100, "height": 70, "variant": DEMO}
    back = engine.restore_inputs(path)
    assert back["inpaint_mask"] == stem + ".ref1.png" and len(back["controls"]) == 1 and back["image_key"]


def test_edit_and_eligen_results_from_before_restore(engine):
    edit = {**BASE, "variant": "FLUX.1-Kontext-dev-random-demo",
            "kontext_images": [{"file": "a.png", "copy": ".ref0.png", "size": [90, 60]},
                               {"file": "b.png", "copy": ".ref1.png", "size": [90, 60]}]}
    path = _old_result(engine.outputs_dir / "old", edit, {".ref0.png": Image.new("RGB", (90, 60)),
                                                          ".ref1.png": Image.new("RGB", (90, 60))})
    stem = path[:-len(".png")]
    assert engine.read_recipe(path)["kontext_images"] == [stem + ".ref0.png", stem + ".ref1.png"]
    assert engine.before_after(path)[1] == path
    eligen = {**BASE, "eligen_entity_prompts": ["a cat", "a dog"], "eligen_enable_on_negative": False,
              "eligen_enable_inpaint": True,
              "eligen_entity_masks": [{"copy": ".ent0.png", "size": [100, 70]},
                                      {"copy": ".ent1.png", "size": [100, 70]}]}
    path = _old_result(engine.outputs_dir / "old", eligen, {".ent0.png": Image.new("L", (100, 70)),
                                                            ".input.png": Image.new("RGB", (100, 70))})
    stem = path[:-len(".png")]
    found = engine.read_recipe(path)
    assert found["eligen_entity_prompts"] == ["a cat", "a dog"] and found["eligen_enable_inpaint"] is True
    assert found["eligen_entity_masks"] == [stem + ".ent0.png", None] and found["input_image"] == stem + ".input.png"
    page = engine.eligen_restore(path)
    assert page["prompts"] == ["a cat", "a dog"] and page["masks"] == [stem + ".ent0.png", None]
    assert page["inpaint"] and (page["width"], page["height"]) == (100, 70)
