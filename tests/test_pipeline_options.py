"""Pipeline options beyond the defaults: tiled VAE, BFL's schedule, sigma_shift, image-to-image input sizes."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine import EngineError
from tests.helpers import demo_pipeline


@pytest.fixture(scope="module")
def pipe(demo_dir):
    return demo_pipeline(demo_dir)


def arr(image):
    return np.asarray(image, dtype=np.float32)


def test_tiled_vae_decodes_close_to_untiled(pipe):
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    full = arr(pipe.decode_latents(latents))
    tiled = arr(pipe.decode_latents(latents, tiled=True, tile_size=16, tile_stride=8))
    assert full.shape == tiled.shape == (256, 256, 3)
    # Tiles are blended over their overlap, so the result is close but not identical (the seed warns of this too).
    assert np.abs(full - tiled).mean() < 8
    assert not np.array_equal(full, tiled)           # tiling really happened
    with pytest.raises(ValueError, match="tile_stride"):
        pipe.decode_latents(latents, tiled=True, tile_size=8, tile_stride=16)


def test_schedule_and_shift_options_change_the_image(pipe):
    kw = dict(prompt="a boat", height=64, width=64, seed=1, num_inference_steps=3)
    seed_default = arr(pipe(**kw))
    assert np.array_equal(seed_default, arr(pipe(**kw, sigma_shift=3.0)))
    assert not np.array_equal(seed_default, arr(pipe(**kw, sigma_shift=1.0)))
    assert not np.array_equal(seed_default, arr(pipe(**kw, schedule="bfl")))
    with pytest.raises(ValueError, match="unknown schedule"):
        pipe(**kw, schedule="karras")


def test_sizes_round_up_and_out_of_range_is_refused(pipe):
    assert pipe(prompt="", height=70, width=90, seed=0, num_inference_steps=1).size == (96, 80)
    with pytest.raises(EngineError, match="64..4096"):
        pipe(prompt="", height=32, width=64, seed=0, num_inference_steps=1)


def test_image_to_image_accepts_other_sizes_and_modes(pipe):
    rgba = Image.new("RGBA", (100, 50), (200, 30, 30, 128))
    out = pipe(prompt="", input_image=rgba, denoising_strength=0.5, height=64, width=64, seed=0, num_inference_steps=2)
    assert out.size == (64, 64)
    # Low strength stays nearer the input's own VAE round trip (random weights do not reproduce the input) than
    # full strength does.
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    round_trip = arr(pipe.decode_latents(pipe.encode_image(red)))
    kw = dict(prompt="", input_image=red, height=64, width=64, seed=0, num_inference_steps=4)
    low = arr(pipe(**kw, denoising_strength=0.05))
    high = arr(pipe(**kw, denoising_strength=1.0))
    assert np.abs(low - round_trip).mean() < 0.8 * np.abs(high - round_trip).mean()
    # At full strength the start is pure noise: the same image as text to image with that seed.
    kw.pop("input_image")
    assert np.array_equal(high, arr(pipe(**kw)))
