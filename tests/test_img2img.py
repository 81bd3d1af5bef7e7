"""Image to image and the hires fix on Generate (studio.features.img2img): the request keys, the pipeline
arguments they become (checked against the pipeline called directly), the recipe with the input copy and both
passes, restore, refusals; and the Generate tab's controls in the browser."""
import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from studio import recipes as R
from studio.engine import Engine


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("img2img")


@pytest.fixture(scope="module")
def engine(root):
    return Engine(models_dir=root / "models", demo=True, outputs_dir=root / "outputs", allow_dirs=[root / "in"])


@pytest.fixture(scope="module")
def photo(root):
    (root / "in").mkdir(exist_ok=True)
    x, y = np.meshgrid(np.linspace(0, 255, 64), np.linspace(0, 255, 64))
    image = Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))
    path = root / "in" / "start.png"
    image.save(path)
    return path


def base(**extra):
    return {"prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 11, **extra}


def direct(engine, **kwargs):
    pipe = engine.pipeline(engine.default_variant())
    args = dict(prompt="a red cube", width=64, height=64, num_inference_steps=2, seed=11,
                progress_bar_cmd=lambda it: it)
    return pipe(**{**args, **kwargs})


def pixels(image_or_path):
    image = Image.open(image_or_path) if not isinstance(image_or_path, Image.Image) else image_or_path
    return np.asarray(image.convert("RGB"))


def test_img2img_is_the_pipelines_input_image_and_strength(engine, photo):
    made = engine.generate(base(init_image=str(photo), denoising_strength=0.5))[0]
    expected = direct(engine, input_image=Image.open(photo), denoising_strength=0.5)
    assert np.array_equal(pixels(made["path"]), pixels(expected))
    other = engine.generate(base(init_image=str(photo), denoising_strength=0.9))[0]
    assert not np.array_equal(pixels(made["path"]), pixels(other["path"]))     # the strength is honoured
    plain = engine.generate(base())[0]
    assert not np.array_equal(pixels(made["path"]), pixels(plain["path"]))     # the image is honoured


def test_recipe_keeps_the_input_beside_the_result_and_restores_it(engine, photo):
    made = engine.generate(base(init_image=str(photo), denoising_strength=0.6))[0]
    recipe = made["recipe"]
    assert recipe["denoising_strength"] == 0.6
    assert recipe["init_image"]["file"] == "start.png" and recipe["init_image"]["size"] == [64, 64]
    restored = engine.read_recipe(made["path"])
    assert restored["denoising_strength"] == 0.6
    copy = restored["init_image"]
    assert copy.endswith(".init0.png") and np.array_equal(pixels(copy), pixels(photo))
    assert "Denoising strength: 0.6" in made["info"]           # the A1111 text too
    # Restored, the request makes the same image again.
    again = engine.generate({k: v for k, v in restored.items() if k != "variant"} | {"seed": made["seed"]})[0]
    assert np.array_equal(pixels(again["path"]), pixels(made["path"]))


def test_size_comes_from_the_image_when_none_is_given(engine, root):
    path = root / "in" / "wide.png"
    Image.new("RGB", (96, 64), (30, 120, 200)).save(path)
    made = engine.generate({"prompt": "x", "num_inference_steps": 1, "seed": 1, "init_image": str(path)})[0]
    assert (made["width"], made["height"]) == (96, 64)


def test_stretch_is_said(engine, root):
    path = root / "in" / "tall.png"
    Image.new("RGB", (64, 128), (30, 120, 200)).save(path)
    made = engine.generate(base(init_image=str(path)))[0]
    assert any("stretched" in note for note in made.get("notes", []))
    assert made["recipe"]["init_image"]["size"] == [64, 64]            # as used; the copy is the whole input
    assert Image.open(engine.read_recipe(made["path"])["init_image"]).size == (64, 128)


@pytest.mark.parametrize("strength", [0, -0.5, 1.5, "lots", float("nan")])
def test_bad_strength_is_refused_by_name(engine, photo, strength):
    with pytest.raises(EngineError, match="denoising strength"):
        engine.validate(base(init_image=str(photo), denoising_strength=strength))


def test_eligen_inpaint_and_img2img_together_are_refused(engine, photo, root):
    mask = root / "in" / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    request = base(eligen_entity_prompts=["a cube"], eligen_entity_masks=[str(mask)], eligen_enable_inpaint=True,
                   input_image=str(photo), init_image=str(photo))
    with pytest.raises(EngineError, match="input_image"):
        engine.generate(request)


# ----------------------------------------------------------------------------------------------------- hires fix
def test_hires_fix_is_generate_upscale_refine_in_one_job(engine):
    steps_seen = []
    made = engine.generate(base(hires_scale=2, hires_strength=0.5),
                           progress=lambda done, total, message: steps_seen.append(message))[0]
    first = direct(engine)
    expected = direct(engine, width=128, height=128, input_image=first.resize((128, 128), Image.LANCZOS),
                      denoising_strength=0.5, num_inference_steps=1)
    assert (made["width"], made["height"]) == (128, 128)
    assert np.array_equal(pixels(made["path"]), pixels(expected))
    assert any("refining" in m for m in steps_seen)
    recipe = made["recipe"]
    assert (recipe["width"], recipe["height"]) == (64, 64)               # the first pass
    assert recipe["hires_size"] == [128, 128] and recipe["hires_steps"] == 1
    assert recipe["hires_scale"] == 2 and recipe["hires_strength"] == 0.5
    from studio.features.img2img import Img2ImgFeature
    assert ("Hires fix: upscaled 2x to 128x128, then refined at strength 0.5 in 1 steps"
            in Img2ImgFeature().describe(R.read_recipe(made["path"])))
    restored = engine.read_recipe(made["path"])
    assert (restored["width"], restored["height"], restored["hires_scale"], restored["hires_strength"]) == (
        64, 64, 2, 0.5)


def test_hires_fix_after_img2img(engine, photo):
    made = engine.generate(base(init_image=str(photo), denoising_strength=0.8, hires_scale=1.5,
                                hires_strength=0.3))[0]
    assert (made["width"], made["height"]) == (96, 96)
    assert made["recipe"]["denoising_strength"] == 0.8 and made["recipe"]["hires_size"] == [96, 96]


@pytest.mark.parametrize("scale", [0.5, 5, "big"])
def test_bad_hires_scale_is_refused(engine, scale):
    with pytest.raises(EngineError, match="upscale factor"):
        engine.validate(base(hires_scale=scale))


def test_hires_fix_over_the_largest_size_is_refused(engine):
    with pytest.raises(EngineError, match="over 4096"):
        engine.validate(base(width=3072, height=1024, hires_scale=2))


def test_tab_restores_the_settings_and_shows_an_api_factor_as_the_nearest_offered():
    from tabs.generate import img2img_settings
    assert img2img_settings(None, {"init_image": "/x/a.init0.png", "denoising_strength": 0.5, "hires_scale": 2,
                                   "hires_strength": 0.3}) == ("/x/a.init0.png", 0.5, 2.0, 0.3)
    assert img2img_settings(None, {"hires_scale": 1.7})[2] == 1.5
    assert img2img_settings(None, {"prompt": "no image"}) == (None, 0.7, 1.0, 0.4)     # turned off


# ---------------------------------------------------------------------------------------------------- the browser


def test_browser_img2img_with_hires_fix_and_restore(browser, studio, photo):
    from tests.browser import set_number, studio_page
    with studio_page(browser, studio.url, 60_000) as page:
        page.locator("#gen-prompt textarea").fill("img2img in the page")
        for elem_id, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 2)):
            set_number(page, elem_id, value)
        page.locator("#gen-img2img-accordion").click()
        page.locator("#gen-init-image input[type='file']").set_input_files(str(photo))
        page.wait_for_selector("#gen-init-image img")
        set_number(page, "gen-denoising-strength", 0.6)
        page.locator("#gen-hires-scale label", has_text="2×").click()
        page.locator("#gen-generate").click()
        page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('img2img in')")
        info = page.locator("#selected-info textarea").input_value()
        assert "Denoising strength: 0.6" in info and "Size: 64x64" in info
        assert "Hires fix: upscaled 2x to 128x128" in info
        assert page.locator("#results-gallery .thumbnails img").first.get_attribute("title").endswith("128×128")
        # Cleared, then restored from the result: the input image (its copy) and the hires fix come back.
        page.locator("#gen-init-image button[aria-label='Remove Image']").first.click()
        page.wait_for_selector("#gen-init-image img", state="detached")
        page.locator("#gen-hires-scale label", has_text="Off").click()
        page.locator("#restore-selected").click()
        page.wait_for_selector("#gen-init-image img")
        assert ".init0.png" in page.locator("#gen-init-image img").first.get_attribute("src")
        page.wait_for_function("[...document.querySelectorAll('#gen-hires-scale input')].some(i => i.checked && "
                               "i.closest('label').innerText.includes('2×'))")
