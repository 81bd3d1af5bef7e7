"""FLUX.2 inpainting and live previews (issue 16): ``Flux2ImagePipeline(inpaint_mask=...)`` against DiffSynth-Studio's
formulas written out (its ``Flux2Unit_Inpaint`` and ``BasePipeline.step``) on the random-weight klein 4B demo with
the same noise; the FLUX.2 preview hook and its fitted projection (``engine.preview`` through the pipeline's codec);
the studio's Inpaint & Control feature on the FLUX.2 demo (unpainted pixels exact, recipe, restore, previews, control
images refused); and the Inpaint tab with the FLUX.2 demo in a real browser.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import EngineError
from tests.browser import wait_for_job
from engine.flux2 import schedule as sch

FLUX2 = "FLUX.2-klein-4B-random-demo"
H, W, STEPS = 64, 96, 4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from engine import Flux2ImagePipeline
    from engine.demo.flux2 import write_flux2_demo
    from engine.flux2.variants import model_configs
    models = tmp_path_factory.mktemp("flux2-inpaint-models")
    write_flux2_demo(models)
    return Flux2ImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", models_dir=models,
                                              **model_configs(FLUX2))


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))


def right_half_mask() -> Image.Image:
    """White (repaint) on the right half, with a grey column: soft values reach the tokens too."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, W // 2:] = 255
    mask[:, W // 2 - 8:W // 2] = 128
    return Image.fromarray(mask, "L")


def image_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def run(pipe, photo, **kwargs):
    return pipe("a red ball", input_image=photo, height=H, width=W, seed=9, num_inference_steps=STEPS,
                progress_bar_cmd=lambda x: x, **kwargs)


# --------------------------------------------------------------------------------- DiffSynth's formulas written out
def seed_mask_tokens(mask: Image.Image, blur_size=None, blur_sigma=None) -> torch.Tensor:
    """Flux2Unit_Inpaint: RGB, PIL's default resize to the token grid, [0, 1], mean of R, G, B, torchvision's
    GaussianBlur(2 * size + 1, sigma) (2-D kernel, reflected edges), one value per token."""
    small = mask.convert("RGB").resize((W // 16, H // 16))
    m = torch.Tensor(np.array(small, dtype=np.float32)) * (1 / 255) + 0
    m = m.permute(2, 0, 1)[None].mean(dim=1, keepdim=True)
    if blur_size is not None and blur_sigma is not None:
        k = blur_size * 2 + 1
        x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)
        pdf = torch.exp(-0.5 * (x / blur_sigma).pow(2))
        k1 = pdf / pdf.sum()
        k2 = torch.mm(k1[:, None], k1[None, :])
        m = F.conv2d(F.pad(m, [blur_size] * 4, mode="reflect"), k2[None, None])
    return m.flatten(2).transpose(1, 2)                               # B C H W -> B (H W) C


def seed_inpaint(pipe, photo, mask_tokens) -> Image.Image:
    """The seed's FLUX.2 inpainting, float32: input latents (VAE mean, 2x2 patches, bn-normalised), the noise of the
    seed added at the first sigma, each step's velocity blended with (x - input) / sigma outside the mask, Euler,
    bn undone, decoded."""
    dit, vae = pipe.dit, pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
    x = torch.from_numpy(np.asarray(photo, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    z = vae.encode(x).latent_dist.mean
    z = z.reshape(1, 32, H // 16, 2, W // 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 128, H // 16, W // 16)
    clean = ((z - mean) / std).flatten(2).transpose(1, 2)
    noise = torch.randn((1, 128, H // 16, W // 16), generator=torch.Generator("cpu").manual_seed(9))
    sigmas = sch.flux2_sigmas(STEPS, 1.0, (H // 16) * (W // 16))
    lat = (1 - sigmas[0]) * clean + sigmas[0] * noise.flatten(2).transpose(1, 2)
    text = pipe.prompt_encoder.encode("a red ball")
    txt_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(float(text.shape[1])))
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(H // 16.), torch.arange(W // 16.), torch.zeros(1))
    for i in range(STEPS):
        v = dit(hidden_states=lat, encoder_hidden_states=text, timestep=(sigmas[i] * 1000).view(1) / 1000,
                img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        expected = (lat - clean) / sigmas[i]                           # scheduler.return_to_timestep
        v = expected * (1 - mask_tokens) + v * mask_tokens             # blend_with_mask
        lat = lat + v * (sigmas[i + 1] - sigmas[i])
    grid = lat.transpose(1, 2).reshape(1, 128, H // 16, W // 16) * std + mean
    z = grid.reshape(1, 32, 2, 2, H // 16, W // 16).permute(0, 1, 4, 2, 5, 3).reshape(1, 32, H // 8, W // 8)
    pixels = vae.decode(z).sample
    return Image.fromarray(((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("blur", [None, (1, 1.0)], ids=["sharp", "blurred"])
def test_inpainting_follows_the_seed_formulas(pipe, photo, blur):
    from engine.flux2.inpaint import token_mask
    size, sigma = blur or (None, None)
    mask = right_half_mask()
    expected_tokens = seed_mask_tokens(mask, size, sigma)
    ours_tokens = token_mask(mask, H, W, size, sigma)
    assert ours_tokens.shape == (1, (H // 16) * (W // 16), 1)
    assert torch.allclose(ours_tokens, expected_tokens, atol=1e-6)
    soft = (expected_tokens > 0) & (expected_tokens < 1)
    assert expected_tokens.min() == 0 and expected_tokens.max() == 1 and soft.any()
    with torch.no_grad():
        theirs = seed_inpaint(pipe, photo, expected_tokens)
    ours = run(pipe, photo, inpaint_mask=mask, inpaint_blur_size=size, inpaint_blur_sigma=sigma)
    d = image_diff(ours, theirs)
    print(f"\nFLUX.2 inpainting {W}x{H}, {STEPS} steps, blur {blur}: max |ours - seed formulas| = {d}/255, "
          f"mask tokens max diff {(ours_tokens - expected_tokens).abs().max():.2g}")
    assert d <= 1


def test_unmasked_tokens_end_on_the_input_and_masked_ones_are_repainted(pipe, photo, monkeypatch):
    """Where the mask is 0 the last latents are the input's own (so the image there is the VAE's round trip of the
    input); a white mask everywhere is text to image from the same noise."""
    grids = []
    decode = pipe.decode_latents
    monkeypatch.setattr(pipe, "decode_latents", lambda grid: grids.append(grid.clone()) or decode(grid))
    made = run(pipe, photo, inpaint_mask=right_half_mask())
    clean = pipe.encode_image(photo)
    from engine.flux2.inpaint import token_mask
    keep = token_mask(right_half_mask(), H, W) == 0
    final, clean_tokens = sch.to_tokens(grids[0]), sch.to_tokens(clean)
    kept = keep[0, :, 0]
    assert kept.sum() >= 4 and (~kept).sum() >= 4
    assert torch.allclose(final[0, kept], clean_tokens[0, kept], atol=1e-5)
    assert (final[0, ~kept] - clean_tokens[0, ~kept]).abs().mean() > 0.1
    nothing = run(pipe, photo, inpaint_mask=Image.new("L", (W, H), 0))
    assert image_diff(nothing, pipe.decode_latents(clean)) <= 1
    everything = run(pipe, photo, inpaint_mask=Image.new("L", (W, H), 255))
    plain = pipe("a red ball", height=H, width=W, seed=9, num_inference_steps=STEPS, progress_bar_cmd=lambda x: x)
    assert image_diff(everything, plain) <= 1 and image_diff(made, plain) > 8
    # A painted layer (transparent where not painted) means its alpha, whatever the brush colour.
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 200), (W // 2, 0, W, H))
    binary = Image.new("L", (W, H), 0)
    binary.paste(200, (W // 2, 0, W, H))
    assert image_diff(run(pipe, photo, inpaint_mask=layer), run(pipe, photo, inpaint_mask=binary)) == 0


def test_inpainting_refuses_what_it_cannot_do_by_name(pipe, photo):
    with pytest.raises(EngineError, match="input_image"):
        pipe("x", inpaint_mask=right_half_mask(), height=H, width=W, num_inference_steps=1)
    with pytest.raises(EngineError, match="inpaint_blur_size 4 is too large"):
        run(pipe, photo, inpaint_mask=right_half_mask(), inpaint_blur_size=4, inpaint_blur_sigma=1.0)


# ------------------------------------------------------------------------------------------------ live previews
def test_preview_hook_and_projection_for_flux2(pipe, photo):
    from engine import preview as P
    calls = []
    shown = run(pipe, photo, inpaint_mask=right_half_mask(),
                preview_callback=lambda done, total, x0: calls.append((done, total, x0.clone())))
    assert [(d, t) for d, t, _ in calls] == [(k, STEPS) for k in range(1, STEPS)]
    assert all(x0.shape == (1, 128, H // 16, W // 16) and x0.dtype == torch.float32 for *_, x0 in calls)
    assert image_diff(shown, run(pipe, photo, inpaint_mask=right_half_mask())) == 0       # it changes nothing
    kind, decode = P.PreviewCache().decoder(pipe, models_dir=None)
    assert kind == "latent projection" and decode.factor == 16
    assert decode.fn.weight.shape == (32, 3)           # fitted on the VAE's 32 channels, one RGB per 8 pixels
    rgb = decode(calls[-1][2])
    assert rgb.shape == (1, 3, H // 8, W // 8) and rgb.min() >= -1 and rgb.max() <= 1
    # The view takes the loop's bn-normalised 128-channel grid back to the VAE's own latents, where the projection
    # was fitted. (The demo VAE's random decoder draws no picture a linear map could follow; test_previews fits a
    # linear decoder exactly, and the real FLUX.2 VAE is not here.)
    grid = pipe.encode_image(photo)
    with torch.no_grad():
        own = pipe.vae.encode(torch.from_numpy(np.asarray(photo, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
                              ).latent_dist.mode()
    assert torch.allclose(decode.view(grid), own, atol=1e-5)
    assert torch.allclose(decode(grid), decode.fn(own), atol=1e-5)
    sent = []
    stream = P.PreviewStream(decode, lambda image, done, total: sent.append(image.size), min_interval=0)
    stream(2, STEPS, calls[1][2])
    assert sent == [(W, H)]                            # the picture at the image's size, not half of it


# ------------------------------------------------------------------------------------------------- the studio
@pytest.fixture(scope="module")
def files(studio):
    """A photo and a mask (a painted layer: red strokes on transparency) in a folder the studio may read."""
    folder = pathlib.Path(studio.engine.models_dir) / "flux2-inpaint"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(8)
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(folder / "photo.png")
    layer = Image.new("RGBA", (100, 70), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (40, 20, 80, 55))
    layer.save(folder / "mask.png")
    return folder / "photo.png", folder / "mask.png"


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_flux2_inpaints_in_the_studio_keeps_the_rest_records_and_restores(studio, files):
    engine = studio.engine
    photo, mask = files
    request = {"variant": FLUX2, "prompt": "a red ball", "num_inference_steps": 3, "seed": 4,
               "inpaint_image": str(photo), "inpaint_mask": str(mask), "mask_feather": 0}
    try:
        sent = []
        made = engine.generate(dict(request), preview=sent.append)[0]
        assert (made["width"], made["height"]) == (100, 70)            # padded to 112x80 for the model, cropped
        out, src = _pixels(made["path"]), _pixels(photo)
        painted = np.zeros((70, 100), dtype=bool)
        painted[20:55, 40:80] = True
        assert np.array_equal(out[~painted], src[~painted])             # unpainted pixels exactly the input's
        assert np.abs(out[painted] - src[painted]).mean() > 5
        assert sent and all(pathlib.Path(p).parent.parent.name == ".work" for p in sent)   # live previews
        recipe = made["recipe"]
        assert recipe["variant"] == FLUX2 and recipe["inpaint_image"]["file"] == "photo.png"
        assert recipe["inpaint_mask"]["copy"] == ".ref1.png" and recipe["mask_feather"] == 0
        again = engine.read_recipe(made["path"])
        assert np.array_equal(_pixels(engine.generate(again)[0]["path"]), out)
        found = engine.restore_inputs(made["path"])
        assert Image.open(found["inpaint_mask"]).size == (100, 70)
        # Outpainting: the canvas extended to the right, the new strip painted, the photo kept.
        canvas = engine.outpaint_canvas(str(photo), right=28)
        wide = engine.generate(dict(request, inpaint_image=canvas["image"], inpaint_mask=canvas["mask"]))[0]
        assert (wide["width"], wide["height"]) == (128, 70)
        kept = np.asarray(Image.open(canvas["mask"]).convert("L")) == 0
        assert kept[:, :90].all() and np.array_equal(_pixels(wide["path"])[:, :90], src[:, :90])
        # Control images are FLUX.1-dev's (ControlNets) and Flex.2's: refused by name, with the fix.
        with pytest.raises(EngineError, match="takes no control images.*FLUX.1-dev.*Flex.2"):
            engine.generate(dict(request, controls=[{"image": str(photo), "preprocessor": "canny"}]))
    finally:
        engine.release_models()        # the other tests start from the FLUX.1 demo again


def test_the_inpaint_tab_offers_flux2(studio):
    from tabs.inpaint import model_choices, model_note
    _, infos = model_choices(studio.engine)
    assert infos[FLUX2]["inpaint"] == "mask" and not infos[FLUX2]["control"]
    assert "FLUX.2" in model_note(infos[FLUX2]) and "no control images" in model_note(infos[FLUX2])


def test_flux2_inpaints_a_painted_mask_in_the_browser(page, studio, files, shots):
    from tests.browser import set_number, upload_to_inpaint
    photo, _ = files
    try:
        page.get_by_role("tab", name="Inpaint & Control").click()
        page.locator("#inp-model input").click()
        page.locator("ul[role='listbox'] li", has_text="FLUX.2 [klein] 4B random-weight demo").click()
        page.wait_for_function("document.querySelector('#inp-model-note')?.innerText?.includes('FLUX.2')")
        upload_to_inpaint(page, photo, "100 × 70")
        box = page.locator("#inp-editor canvas").first.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)    # one dab of the brush
        set_number(page, "inp-seed", 515)           # (the model's 4 steps, feather 8: inwards, the rest is exact)
        page.locator("#inp-prompt textarea").fill("a red ball")
        page.locator("#inp-generate").click()
        # The job loads the FLUX.2 demo first; with the other test worker busy that alone can take a minute.
        wait_for_job(page, "document.querySelector('#inp-selected-info textarea')?.value?.includes('Seed: 515,')",
                     studio, button="#inp-generate")
        info = page.locator("#inp-selected-info textarea").input_value()
        assert f"Variant: {FLUX2}" in info and "Mask:" in info and "Size: 100x70" in info
        page.screenshot(path=str(shots / "flux2-inpaint.png"))
        result = sorted(studio.outputs.rglob("*-515.png"))[-1]
        mask = np.asarray(Image.open(result.with_name(result.stem + ".ref1.png")).convert("L")) > 127
        out, src = _pixels(result), _pixels(photo)
        assert 0.02 < mask.mean() < 0.8 and np.array_equal(out[~mask], src[~mask])
    finally:
        studio.engine.release_models()
