"""FLUX.2 [klein] in the studio (issue 16): the Generate tab's jobs on the random-weight klein 4B demo through the
studio layer (text to image, image to image, progress and cancel, the recipe and its restore), one model family in
memory at a time, what FLUX.2 cannot do yet refused by name, and the same in a real browser.
"""
from __future__ import annotations

import gc
import pathlib
import weakref

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError, JobCancelled
from tests.browser import set_number
from tests.helpers import linked_models

FLUX2 = "FLUX.2-klein-4B-random-demo"
FLUX1 = "FLUX.1-dev-random-demo"
SMALL = {"variant": FLUX2, "prompt": "a red boat", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("flux2-studio")
    return Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs")


@pytest.fixture(scope="module")
def made(engine):
    """A text-to-image result of the FLUX.2 demo, and the progress it reported."""
    seen = []
    result = engine.generate(dict(SMALL), progress=lambda done, total, message: seen.append((done, total, message)))
    return result[0], seen


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_catalogue_offers_the_flux2_demo_and_the_real_models_to_download(engine):
    infos = {v["name"]: v for v in engine.variants()}
    assert infos[FLUX2]["available"] and infos[FLUX2]["demo"]
    klein = infos[FLUX2]
    assert (klein["default_steps"], klein["default_cfg"], klein["uses_guidance"]) == (4, 1.0, False)
    for name in ("FLUX.2-klein-4B", "FLUX.2-klein-9B", "FLUX.2-klein-base-4B", "FLUX.2-klein-base-9B", "FLUX.2-dev"):
        assert infos[name]["downloadable"] and not infos[name]["available"], name
        assert infos[name]["label"].endswith("(download)")
    assert (infos["FLUX.2-klein-base-4B"]["default_steps"], infos["FLUX.2-klein-base-4B"]["default_cfg"]) == (50, 4.0)
    assert (infos["FLUX.2-dev"]["default_guidance"], infos["FLUX.2-dev"]["uses_guidance"]) == (4.0, True)
    # The Train tab offers the FLUX.2 demo (trained on in tests/test_flux2_training.py), the real ones once present.
    from studio.training.models import base_models
    assert [m["name"] for m in base_models(engine) if m["name"].startswith("FLUX.2") and m["available"]] == [FLUX2]


def test_text_to_image_with_progress_recipe_and_info(engine, made):
    result, seen = made
    assert (result["width"], result["height"], result["seed"]) == (64, 64, 11)
    assert [(d, t) for d, t, m in seen if m.startswith("Image 1/1, step")] == [(1, 3), (2, 3), (3, 3)]
    assert type(engine._pipe).__name__ == "Flux2ImagePipeline"
    recipe = result["recipe"]
    assert recipe["variant"] == FLUX2 and recipe["seed"] == 11
    assert {"dit", "text_encoder", "vae"} <= set(recipe["model_files"])
    assert "embedded_guidance" not in recipe            # klein has no guidance embedder
    assert f"Model: {FLUX2}, Variant: {FLUX2}" in result["info"]
    assert _pixels(result["path"]).std() > 0


def test_the_recipe_restores_and_regenerates_the_same_image(engine, made):
    result, _ = made
    request = engine.read_recipe(result["path"])
    assert request["variant"] == FLUX2 and request["seed"] == 11 and request["num_inference_steps"] == 3
    again = engine.generate(request)[0]
    assert again["path"] != result["path"]
    assert np.array_equal(_pixels(again["path"]), _pixels(result["path"]))


def test_image_to_image_with_denoising_strength_and_its_restore(engine, made):
    result, _ = made
    seen = []
    out = engine.generate(dict(SMALL, num_inference_steps=4, init_image=result["path"], denoising_strength=0.5,
                               seed=3), progress=lambda done, total, message: seen.append(message))[0]
    recipe = out["recipe"]
    assert recipe["denoising_strength"] == 0.5 and recipe["init_image"]["copy"] == ".init0.png"
    assert any("step 2/4" in m for m in seen)
    # Half the schedule repainted: closer to the input image than a text-to-image run with the same seed.
    fresh = engine.generate(dict(SMALL, num_inference_steps=4, seed=3))[0]
    start = _pixels(result["path"])
    assert np.abs(_pixels(out["path"]) - start).mean() < np.abs(_pixels(fresh["path"]) - start).mean()
    # The restore points at the input copy beside the result and makes the same image.
    request = engine.read_recipe(out["path"])
    assert pathlib.Path(request["init_image"]).name.endswith(".init0.png") and request["denoising_strength"] == 0.5
    assert np.array_equal(_pixels(engine.generate(request)[0]["path"]), _pixels(out["path"]))


def test_the_hires_fix_runs_a_second_flux2_pass(engine):
    out = engine.generate(dict(SMALL, num_inference_steps=2, hires_scale=1.5, hires_strength=0.5))[0]
    assert (out["width"], out["height"]) == (96, 96)
    assert out["recipe"]["hires_size"] == [96, 96] and out["recipe"]["hires_steps"] == 1


def test_cancel_through_the_step_callback(engine):
    def progress(done, total, message):
        if message.startswith("Image 1/1, step 1/"):
            engine.cancel()
    before = len(list(engine.outputs_dir.rglob("*.png")))
    with pytest.raises(JobCancelled):
        engine.generate(dict(SMALL, seed=99), progress=progress)
    assert len(list(engine.outputs_dir.rglob("*.png"))) == before


@pytest.mark.parametrize("extra, named", [
    ({"flux_redux_image": "RESULT"}, "FLUX.1-Redux"),
    ({"ipadapter_images": ["RESULT"]}, "IP-Adapter"),
])
def test_what_flux2_cannot_do_yet_is_refused_by_name(engine, made, extra, named):
    extra = {k: (made[0]["path"] if v == "RESULT" else [made[0]["path"]] if v == ["RESULT"] else v)
             for k, v in extra.items()}
    with pytest.raises(EngineError) as err:
        engine.generate(dict(SMALL, **extra))
    assert named in str(err.value) and "choose a FLUX.1 model" in str(err.value)


def test_switching_family_frees_the_other_familys_modules(engine, made):
    def roles():
        return sorted(key[0] for key in engine._modules)

    engine.generate({"variant": FLUX1, "prompt": "a", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 1})
    assert roles() == ["dit", "text_encoder_1", "text_encoder_2", "vae"]
    flux1 = [weakref.ref(m) for m in engine._modules.values()]
    engine.generate(dict(SMALL, num_inference_steps=1))
    assert roles() == ["dit", "text_encoder", "vae"]
    assert all("FLUX.2" in key[1][0] for key in engine._modules)
    gc.collect()
    assert not [r for r in flux1 if r() is not None], "a FLUX.1 module outlived the switch to FLUX.2"
    flux2 = [weakref.ref(m) for m in engine._modules.values()]
    plan = engine.memory_plan()           # the Models & memory tab's data: what is loaded, without a planner
    assert plan["loaded"] and plan["variant"] == FLUX2
    assert sorted(c["role"] for c in plan["components"]) == ["dit", "text_encoder", "vae"]
    engine.generate({"variant": FLUX1, "prompt": "a", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 1})
    assert roles() == ["dit", "text_encoder_1", "text_encoder_2", "vae"]
    gc.collect()
    assert not [r for r in flux2 if r() is not None], "a FLUX.2 module outlived the switch back to FLUX.1"


def test_flux2_klein_in_the_generate_tab(page, studio, shots):
    try:
        page.locator("#gen-model input").click()
        page.locator("ul[role='listbox'] li", has_text="FLUX.2 [klein] 4B random-weight demo").click()
        # Choosing it sets klein's defaults: 4 steps, CFG 1, no guidance slider.
        page.wait_for_function("document.querySelector('#gen-steps input[type=\"number\"]')?.value === '4'")
        assert page.locator("#gen-cfg input[type='number']").first.input_value() == "1"
        page.locator("#gen-guidance").wait_for(state="hidden")
        page.locator("#gen-prompt textarea").fill("a klein lighthouse")
        set_number(page, "gen-width", 64)
        set_number(page, "gen-height", 64)
        set_number(page, "gen-steps", 2)
        set_number(page, "gen-seed", 4242)
        page.locator("#gen-generate").click()
        page.wait_for_function("document.querySelector('#selected-info textarea')?.value?.includes('Seed: 4242,')")
        info = page.locator("#selected-info textarea").input_value()
        assert f"Variant: {FLUX2}" in info and "a klein lighthouse" in info and "Size: 64x64" in info
        assert "Steps: 2," in info
        page.screenshot(path=str(shots / "flux2-generate.png"), full_page=True)
        # The Models & memory tab shows the FLUX.2 plan (its components under their FLUX.2 names).
        page.get_by_role("tab", name="Models & memory").click()
        page.wait_for_function("document.querySelector('#mem-table')?.innerText?.includes('FLUX.2 transformer')")
        page.screenshot(path=str(shots / "flux2-memory.png"), full_page=True)
    finally:
        studio.engine.release_models()      # the other browser tests start from the FLUX.1 demo again


def test_the_image_info_names_flux2_s_own_schedule():
    from studio.a1111 import a1111_parameters
    text = a1111_parameters({"prompt": "p", "variant": "FLUX.2-klein-4B-random-demo", "schedule": "seed", "seed": 1,
                             "num_inference_steps": 4, "width": 64, "height": 64})
    assert "Schedule type: FLUX.2 flow (resolution-dependent shift)" in text and "Flow shift 3" not in text
