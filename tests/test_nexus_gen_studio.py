"""Nexus-GenV2 in the studio: the generation model in Generate, the editing model in Edit (its reference given to
the AR model at its own size, as the seed does), recipe and restore, refusals of the inputs that add to T5's tokens."""
from __future__ import annotations

import pytest
from PIL import Image

from engine.errors import EngineError
from tests.helpers import linked_models

GEN, EDIT = "Nexus-GenV2-random-demo", "Nexus-GenV2-Edit-random-demo"


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    root = tmp_path_factory.mktemp("nexus-studio")
    eng = Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs")
    eng.reference = root / "outputs" / "ref.png"
    eng.reference.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (320, 240), (200, 60, 40)).save(eng.reference)
    return eng


def test_generate_and_edit_run_record_and_restore(engine):
    listed = {v["name"]: v for v in engine.variants()}
    assert listed[GEN]["default_cfg"] == 3.0 and listed[EDIT]["extra_inputs"] == ["nexus_gen_reference_image"]
    from tabs.edit import editor_choices
    from tabs.generate import variant_choices
    assert GEN in [n for _, n in variant_choices(engine)[0]] and EDIT not in [n for _, n in variant_choices(engine)[0]]
    assert EDIT in [n for _, n in editor_choices(engine)[0]]
    [made] = engine.generate({"variant": GEN, "prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2,
                              "seed": 1})
    assert made["recipe"]["variant"] == GEN
    assert any(f["file"].endswith("generation_decoder.bin") for f in made["recipe"]["model_files"]["dit"])
    [edited] = engine.generate({"variant": EDIT, "prompt": "Add a crown.", "width": 80, "height": 64, "seed": 2,
                                "num_inference_steps": 2, "nexus_gen_reference_image": str(engine.reference)})
    entry = edited["recipe"]["nexus_gen_reference_image"]
    assert entry["file"] == "ref.png" and entry["size"] == [320, 240]
    assert not any("downscaled" in note for note in edited.get("notes", []))   # the AR model bounds it itself
    assert engine.read_recipe(edited["path"])["nexus_gen_reference_image"].endswith(".ref0.png")
    from studio.history import tab_of
    assert tab_of(edited["recipe"]) == "edit"


def test_inputs_that_add_to_t5_tokens_are_refused(engine):
    with pytest.raises(EngineError, match="Qwen2.5-VL, not T5"):
        engine.generate({"variant": GEN, "prompt": "x", "flux_redux_image": str(engine.reference)})
    with pytest.raises(EngineError, match="writes its own prompt tokens"):
        engine.generate({"variant": GEN, "prompt": "x", "lora_encode": True,
                         "loras": [{"name": "missing.safetensors", "weight": 1}]})
