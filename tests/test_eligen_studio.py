"""The studio's EliGen jobs (studio.features.eligen, studio.eligen_layout and the Engine's EliGen helpers) on the
random-weight demo: painted colours -> entity masks, the preview, bad input named by entity, results that carry
their entities (masks saved beside the image) and reproduce, layout files, and the EliGen LoRA beside another.
"""
from __future__ import annotations

import zipfile

import numpy as np
import pytest
from PIL import Image

from engine import EngineError
from studio import eligen_layout as el

DEV = "FLUX.1-dev-random-demo"
W, H = 96, 64


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    """An engine on a models folder of its own (the LoRAs these tests write stay out of the shared demo folder)."""
    from studio.engine import Engine
    from tests.helpers import linked_models
    root = tmp_path_factory.mktemp("eligen-studio")
    return Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs",
                  allow_dirs=[tmp_path_factory.getbasetemp()])  # the tests' input images


def _rgb(colour):
    return el._rgb(colour)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A painted layer as the browser sends it (RGBA, half size): entity 1 in the left third, entity 2 in the right
    third, with a blended edge on entity 2 (the brush's antialiasing) and an erased spot (alpha 0)."""
    root = tmp_path_factory.mktemp("eligen-in")
    layer = Image.new("RGBA", (W // 2, H // 2), (0, 0, 0, 0))
    layer.paste(_rgb(el.COLOURS[0]) + (255,), (0, 0, 16, 32))
    layer.paste(_rgb(el.COLOURS[1]) + (255,), (32, 0, 48, 32))
    blended = tuple((a + b) // 2 for a, b in zip(_rgb(el.COLOURS[1]), (255, 255, 255)))
    layer.paste(blended[:3] + (120,), (31, 0, 32, 32))      # a soft edge: nearest colour is still entity 2's
    layer.paste((0, 0, 0, 0), (4, 4, 8, 8))                 # erased
    layer.save(root / "layer.png")
    mask3 = Image.new("L", (W * 2, H * 2), 0)              # a kept mask of another size (a loaded layout)
    mask3.paste(255, (64, 0, 128, 64))
    mask3.save(root / "kept.png")
    photo = (np.random.RandomState(1).rand(H, W, 3) * 255).astype("uint8")
    Image.fromarray(photo).save(root / "photo.png")
    return root


def _mask_file(root, name, box, size=(W, H)):
    m = Image.new("L", size, 0)
    m.paste(255, box)
    m.save(root / name)
    return str(root / name)


def test_painted_colours_split_into_entity_masks(files):
    masks = el.masks_from_layer(files / "layer.png", (W, H), 3)
    a = [np.asarray(m) > 0 for m in masks]
    assert a[0][:, :32].sum() == 32 * 64 - 8 * 8          # the left third, minus the erased spot
    assert not a[0][:, 32:].any()
    assert a[1][:, 62:96].all() and not a[1][:, :62].any()   # the soft edge (x 62..63) went to entity 2
    assert not a[2].any()                                    # nothing painted in colour 3


def test_layout_unites_painted_and_kept_masks_and_previews(engine, files):
    canvas = engine.eligen_canvas(W, H)
    assert (canvas["width"], canvas["height"]) == (W, H)
    kept = {"masks": [None, None, str(files / "kept.png")], "size": [W * 2, H * 2]}
    made = engine.eligen_layout(canvas["image"], str(files / "layer.png"), kept, ["cat", "dog", "lamp"])
    assert (made["width"], made["height"]) == (W, H)
    assert all(made["masks"])
    third = np.asarray(Image.open(made["masks"][2])) > 0
    assert third[:32, 32:64].all() and third.sum() == 32 * 32            # resized from 192x128 (nearest)
    prev = np.asarray(Image.open(made["preview"]).convert("RGB")).astype(int)
    grey = np.array([236, 236, 236])
    # Each area is tinted towards its own colour (red, green, blue channels dominate in turn).
    for k, (y, x) in enumerate(((50, 20), (50, 80), (25, 48))):
        px = prev[y, x] - grey
        assert int(np.argmax(_rgb(el.COLOURS[k]))) == int(np.argmax(px)), (k, px)
    # An unpainted entity yields no file (and its row stays empty).
    empty = engine.eligen_layout(canvas["image"], None, None, ["cat", "dog"])
    assert empty["masks"] == [None, None]


def _job(engine, masks, prompts, **kw):
    req = {"variant": DEV, "prompt": "a cat and a dog", "width": W, "height": H, "num_inference_steps": 2,
           "seed": 7, "eligen_entity_prompts": prompts, "eligen_entity_masks": masks}
    req.update(kw)
    return engine.generate(req)


def test_result_carries_entities_and_reproduces(engine, files, tmp_path):
    m1 = _mask_file(tmp_path, "m1.png", (0, 0, 40, 64))
    m2 = _mask_file(tmp_path, "m2.png", (30, 0, 96, 64))     # overlaps entity 1 (allowed)
    [res] = _job(engine, [m1, m2], ["a black cat", "a brown dog"])
    out = res["path"]
    found = engine.read_recipe(out)
    assert found["eligen_entity_prompts"] == ["a black cat", "a brown dog"]
    for k, m in enumerate((m1, m2)):   # the masks as used, beside the image
        copy = out.rsplit(".", 1)[0] + f".ent{k}.png"
        assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(m)))
    assert not any(lo.get("name") == "EliGen" for lo in found.get("loras") or [])   # the feature LoRA stays hidden
    written = [lo for lo in res["recipe"].get("loras") or [] if lo.get("feature")]
    assert [lo["name"] for lo in written] == ["EliGen"]          # ...but the file records that it was used
    back = engine.eligen_restore(out)
    assert back["prompts"] == ["a black cat", "a brown dog"] and (back["width"], back["height"]) == (W, H)
    [again] = _job(engine, back["masks"], back["prompts"])
    assert np.array_equal(np.asarray(Image.open(again["path"])), np.asarray(Image.open(out)))
    # ...and the entities matter: swapping the two prompts gives another image. (The demo's random text weights move
    # pixels little: a whole other prompt changes them by about 1 level on average, a swap by a few hundredths.)
    [swapped] = _job(engine, [m1, m2], ["a brown dog", "a black cat"])
    diff = np.abs(np.asarray(Image.open(swapped["path"])).astype(int) - np.asarray(Image.open(out)).astype(int))
    assert diff.mean() > 0.005


@pytest.mark.parametrize("case, message", [
    ("no_mask", "Entity 2 ('a dog') has no painted area"),
    ("no_prompt", "Entity 1 has a painted area but no prompt"),
    ("empty", "No entities"),
    ("inpaint_no_image", "upload one"),
])
def test_bad_input_is_named(engine, tmp_path, case, message):
    m1 = _mask_file(tmp_path, "m1.png", (0, 0, 40, 64))
    blank = _mask_file(tmp_path, "blank.png", (0, 0, 0, 0))
    kw = {"no_mask": dict(masks=[m1, blank], prompts=["a cat", "a dog"]),
          "no_prompt": dict(masks=[m1], prompts=[""]),
          "empty": dict(masks=[blank], prompts=[""]),
          "inpaint_no_image": dict(masks=[m1], prompts=["a cat"], eligen_enable_inpaint=True)}[case]
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _job(engine, kw.pop("masks"), kw.pop("prompts"), **kw)
    [ok] = _job(engine, [m1], ["a cat"], num_inference_steps=1)      # the engine stays usable
    assert ok["path"]


def test_other_variants_are_refused_by_name(engine, tmp_path):
    m1 = _mask_file(tmp_path, "m1.png", (0, 0, 40, 64))
    with pytest.raises(EngineError, match="EliGen works with FLUX.1-dev"):
        _job(engine, [m1], ["a cat"], variant="FLUX.1-Fill-dev-random-demo")


def test_mask_of_another_size_is_fitted_with_a_note(engine, tmp_path):
    big = _mask_file(tmp_path, "big.png", (0, 0, 80, 128), size=(192, 128))
    [res] = _job(engine, [big], ["a cat"], num_inference_steps=1)
    assert "192x128" in " ".join(res.get("notes") or [])
    copy = np.asarray(Image.open(res["path"].rsplit(".", 1)[0] + ".ent0.png")) > 0
    assert copy.shape == (H, W) and copy[:, :40].all() and not copy[:, 40:].any()


def test_inpaint_mode_repaints_only_the_entities(engine, files, tmp_path):
    m1 = _mask_file(tmp_path, "m1.png", (0, 0, 48, 64))
    photo = Image.open(files / "photo.png").convert("RGB")
    kw = dict(input_image=str(files / "photo.png"), num_inference_steps=3)
    [res] = _job(engine, [m1], ["a cat"], eligen_enable_inpaint=True, **kw)
    [other] = _job(engine, [m1], ["a cat"], eligen_enable_inpaint=True, **{**kw, "seed": 8})
    [plain] = _job(engine, [m1], ["a cat"], **{**kw, "input_image": None})
    pipe = engine._pipe
    roundtrip = np.asarray(pipe.decode_latents(pipe.encode_image(photo))).astype(int)   # the input through the VAE
    out, out8, free = (np.asarray(Image.open(r["path"]).convert("RGB")).astype(int) for r in (res, other, plain))
    # The demo's random VAE decoder mixes the whole image, so pixels show it only roughly: the inpainted results
    # stay near the input's round trip, unlike a free generation; and two seeds differ more inside the entity.
    assert np.abs(out - roundtrip).mean() < np.abs(free - roundtrip).mean()
    assert np.abs(out - out8)[:, :40].mean() > np.abs(out - out8)[:, 60:].mean()
    assert engine.eligen_restore(res["path"])["canvas"]       # the input is kept beside it as the canvas


def test_layout_file_round_trip_and_bad_file(engine, files, tmp_path):
    m1 = _mask_file(tmp_path, "m1.png", (0, 0, 40, 64))
    m2 = _mask_file(tmp_path, "m2.png", (50, 10, 96, 64))
    path = engine.eligen_save_layout(W, H, "a room", ["a cat", "", "a lamp"], [m1, None, m2])
    again = engine.eligen_save_layout(W, H, "a room", ["a cat", "a lamp"], [m1, m2])
    assert path != again                                        # never overwritten
    with zipfile.ZipFile(path) as z:
        assert {"0.png", "1.png", "prompts.json"} <= set(z.namelist())   # DiffSynth's EliGen folder format
    loaded = engine.eligen_load_layout(path)
    assert (loaded["width"], loaded["height"], loaded["prompt"]) == (W, H, "a room")
    assert loaded["prompts"] == ["a cat", "a lamp"]            # the row with no mask was left out
    for f, m in zip(loaded["masks"], (m1, m2)):
        assert np.array_equal(np.asarray(Image.open(f)) > 0, np.asarray(Image.open(m)) > 0)
    bad = tmp_path / "notes.zip"
    bad.write_text("not a zip")
    with pytest.raises(EngineError, match="not an EliGen layout"):
        engine.eligen_load_layout(str(bad))


def _style_lora(models_dir) -> str:
    """A person's LoRA for the demo transformer (diffusers/peft keys), in <models>/loras/."""
    import torch
    from safetensors.torch import save_file
    from engine.demo import TRANSFORMER
    width, g, sd = TRANSFORMER["hidden_size"], torch.Generator().manual_seed(3), {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_k"):
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, width, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(width, 4, generator=g) * 0.3
    folder = models_dir / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "eligen-test-style.safetensors"))
    return "eligen-test-style.safetensors"


def test_eligen_beside_a_user_lora(engine, tmp_path):
    """The person's LoRA and the EliGen LoRA together: the recipe names the person's, and the job differs from the
    one without it (the LoRA acts) while the entities still matter (the attention mask is in force: a swap of the
    prompts still changes the image)."""
    lora = _style_lora(engine.models_dir)
    m1 = _mask_file(tmp_path, "m1.png", (0, 0, 40, 64))
    m2 = _mask_file(tmp_path, "m2.png", (50, 0, 96, 64))
    base = {"loras": [{"name": lora, "weight": 1.0}]}
    [a] = _job(engine, [m1, m2], ["a black cat", "a brown dog"], **base)
    [b] = _job(engine, [m1, m2], ["a brown dog", "a black cat"], **base)
    [c] = _job(engine, [m1, m2], ["a black cat", "a brown dog"])
    img = {k: np.asarray(Image.open(r["path"])).astype(int) for k, r in (("a", a), ("b", b), ("c", c))}
    assert np.abs(img["a"] - img["b"]).mean() > 0.005 and np.abs(img["a"] - img["c"]).mean() > 0.05
    names = [lo["name"] for lo in engine.read_recipe(a["path"])["loras"]]
    assert names == [lora]


def test_vram_plan_makes_room_for_the_entity_tokens(engine, tmp_path):
    """Each entity adds a prompt's worth of T5 tokens to the transformer's sequence: the plan counts them (a tight
    VRAM limit would otherwise be planned for a plain job's activations and run out of memory)."""
    m1 = _mask_file(tmp_path, "m1.png", (0, 0, 40, 64))
    m2 = _mask_file(tmp_path, "m2.png", (50, 0, 96, 64))
    m3 = _mask_file(tmp_path, "m3.png", (0, 0, 96, 20))
    _job(engine, [m1, m2, m3], ["a cat", "a dog", "a lamp"], num_inference_steps=1, t5_sequence_length=256)
    pipe = engine._pipe
    assert pipe.plan_text_tokens >= 256 * 4          # more than a plain job's 512
    from engine import memory as vram
    sizes = {"dit": vram.sizes_from_module("dit", pipe.dit)}
    plain = vram.plan(sizes, "cuda", None, None, width=1024, height=1024, t5_sequence_length=512)
    eligen = vram.plan(sizes, "cuda", None, None, width=1024, height=1024, t5_sequence_length=512 * 4)
    assert eligen.predicted_peak_vram_gb > plain.predicted_peak_vram_gb


def test_inpaint_keeps_the_input_size(engine, tmp_path):
    """An input of 100x70 (not a multiple of 16) comes back 100x70: worked on padded to 112x80, cropped back; its
    masks and the input copy beside the result are at its size; a canvas made from it keeps its size too."""
    photo = tmp_path / "odd.png"
    Image.fromarray((np.random.RandomState(2).rand(70, 100, 3) * 255).astype("uint8")).save(photo)
    canvas = engine.eligen_canvas(None, None, str(photo))
    assert (canvas["width"], canvas["height"]) == (100, 70)
    mask = _mask_file(tmp_path, "m.png", (0, 0, 50, 70), size=(100, 70))
    [res] = _job(engine, [mask], ["a cat"], width=100, height=70, eligen_enable_inpaint=True, input_image=str(photo),
                 num_inference_steps=1)
    assert (res["width"], res["height"]) == (100, 70) and Image.open(res["path"]).size == (100, 70)
    assert (res["recipe"]["width"], res["recipe"]["height"], res["recipe"]["work_size"]) == (100, 70, [112, 80])
    stem = res["path"].rsplit(".", 1)[0]
    assert Image.open(stem + ".input.png").size == (100, 70) and Image.open(stem + ".ent0.png").size == (100, 70)
    assert not res.get("notes")                                  # nothing was resized
    back = engine.eligen_restore(res["path"])                    # restore brings the inpaint mode and input back
    assert back["inpaint"] and Image.open(back["input_image"]).size == (100, 70)
    assert (back["width"], back["height"]) == (100, 70) and not back["on_negative"]
