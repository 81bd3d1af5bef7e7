"""studio/recipes.py, studio/a1111.py: recipes in PNG metadata (ours and A1111's), names that never overwrite."""
import json
import pathlib
import threading

import pytest
from PIL import Image, PngImagePlugin

from studio import recipes as R

RECIPE = {
    "variant": "FLUX.1-dev",
    "prompt": 'a red fox in snow, "cinematic"\nsecond line: with a colon',
    "negative_prompt": "blurry, lowres",
    "width": 1008,
    "height": 752,
    "num_inference_steps": 28,
    "embedded_guidance": 3.5,
    "cfg_scale": 2.0,
    "seed": 123456789,
    "num_images": 1,
    # The engine's layout: role -> files, each with the engine's quick fingerprint (and a sha256 when known).
    "model_files": {
        "vae": [{"file": "black-forest-labs/FLUX.1-dev/ae.safetensors", "fingerprint": "fedcba9876543210"}],
        "dit": [{"file": "black-forest-labs/FLUX.1-dev/flux1-dev.safetensors", "fingerprint": "1111222233334444",
                 "sha256": "0123456789abcdef"}],
    },
    "loras": [{"path": "loras/ink, style.safetensors", "scale": 0.75, "sha256": "aaaabbbbccccdddd"}],
    "engine_version": "0.1.0",
    "schedule": "seed",
    "sigma_shift": None,
}


def _image(w=32, h=24, color=(200, 30, 40)):
    return Image.new("RGB", (w, h), color)


def test_round_trip_gives_the_same_recipe(tmp_path):
    path = R.save_image(_image(), RECIPE, tmp_path)
    assert path.suffix == ".png" and path.is_file()
    assert R.read_recipe(path) == RECIPE
    # Also from an open image and from the raw bytes (what a browser upload gives).
    with Image.open(path) as im:
        assert R.read_recipe(im) == RECIPE
        assert im.size == (32, 24)
    assert R.read_recipe(path.read_bytes()) == RECIPE


def test_png_carries_both_chunks(tmp_path):
    path = R.save_image(_image(), RECIPE, tmp_path)
    with Image.open(path) as im:
        text = dict(im.text)
    assert json.loads(text["flux_studio"]) == RECIPE
    assert text["parameters"] == R.a1111_parameters(RECIPE)


def test_a1111_text_format():
    text = R.a1111_parameters(RECIPE)
    lines = text.split("\n")
    # Prompt (two lines), negative prompt, settings line.
    assert lines[0] == 'a red fox in snow, "cinematic"'
    assert lines[1] == "second line: with a colon"
    assert lines[2] == "Negative prompt: blurry, lowres"
    settings = lines[3]
    assert settings.startswith("Steps: 28, Sampler: Euler (flow), Schedule type: Flow shift 3, ")
    for piece in (
        "CFG scale: 2,",
        "Distilled CFG Scale: 3.5,",
        "Seed: 123456789,",
        "Size: 1008x752,",
        "Model hash: 0123456789,",
        "Model: flux1-dev,",
        'LoRAs: "ink, style:0.75"',
        "Version: FLUX Studio 0.1.0",
    ):
        assert piece in settings, piece
    assert len(lines) == 4


def test_a1111_model_field_variants():
    # A fingerprint is not a sha256: no "Model hash" then (Civitai would look it up and find nothing).
    fingerprint_only = {**RECIPE, "model_files": {"dit": [{"file": "x/flux1-krea-dev.safetensors", "fingerprint": "ab"}],
                                                  "vae": [{"file": "x/ae.safetensors", "fingerprint": "cd"}]}}
    text = R.a1111_parameters(fingerprint_only)
    assert "Model: flux1-krea-dev," in text and "Model hash" not in text
    # A flat list of files and a BFL schedule with its own shift.
    flat = {**RECIPE, "model_files": [{"path": "m/ae.safetensors"}, {"path": "m/flux1-schnell.safetensors"}],
            "schedule": "bfl", "sigma_shift": 1.15}
    text = R.a1111_parameters(flat)
    assert "Model: flux1-schnell," in text
    assert "Schedule type: Flow shift resolution-dependent mu 1.15," in text
    # No files at all: the variant names the model.
    assert "Model: FLUX.1-dev," in R.a1111_parameters({k: v for k, v in RECIPE.items() if k != "model_files"})


