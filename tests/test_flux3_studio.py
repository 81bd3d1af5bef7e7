"""FLUX 3 Image Klein in the studio (studio.families.Flux3): Generate (distilled, and base with CFG), Edit with
several references, recipes and restore, and refusals by name of what it does not take yet."""
from __future__ import annotations

import pytest
from PIL import Image

from engine.errors import EngineError
from tests.helpers import linked_models

KLEIN, BASE = "FLUX.3-Image-Klein-random-demo", "FLUX.3-Image-Klein-base-random-demo"


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("flux3-studio")
    eng = Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs")
    from engine.demo.flux3_loras import write_flux3_demo_loras
    from tests.test_app_client import write_demo_lora
    write_flux3_demo_loras(eng.models_dir / "loras" / "flux3")
    write_demo_lora(eng.models_dir / "loras" / "flux1.safetensors")
    eng.refs = []
    for i, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        path = root / "outputs" / f"ref{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 80), colour).save(path)
        eng.refs.append(str(path))
    return eng


def test_the_tabs_offer_flux3_where_it_runs(engine):
    from studio.training.models import trainable
    from engine.registry import get_variant
    from tabs.edit import editor_choices
    from tabs.generate import variant_choices
    listed = {v["name"]: v for v in engine.variants()}
    assert listed[KLEIN]["family"] == "FLUX 3" and listed[KLEIN]["default_steps"] == 16
    assert listed[BASE]["default_cfg"] == 3.5
    assert {KLEIN, BASE} <= {n for _, n in variant_choices(engine)[0]}
    assert {KLEIN, BASE} <= {n for _, n in editor_choices(engine)[0]}
    assert not trainable(get_variant(KLEIN)) and trainable(get_variant(BASE))   # LoRAs train on the base
    from app.controls import takes_step_cache      # the step cache (fitted on FLUX.1-dev) is not offered for FLUX 3
    assert not takes_step_cache(listed[KLEIN]) and "edit" in listed[KLEIN]["features"]
    assert takes_step_cache(next(v for v in listed.values() if v["family"] == "FLUX.1"))


def test_generate_and_edit_with_three_references(engine):
    [made] = engine.generate({"variant": KLEIN, "prompt": "a cat", "width": 64, "height": 64,
                              "num_inference_steps": 3, "seed": 1})
    assert "FLUX 3 flow" in made["info"] and made["recipe"]["variant"] == KLEIN
    [edited] = engine.generate({"variant": KLEIN, "prompt": "the three colours together", "width": 80,
                                "height": 64, "num_inference_steps": 3, "seed": 2, "edit_images": engine.refs})
    assert [e["file"] for e in edited["recipe"]["edit_images"]] == ["ref0.png", "ref1.png", "ref2.png"]
    from app.recipe_text import feature_recipe_lines
    assert any("FLUX 3 reference 3: ref2.png" in line for line in feature_recipe_lines(edited["recipe"]))
    restored = engine.read_recipe(edited["path"])["edit_images"]
    assert [p.rsplit(".", 2)[-2] for p in restored] == ["ref0", "ref1", "ref2"]
    [one] = engine.generate({"variant": KLEIN, "prompt": "the three colours together", "width": 80, "height": 64,
                             "num_inference_steps": 3, "seed": 2, "edit_images": engine.refs[:1]})
    import numpy as np
    a, b = (np.asarray(Image.open(r["path"]), dtype=np.int16) for r in (edited, one))
    assert np.abs(a - b).max() > 0                 # the other references reach the transformer
    [base] = engine.generate({"variant": BASE, "prompt": "a dog", "negative_prompt": "blur", "cfg_scale": 3.5,
                              "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3})
    assert base["recipe"]["cfg_scale"] == 3.5


@pytest.mark.parametrize("extra, words", [
    ({"cfg_scale": 2.0}, "samples without CFG: cfg_scale must be 1"),
    ({"tea_cache_l1_thresh": 0.3}, "cannot use the step cache"),
    ({"loras": [{"name": "flux1.safetensors", "weight": 1}]}, "FLUX.1"),
])
def test_what_flux3_does_not_take_is_refused_by_name(engine, extra, words):
    with pytest.raises(EngineError, match=words):
        engine.generate({"variant": KLEIN, "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2,
                         **extra})


def test_flux3_edits_with_three_references_in_the_browser(page, studio, engine, shots):
    """The Edit tab with the FLUX 3 demo: the image and two more references, run, all three in the image info."""
    from tests.browser import set_number
    try:
        page.get_by_role("tab", name="Edit", exact=True).click()
        page.locator("#edit-model input").click()
        page.locator("ul[role='listbox'] li", has_text="FLUX 3 Image Klein random-weight demo").click()
        page.wait_for_function("document.querySelector('#edit-model-note')?.innerText?.includes('FLUX 3:')")
        page.locator("#edit-more-refs").wait_for(state="visible")
        page.locator("#edit-tea-cache").wait_for(state="hidden")       # FLUX 3 does not take the step cache
        page.locator("#edit-input input[type='file']").set_input_files(engine.refs[0])
        page.wait_for_function("document.querySelector('#edit-size-line')?.innerText?.includes('Output:')")
        page.locator("#edit-more-refs input[type='file']").set_input_files(engine.refs[1:])
        page.wait_for_function("document.querySelectorAll('#edit-more-refs img').length === 2")
        set_number(page, "edit-steps", 2)
        set_number(page, "edit-seed", 313)
        page.locator("#edit-prompt textarea").fill("the three colours side by side")
        page.locator("#edit-generate").click()
        page.wait_for_function("document.querySelector('#edit-selected-info textarea')?.value?.includes('Seed: 313')",
                               timeout=120_000)
        info = page.locator("#edit-selected-info textarea").input_value()
        assert f"Variant: {KLEIN}" in info and "FLUX 3 flow" in info
        assert all(f"FLUX 3 reference {i + 1}: ref{i}.png" in info for i in range(3)), info
        page.screenshot(path=str(shots / "flux3-edit.png"), full_page=True)
    finally:
        studio.engine.release_models()


def test_a_flux3_lora_and_the_prompt_upsampler_run(engine):
    """A FLUX 3 LoRA (BFL names) changes the image and is in the recipe; the upsampler (its random-weight demo)
    writes the caption the model reads, kept in the recipe beside the prompt as written; other families refuse it."""
    import numpy as np
    base = {"variant": KLEIN, "prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 8}
    [plain] = engine.generate(base)
    [lora] = engine.generate({**base, "loras": [{"name": "flux3/flux3-bfl.safetensors", "weight": 1.0}]})
    assert [x["file"] for x in lora["recipe"]["loras"]] == ["flux3/flux3-bfl.safetensors"]
    a, b = (np.asarray(Image.open(r["path"]), dtype=np.int16) for r in (plain, lora))
    assert np.abs(a - b).max() > 0
    [up] = engine.generate({**base, "upsample_prompt": True})
    caption = up["recipe"]["upsampled_prompt"]
    assert caption and up["recipe"]["prompt"] == "a cat"
    from app.recipe_text import feature_recipe_lines
    assert any(caption[:20] in line for line in feature_recipe_lines(up["recipe"]))
    assert engine.read_recipe(up["path"])["upsample_prompt"] is True
    with pytest.raises(EngineError, match="prompt upsampler is FLUX 3 Image Klein's"):
        engine.generate({**base, "variant": "FLUX.1-dev-random-demo", "upsample_prompt": True})
