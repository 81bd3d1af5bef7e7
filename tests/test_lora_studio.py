"""The studio side of DiffSynth-Studio's LoRA Encoder, LoRA Fusion and TeaCache (issue 19): their request keys run
end to end on the demo model (recipe, notes, restore), and switching them off again leaves no trace on later jobs."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from tests.helpers import linked_models

DEMO = "FLUX.1-dev-random-demo"
BASE = {"variant": DEMO, "prompt": "a red boat", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 11}


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from engine.demo.flux1_loras import write_flux1_demo_loras
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("lora-studio")
    models = linked_models(root / "models", demo_dir)
    write_flux1_demo_loras(models / "loras" / "demo")
    from tests.test_app_client import write_demo_lora
    write_demo_lora(models / "loras" / "qkv-only.safetensors")      # covers only q, k, v: not encodable
    return Engine(models_dir=models, demo=True, outputs_dir=root / "outputs")


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result["path"]).convert("RGB"), dtype=np.int16)


LORAS = [{"name": "demo/ink-random-demo.safetensors", "weight": 1.0},
         {"name": "demo/glow-random-demo.safetensors", "weight": 0.8}]


def test_encode_as_prompt_and_fusion_change_the_image_and_leave_no_trace(engine):
    [plain] = engine.generate({**BASE, "loras": LORAS})
    [encoded] = engine.generate({**BASE, "loras": LORAS, "lora_encode": True, "lora_encoder_scale": 1.0})
    assert encoded["recipe"]["lora_encode"] == [item["name"] for item in LORAS]
    assert np.abs(pixels(encoded) - pixels(plain)).max() > 0            # the tokens reach the transformer
    [fused] = engine.generate({**BASE, "loras": LORAS, "lora_fusion": True})
    assert fused["recipe"]["lora_fusion"] is True
    assert np.abs(pixels(fused) - pixels(plain)).max() > 0              # gated, not added
    from app.recipe_text import feature_recipe_lines
    assert any("LoRA Fusion" in line for line in feature_recipe_lines(fused["recipe"]))
    assert any("encoded as prompt tokens" in line for line in feature_recipe_lines(encoded["recipe"]))
    [again] = engine.generate({**BASE, "loras": LORAS})                 # both off again: the plain image
    assert np.array_equal(pixels(again), pixels(plain))
    restored = engine.read_recipe(encoded["path"])
    assert restored["lora_encode"] == [item["name"] for item in LORAS] and restored["lora_encoder_scale"] == 1.0
    assert engine.read_recipe(fused["path"])["lora_fusion"] is True


def test_refusals_name_the_fix(engine):
    with pytest.raises(EngineError, match="not among the job's LoRAs"):
        engine.generate({**BASE, "loras": LORAS[:1], "lora_encode": ["demo/glow-random-demo.safetensors"]})
    with pytest.raises(EngineError, match="choose at least one LoRA"):
        engine.generate({**BASE, "lora_fusion": True})
    with pytest.raises(EngineError, match="all 26 transformer layers.*has none on 22 of them"):
        engine.generate({**BASE, "loras": [{"name": "qkv-only.safetensors", "weight": 1.0}], "lora_encode": True})
    with pytest.raises(EngineError, match="threshold must be a number from 0"):
        engine.generate({**BASE, "tea_cache_l1_thresh": -1})


def test_step_cache_records_its_skipped_steps(engine):
    request = {**BASE, "num_inference_steps": 8}
    [off] = engine.generate(request)
    [on] = engine.generate({**request, "tea_cache_l1_thresh": 0.6})
    assert on["recipe"]["tea_cache_l1_thresh"] == 0.6 and "tea_cache_l1_thresh" not in off["recipe"]
    skipped = on["recipe"]["steps_skipped"]
    assert 0 < skipped < 8
    assert any(f"{skipped} of 8 steps" in note for note in on.get("notes", []))
    assert engine.read_recipe(on["path"])["tea_cache_l1_thresh"] == 0.6
    [zero] = engine.generate({**request, "tea_cache_l1_thresh": 0})    # 0 is off: the plain image
    assert np.array_equal(pixels(zero), pixels(off)) and "steps_skipped" not in zero["recipe"]


def test_the_first_block_cache_is_counted_in_passes_with_cfg(engine):
    """The Models & memory tab's first-block cache counts transformer passes (two a step with true CFG), and the
    recipe and note say passes, not steps."""
    engine.set_acceleration(step_cache=0.9)     # a random model changes a lot from step to step
    try:
        [made] = engine.generate({**BASE, "num_inference_steps": 6, "cfg_scale": 2.0, "negative_prompt": "blur"})
    finally:
        engine.set_acceleration(step_cache=0.0)
    skipped = made["recipe"]["passes_skipped"]
    assert "steps_skipped" not in made["recipe"] and 0 < skipped <= 12
    assert any(f"{skipped} of 12 transformer passes" in note for note in made.get("notes", []))