def test_a1111_text_without_negative_prompt_has_no_negative_line():
    text = R.a1111_parameters({**RECIPE, "negative_prompt": "", "prompt": "one line"})
    assert text.split("\n")[0] == "one line"
    assert "Negative prompt" not in text
    assert text.split("\n")[1].startswith("Steps: 28,")


def test_our_own_a1111_text_parses_back_to_the_settings():
    parsed = R.parse_a1111_parameters(R.a1111_parameters(RECIPE))
    for key in ("prompt", "negative_prompt", "width", "height", "num_inference_steps", "embedded_guidance",
                "cfg_scale", "seed", "variant"):
        assert parsed[key] == RECIPE[key], key
    assert parsed["extra"]["LoRAs"] == "ink, style:0.75"


def _foreign_png(path, text, **extra_chunks):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    for key, value in extra_chunks.items():
        info.add_text(key, value)
    _image(64, 64, (10, 120, 200)).save(path, pnginfo=info)
    return path


def test_reads_a_foreign_forge_flux_png(tmp_path):
    # What Forge writes for a FLUX image (no JSON chunk of ours).
    text = (
        "masterpiece, a lighthouse at dusk\n"
        "on a cliff\n"
        "Negative prompt: ugly, watermark\n"
        "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 4242, "
        'Size: 896x1152, Model hash: 4610115bb0, Model: flux1-dev-fp8, Module 1: ae, odd piece, Version: f2.0.1v1.10.1'
    )
    path = _foreign_png(tmp_path / "forge.png", text)
    recipe = R.read_recipe(path)
    assert recipe["prompt"] == "masterpiece, a lighthouse at dusk\non a cliff"
    assert recipe["negative_prompt"] == "ugly, watermark"
    assert recipe["num_inference_steps"] == 20
    assert recipe["cfg_scale"] == 1.0
    assert recipe["embedded_guidance"] == 3.5
    assert recipe["seed"] == 4242
    assert (recipe["width"], recipe["height"]) == (896, 1152)
    assert recipe["model"] == "flux1-dev-fp8"
    assert recipe["variant"] == "FLUX.1-dev"  # an fp8 re-upload of flux1-dev
    assert recipe["source"] == "a1111"
    assert recipe["extra"]["Sampler"] == "Euler"
    assert recipe["extra"]["Model hash"] == "4610115bb0"
    assert recipe["extra"]["Module 1"] == "ae" and recipe["extra"]["Version"] == "f2.0.1v1.10.1"


def test_reads_a_foreign_sd_png_without_negative_and_unknown_model(tmp_path):
    text = "Steps: 25, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x768, Model: sd_xl_base_1.0"
    # A prompt-less image: the only line is the settings line.
    path = _foreign_png(tmp_path / "sd.png", "a cat: sitting\n" + text)
    recipe = R.read_recipe(path)
    assert recipe["prompt"] == "a cat: sitting"
    assert recipe["negative_prompt"] == ""
    assert recipe["cfg_scale"] == 7.0
    assert (recipe["width"], recipe["height"]) == (512, 768)
    assert "variant" not in recipe  # not a FLUX file: the studio keeps its current model
    assert "embedded_guidance" not in recipe


def test_prompt_that_looks_like_settings_is_kept_as_prompt():
    recipe = R.parse_a1111_parameters("style: watercolor, light: soft, mood: calm")
    assert recipe["prompt"] == "style: watercolor, light: soft, mood: calm"
    assert "seed" not in recipe


def test_our_json_chunk_wins_over_parameters(tmp_path):
    path = _foreign_png(tmp_path / "both.png", "other\nSteps: 5, Seed: 9, Size: 64x64",
                        flux_studio=json.dumps(RECIPE))
    assert R.read_recipe(path) == RECIPE


def test_reads_a1111_jpeg_exif_user_comment(tmp_path):
    text = "a jpeg prompt\nSteps: 12, Sampler: Euler, CFG scale: 1, Seed: 77, Size: 64x64"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    path = tmp_path / "a.jpg"
    _image(64, 64).save(path, exif=exif)
    recipe = R.read_recipe(path)
    assert recipe["prompt"] == "a jpeg prompt"
    assert recipe["seed"] == 77 and recipe["num_inference_steps"] == 12


