"""Swapping FLUX variants really releases memory.

Two variants (FLUX.1-dev and FLUX.1-Krea-dev: same architecture, different transformer file) share the demo's text
encoders and VAE. The demo transformer is tiny, so each variant gets its own larger random transformer in the BFL
layout (hidden 384 = 3 heads of 128, 6 double + 6 single blocks: 45M parameters, ~90 MB in bf16; the loader infers
the architecture from the shapes). The engine swaps 10 times, generating a small image each time; the process's RSS
after the 10 swaps must stay within 1.2 x the size of one transformer file of its RSS after the first two (the
first two load everything once). The engine collects garbage itself: the test never calls gc.
"""
import pathlib
import weakref

import psutil
import pytest
from safetensors.torch import save_file

from engine import demo
from studio.engine import Engine
from tests.helpers import official_models_dir

SWAPS = 10
BOUND = 1.2          # x one transformer file
BIG = dict(hidden_size=384, num_heads=3, head_dim=128, depth=6, depth_single_blocks=6, axes_dim=[16, 56, 56])
REQUEST = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 1,
           "t5_sequence_length": 64}


def write_big_transformer(path: pathlib.Path, seed: int, monkeypatch):
    for key, value in BIG.items():
        monkeypatch.setitem(demo.TRANSFORMER, key, value)
    sd = demo.bfl_transformer_state_dict(seed)
    monkeypatch.undo()
    if path.exists() or path.is_symlink():
        path.unlink()            # a hard link to the demo file: replace it, do not write through it
    save_file(sd, str(path))
    return path.stat().st_size


@pytest.fixture(scope="module")
def swap_models(demo_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("swap")
    models = official_models_dir(root / "models", demo_dir,
                                 variants=("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Krea-dev"),
                                 dit_names={"black-forest-labs/FLUX.1-Krea-dev": "flux1-krea-dev.safetensors"})
    sizes = [write_big_transformer(models / "black-forest-labs/FLUX.1-dev/flux1-dev.safetensors", 1, mp),
             write_big_transformer(models / "black-forest-labs/FLUX.1-Krea-dev/flux1-krea-dev.safetensors", 2, mp)]
    return models, max(sizes), root


def rss() -> int:
    return psutil.Process().memory_info().rss


def test_ten_swaps_do_not_grow_memory(swap_models):
    models, file_size, root = swap_models
    assert 80e6 < file_size < 100e6
    engine = Engine(models_dir=models, outputs_dir=root / "outputs")
    variants = ["FLUX.1-dev", "FLUX.1-Krea-dev"]
    readings, first_dit = [], None
    for i in range(SWAPS):
        variant = variants[i % 2]
        result = engine.generate({**REQUEST, "variant": variant})[0]
        assert result["recipe"]["variant"] == variant
        pipe = engine.pipeline(variant)
        assert pipe.dit.config.num_attention_heads == 3                       # the big transformer is in use
        if i == 0:
            first_dit = weakref.ref(pipe.dit)
        if i == 1:
            # the engine dropped the first variant's transformer when it loaded the second
            assert first_dit() is None
        readings.append(rss())
    baseline, final = readings[1], readings[-1]
    growth = final - baseline
    print(f"\nRSS after 2 swaps {baseline / 2**20:.0f} MB, after {SWAPS}: {final / 2**20:.0f} MB, growth "
          f"{growth / 2**20:+.1f} MB; one transformer file {file_size / 2**20:.0f} MB; "
          f"max over the run {max(readings) / 2**20:.0f} MB")
    assert growth < BOUND * file_size, [r // 2**20 for r in readings]
    # never two transformers at once: no reading exceeds the baseline by a whole transformer
    assert max(readings[2:]) - baseline < BOUND * file_size
    # only one transformer is held, and the shared components were loaded once
    assert sum(1 for key in engine._modules if key[0] == "dit") == 1
    assert len(engine._modules) == 4
