"""The studio's engine: jobs, progress, cancel, seeds, caching, variant swaps and bad input, on the demo model."""
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from engine import EngineError, JobCancelled
from studio.engine import Engine
from tests.helpers import official_models_dir

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    return Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path_factory.mktemp("outputs"),
                  allow_dirs=[tmp_path_factory.getbasetemp()])  # the tests' input images


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_saves_images_with_recipe_and_progress(engine):
    calls = []
    results = engine.generate({**SMALL, "prompt": "a lighthouse", "seed": 100, "num_images": 2,
                               "num_inference_steps": 3}, progress=lambda d, t, m: calls.append((d, t)))
    assert [r["seed"] for r in results] == [100, 101]
    paths = [pathlib.Path(r["path"]) for r in results]
    assert len(set(paths)) == 2 and all(p.exists() and p.parent.parent == engine.outputs_dir for p in paths)
    assert [c for c in calls if c[1] == 6] == [(i, 6) for i in range(1, 7)]    # every step of both images
    recipe = engine.read_recipe(paths[1])
    assert recipe["seed"] == 101 and recipe["prompt"] == "a lighthouse" and recipe["width"] == 64
    assert recipe["variant"] == "FLUX.1-dev-random-demo"
    stored = json.loads(Image.open(paths[0]).text["flux_studio"])
    assert stored["model_files"]["dit"][0]["file"].endswith("flux1-dev.safetensors")
    assert len(stored["model_files"]["dit"][0]["fingerprint"]) == 16
    assert "Seed: 100" in Image.open(paths[0]).text["parameters"]


def test_same_seed_same_image_and_random_seed_is_reported(engine):
    a = engine.generate({**SMALL, "prompt": "dunes", "seed": 5})[0]
    b = engine.generate({**SMALL, "prompt": "dunes", "seed": 5})[0]
    assert a["path"] != b["path"]                              # never overwritten
    assert np.array_equal(pixels(a["path"]), pixels(b["path"]))
    r = engine.generate({**SMALL, "prompt": "dunes", "seed": -1})[0]
    assert r["seed"] >= 0 and engine.read_recipe(r["path"])["seed"] == r["seed"]
    again = engine.generate({**SMALL, "prompt": "dunes", "seed": r["seed"]})[0]
    assert np.array_equal(pixels(r["path"]), pixels(again["path"]))


def test_sizes_are_rounded_up_to_16_and_stored(engine):
    r = engine.generate({**SMALL, "width": 72, "height": 100, "seed": 1})[0]
    assert (r["width"], r["height"]) == (80, 112)
    assert Image.open(r["path"]).size == (80, 112)
    assert "rounded up to 80x112" in r["recipe"]["size_note"]
    assert engine.size_rule(1000, 1000) == {"width": 1008, "height": 1008,
                                             "note": "1000x1000 rounded up to 1008x1008 (a multiple of 16)"}


@pytest.mark.parametrize("bad, words", [
    ({"width": 32}, "64..4096"), ({"height": 5000}, "64..4096"), ({"num_inference_steps": 0}, "Steps"),
    ({"variant": "FLUX.9"}, "Unknown model"), ({"num_images": 0}, "Number of images"),
    ({"seed": "abc"}, "wrong type"), ({"cfg_scale": 0}, "CFG"),
])
def test_bad_requests_are_refused_clearly_and_engine_stays_usable(engine, bad, words):
    with pytest.raises(EngineError, match=words):
        engine.generate({**SMALL, **bad})
    assert engine.generate({**SMALL, "seed": 2})[0]["seed"] == 2


def test_empty_prompt_works(engine):
    assert pathlib.Path(engine.generate({**SMALL, "prompt": "", "seed": 3})[0]["path"]).exists()


def test_cancel_stops_at_next_step_and_saves_nothing(engine):
    before = set(engine.outputs_dir.rglob("*.png"))
    steps_seen = []

    def progress(done, total, message):
        steps_seen.append(done)
        if done == 2:
            engine.cancel()

    with pytest.raises(JobCancelled):
        engine.generate({**SMALL, "num_inference_steps": 6, "seed": 9}, progress=progress)
    assert max(steps_seen) == 2
    assert set(engine.outputs_dir.rglob("*.png")) == before
    assert engine.generate({**SMALL, "seed": 9})[0]["seed"] == 9     # next job runs normally