def test_no_recipe_gives_none(tmp_path):
    path = tmp_path / "plain.png"
    _image().save(path)
    assert R.read_recipe(path) is None
    assert R.read_recipe(tmp_path / "missing.png") is None
    assert R.read_recipe(b"not an image") is None
    assert R.read_recipe(None) is None


def test_names_are_dated_numbered_and_carry_the_seed(tmp_path):
    first = R.save_image(_image(), {**RECIPE, "seed": 42}, tmp_path)
    second = R.save_image(_image(), {**RECIPE, "seed": 7}, tmp_path)
    assert first.parent.parent == tmp_path
    assert len(first.parent.name) == 10 and first.parent.name.count("-") == 2  # YYYY-MM-DD
    assert first.name.endswith("-42.png") and second.name.endswith("-7.png")
    n1, n2 = int(first.name.split("-")[0]), int(second.name.split("-")[0])
    assert n2 == n1 + 1
    assert len(first.name.split("-")[0]) == 5


def test_never_overwrites_an_existing_file(tmp_path):
    first = R.save_image(_image(color=(1, 2, 3)), {**RECIPE, "seed": 5}, tmp_path)
    number = int(first.name.split("-")[0])
    # Someone (another process, a person) put the next names there already: they must survive untouched.
    taken = [first.parent / f"{number + 1:05d}-5.png", first.parent / f"{number + 2:05d}-5.png"]
    for path in taken:
        path.write_bytes(b"precious")
    R._last_number.clear()  # forget the in-process hint, as another process would
    # Make the scan miss the pre-existing names so the exclusive create is what protects them.
    original = R._next_number
    R._next_number = lambda directory: number + 1
    try:
        third = R.save_image(_image(), {**RECIPE, "seed": 5}, tmp_path)
    finally:
        R._next_number = original
    assert third not in taken and third != first
    assert int(third.name.split("-")[0]) == number + 3
    for path in taken:
        assert path.read_bytes() == b"precious"
    assert R.read_recipe(first)["seed"] == 5 and R.read_recipe(third)["seed"] == 5


@pytest.mark.parametrize("racing", [False, True], ids=["normal", "same-number-race"])
def test_concurrent_saves_all_get_distinct_files(tmp_path, monkeypatch, racing):
    if racing:
        # Every thread starts from the same number, as separate processes scanning the folder at once would:
        # only the exclusive create keeps them apart.
        monkeypatch.setattr(R, "_next_number", lambda directory: 1)
    threads, results, errors = [], [], []
    barrier = threading.Barrier(16)

    def work(i):
        try:
            barrier.wait()
            results.append(R.save_image(_image(16, 16, (i, i, i)), {**RECIPE, "seed": 1000 + i % 2}, tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    # Forget the in-process hint so the threads race on the same scanned number.
    R._last_number.clear()
    for i in range(16):
        threads.append(threading.Thread(target=work, args=(i,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 16 and len(set(results)) == 16
    files = list(tmp_path.rglob("*.png"))
    assert len(files) == 16
    # Each file is the image its thread saved (nothing was overwritten by another thread).
    colors = sorted(Image.open(p).getpixel((0, 0))[0] for p in results)
    assert colors == list(range(16))


def test_variant_for_model_name():
    assert R.variant_for_model_name("flux1-dev.safetensors") == "FLUX.1-dev"
    assert R.variant_for_model_name("models/x/flux1-krea-dev.safetensors") == "FLUX.1-Krea-dev"
    assert R.variant_for_model_name("flux1-kontext-dev") == "FLUX.1-Kontext-dev"
    assert R.variant_for_model_name("sd_xl_base_1.0") is None
    assert R.variant_for_model_name(None) is None


def test_sha256_prefix(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    # sha256("abc") is a published test vector.
    assert R.sha256_prefix(path) == "ba7816bf8f01"
    assert R.sha256_prefix(path, 16) == "ba7816bf8f01cfea"


def test_save_requires_a_dict(tmp_path):
    with pytest.raises(TypeError):
        R.save_image(_image(), None, tmp_path)
    assert not list(pathlib.Path(tmp_path).rglob("*.png"))
