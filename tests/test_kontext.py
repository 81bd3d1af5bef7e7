"""FLUX.1 Kontext reference images: parity with diffusers' FluxKontextPipeline and behaviour.

Same tiny random modules, noise and seed sigmas as tests/test_parity_diffusers.py. FluxKontextPipeline encodes
its image with ``sample_mode="argmax"`` (the posterior mean), as the engine does, so no patch is needed there;
``_auto_resize=False`` keeps the reference at its own size (the engine never resizes a reference to Kontext's
preferred resolutions).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from engine import latents as lat
from engine.conditions import kontext
from engine.registry import get_variant
from tests.test_parity_diffusers import (H, LATENT_BOUND, PIXEL_BOUND, STEPS, W, as_array, engine_pipe,
                                         reference_pipe, seed_sigmas, tiny_modules)  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore")


def photo(seed, size=(W, H)):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def reference_kontext(modules, tokenizers, **kw):
    from diffusers import FluxKontextPipeline
    pipe = reference_pipe(FluxKontextPipeline, modules, tokenizers)
    return pipe(height=H, width=W, num_inference_steps=STEPS, sigmas=seed_sigmas(STEPS), _auto_resize=False,
                max_area=H * W, max_sequence_length=512, **kw)


def test_kontext_matches_diffusers(tiny_modules, demo_tokenizers):
    ref_image = photo(1)
    prompt = "make the car red"
    pipe = engine_pipe(tiny_modules, demo_tokenizers)
    captured = {}
    original = pipe.decode_latents
    pipe.decode_latents = lambda z, *a, **k: captured.setdefault("z", z) is not None and original(z, *a, **k)
    ours = pipe(prompt=prompt, kontext_images=ref_image, height=H, width=W, seed=7, num_inference_steps=STEPS,
                embedded_guidance=2.5)
    theirs = reference_kontext(tiny_modules, demo_tokenizers, image=ref_image, prompt=prompt, guidance_scale=2.5,
                               generator=torch.Generator("cpu").manual_seed(7)).images[0]
    diff = np.abs(as_array(ours) - as_array(theirs))
    assert ours.size == theirs.size == (W, H)
    assert diff.max() <= PIXEL_BOUND, f"max pixel difference {diff.max()}"
    assert as_array(ours).std() > 5
    z = reference_kontext(tiny_modules, demo_tokenizers, image=ref_image, prompt=prompt, guidance_scale=2.5,
                          generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    err = (captured["z"] - lat.unpack(z, H, W)).abs().max().item()
    assert err <= LATENT_BOUND, err


def test_kontext_true_cfg_matches_diffusers(tiny_modules, demo_tokenizers):
    ref_image = photo(2)
    kw = dict(prompt="put her in a snowy street", negative_prompt="blurry")
    ours = engine_pipe(tiny_modules, demo_tokenizers)(**kw, kontext_images=[ref_image], cfg_scale=3.0, height=H,
                                                       width=W, seed=5, num_inference_steps=STEPS,
                                                       embedded_guidance=2.5)
    theirs = reference_kontext(tiny_modules, demo_tokenizers, image=ref_image, **kw, true_cfg_scale=3.0,
                               guidance_scale=2.5, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    diff = np.abs(as_array(ours) - as_array(theirs))
    assert diff.max() <= PIXEL_BOUND, f"max pixel difference {diff.max()}"
    plain = engine_pipe(tiny_modules, demo_tokenizers)(**kw, kontext_images=[ref_image], cfg_scale=1.0, height=H,
                                                        width=W, seed=5, num_inference_steps=STEPS,
                                                        embedded_guidance=2.5)
    assert np.abs(as_array(plain) - as_array(ours)).max() > 10


def latent_pipe(modules, tokenizers):
    """An engine pipeline that also records the final latents of each call in ``pipe.finals``."""
    pipe = engine_pipe(modules, tokenizers)
    pipe.finals = []
    original = pipe.decode_latents
    pipe.decode_latents = lambda z, *a, **k: (pipe.finals.append(z), original(z, *a, **k))[1]
    return pipe


# The tiny random transformer attends only weakly to the reference tokens: a different reference moves the final
# latents by ~1e-2 (two orders above the fp32 parity bound) but decoded pixels by about one level, so effects are
# asserted on the latents.
EFFECT = 20 * LATENT_BOUND


def test_reference_changes_the_image(tiny_modules, demo_tokenizers):
    pipe = latent_pipe(tiny_modules, demo_tokenizers)
    kw = dict(prompt="edit", height=H, width=W, seed=3, num_inference_steps=2)
    pipe(**kw, kontext_images=photo(1))
    pipe(**kw, kontext_images=photo(9))
    pipe(**kw)
    pipe(**kw, kontext_images=[photo(1)])    # a list of one is the same as the image
    a, b, none, again = pipe.finals
    assert (a - b).abs().max() > EFFECT
    assert (a - none).abs().max() > EFFECT
    assert torch.equal(a, again)


def test_two_references_and_other_sizes(tiny_modules, demo_tokenizers):
    pipe = latent_pipe(tiny_modules, demo_tokenizers)
    kw = dict(prompt="combine", height=H, width=W, seed=3, num_inference_steps=2)
    pipe(**kw, kontext_images=[photo(1)])
    two = pipe(**kw, kontext_images=[photo(1), photo(2, (96, 48))])
    assert two.size == (W, H)
    assert (pipe.finals[1] - pipe.finals[0]).abs().max() > EFFECT
    # A reference of another size (not even a multiple of 16) runs; the output keeps the requested size.
    odd = pipe(prompt="wide", height=64, width=96, seed=1, num_inference_steps=2, kontext_images=photo(4, (100, 70)))
    assert odd.size == (96, 64)


def test_reference_tokens_and_ids(tiny_modules, demo_tokenizers):
    pipe = engine_pipe(tiny_modules, demo_tokenizers)
    images = [photo(1, (64, 32)), photo(2, (40, 70))]   # the second rounds up to 48 x 80, stretched not cropped
    refs = kontext.encode_references(images, pipe.encode_image)
    assert refs.sizes == [(64, 32), (48, 80)]
    n1, n2 = (32 // 16) * (64 // 16), (80 // 16) * (48 // 16)
    assert refs.tokens.shape == (1, n1 + n2, 64) and refs.ids.shape == (n1 + n2, 3)
    assert (refs.ids[:, 0] == 1).all()
    # Every reference's grid starts at row 0, col 0 (the seed's layout: index 1, no offset).
    assert refs.ids[0].tolist() == [1, 0, 0] and refs.ids[n1].tolist() == [1, 0, 0]
    assert refs.ids[n1 - 1].tolist() == [1, 1, 3] and refs.ids[-1].tolist() == [1, 4, 2]
    assert kontext.encode_references(None, pipe.encode_image) is None
    with pytest.raises(Exception, match="not a PIL image"):
        kontext.encode_references(["a path"], pipe.encode_image)


def test_kontext_with_image_to_image(tiny_modules, demo_tokenizers):
    pipe = latent_pipe(tiny_modules, demo_tokenizers)
    kw = dict(prompt="edit", input_image=photo(5), denoising_strength=0.6, height=H, width=W, seed=2,
              num_inference_steps=2)
    image = pipe(**kw, kontext_images=photo(1))
    pipe(**kw)
    assert image.size == (W, H)
    assert (pipe.finals[0] - pipe.finals[1]).abs().max() > EFFECT


def test_registry_entry():
    v = get_variant("FLUX.1-Kontext-dev")
    assert v.file("dit").model_id == "black-forest-labs/FLUX.1-Kontext-dev"
    assert v.file("dit").pattern == "flux1-kontext-dev.safetensors"
    assert v.file("vae").model_id == v.file("text_encoder_2").model_id == "black-forest-labs/FLUX.1-dev"
    assert v.extra_inputs == ("kontext_images",) and v.default_guidance == 2.5