def test_prompt_encodings_are_cached(engine):
    pipe = engine.pipeline(engine.default_variant())
    calls = {"n": 0}
    hook = pipe.text_encoder_2.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        engine.generate({**SMALL, "prompt": "cache me", "seed": 1})
        engine.generate({**SMALL, "prompt": "cache me", "seed": 2, "width": 80})
        assert calls["n"] == 1
        engine.generate({**SMALL, "prompt": "something else", "seed": 1})
        assert calls["n"] == 2
    finally:
        hook.remove()


def test_switching_variant_swaps_only_the_transformer(demo_dir, tmp_path):
    models = official_models_dir(tmp_path / "models", demo_dir,
                                 variants=("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Krea-dev"),
                                 dit_names={"black-forest-labs/FLUX.1-Krea-dev": "flux1-krea-dev.safetensors"})
    # Give Krea a visibly different transformer: the same layout with other weights.
    from safetensors.torch import load_file, save_file
    krea = models / "black-forest-labs/FLUX.1-Krea-dev/flux1-krea-dev.safetensors"
    sd = load_file(krea)
    krea.unlink()
    save_file({k: (v.float() * 1.5).to(v.dtype) for k, v in sd.items()}, krea)
    eng = Engine(models_dir=models, outputs_dir=tmp_path / "out")
    assert not eng.demo_only and eng.default_variant() == "FLUX.1-dev"
    names = {v["name"]: v for v in eng.variants()}
    assert names["FLUX.1-dev"]["available"] and names["FLUX.1-Krea-dev"]["available"]
    assert not names["FLUX.1-schnell"]["available"] and names["FLUX.1-schnell"]["downloadable"]
    dev = eng.pipeline("FLUX.1-dev")
    encoders, vae, dit = dev.text_encoder_1, dev.vae, dev.dit
    krea_pipe = eng.pipeline("FLUX.1-Krea-dev")
    assert krea_pipe.text_encoder_1 is encoders and krea_pipe.vae is vae
    assert krea_pipe.dit is not dit
    a = eng.generate({**SMALL, "variant": "FLUX.1-dev", "seed": 4})[0]
    calls = []
    hook = encoders.register_forward_hook(lambda *args: calls.append(1))
    b = eng.generate({**SMALL, "variant": "FLUX.1-Krea-dev", "seed": 4})[0]
    hook.remove()
    assert calls == []              # the same prompt's encoding is reused across the switch
    assert not np.array_equal(pixels(a["path"]), pixels(b["path"]))
    assert b["recipe"]["model_files"]["dit"][0]["file"] == "black-forest-labs/FLUX.1-Krea-dev/flux1-krea-dev.safetensors"


def test_wrong_file_in_a_slot_is_named_and_engine_recovers(demo_dir, tmp_path):
    models = official_models_dir(tmp_path / "models", demo_dir)
    dit = models / "black-forest-labs/FLUX.1-dev/flux1-dev.safetensors"
    dit.unlink()
    shutil.copy(demo_dir / "ae.safetensors", dit)          # the VAE where the transformer belongs
    eng = Engine(models_dir=models, outputs_dir=tmp_path / "out")
    with pytest.raises(EngineError) as err:
        eng.generate({**SMALL, "variant": "FLUX.1-dev"})
    assert "flux1-dev.safetensors" in str(err.value) and "VAE" in str(err.value)
    dit.unlink()
    dit.write_bytes((demo_dir / "flux1-dev.safetensors").read_bytes()[:5000])   # truncated download
    with pytest.raises(EngineError) as err:
        eng.generate({**SMALL, "variant": "FLUX.1-dev"})
    assert "flux1-dev.safetensors" in str(err.value)
    dit.unlink()
    shutil.copy(demo_dir / "flux1-dev.safetensors", dit)
    assert eng.generate({**SMALL, "variant": "FLUX.1-dev", "seed": 1})[0]["seed"] == 1
