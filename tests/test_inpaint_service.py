"""The studio's engine on inpainting and control jobs (studio.features.inpaint through Engine.generate), on the
random-weight demos of FLUX.1-Fill-dev, Flex.2-preview and FLUX.1-dev with its ControlNets."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
from PIL import Image

from engine import EngineError

FILL, FLEX, DEV = "FLUX.1-Fill-dev-random-demo", "Flex.2-preview-random-demo", "FLUX.1-dev-random-demo"


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    return Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path_factory.mktemp("inpaint-out"),
                  allow_dirs=[tmp_path_factory.getbasetemp()])  # the tests' input images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 100x70 photo-like image (not a multiple of 16), a painted layer at half size (as a browser canvas may return
    it), and a control image."""
    root = tmp_path_factory.mktemp("inpaint-in")
    rng = np.random.RandomState(0)
    photo = (rng.rand(70, 100, 3) * 255).astype("uint8")
    Image.fromarray(photo).save(root / "photo.png")
    layer = Image.new("RGBA", (50, 35), (255, 255, 255, 0))
    layer.paste((255, 255, 255, 153), (10, 10, 25, 25))          # -> (20..50, 20..50) at full size
    layer.save(root / "layer.png")
    Image.new("RGBA", (100, 70), (0, 0, 0, 0)).save(root / "empty.png")
    control = Image.new("RGB", (128, 96), (20, 20, 20))
    control.paste((230, 230, 230), (30, 20, 90, 70))
    control.save(root / "control.png")
    return {k: root / f"{k}.png" for k in ("photo", "layer", "empty", "control")}


def _job(engine, **kw):
    req = {"prompt": "a red ball", "num_inference_steps": 2, "seed": 5, "mask_feather": 0}
    req.update(kw)
    return engine.generate(req)


def _arr(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_fill_keeps_unpainted_pixels_and_the_image_size(engine, files):
    [res] = _job(engine, variant=FILL, inpaint_image=str(files["photo"]), inpaint_mask=str(files["layer"]))
    out, src = _arr(res["path"]), _arr(files["photo"])
    assert out.shape == src.shape                                   # 100x70, padding cropped
    outside = np.ones(src.shape[:2], bool)
    outside[20:50, 20:50] = False
    assert np.array_equal(out[outside], src[outside])                # untouched, exactly
    assert np.abs(out[22:48, 22:48] - src[22:48, 22:48]).mean() > 5  # repainted
    notes = " ".join(res.get("notes") or [])
    assert "50x35" in notes and "100x70" in notes                    # the mask was resized, and said so
    assert "cropped back" in engine.inpaint_size(str(files["photo"]))["note"]   # said before the job
    recipe = res["recipe"]
    assert recipe["inpaint_image"]["file"] == "photo.png" and recipe["inpaint_mask"]["file"] == "layer.png"
    assert recipe["mask_feather"] == 0 and recipe["mask_invert"] is False
    mask_copy = pathlib.Path(res["path"]).with_name(pathlib.Path(res["path"]).stem + recipe["inpaint_mask"]["copy"])
    saved = np.asarray(Image.open(mask_copy))
    assert saved.shape == (70, 100) and saved[25, 25] == 255 and saved[5, 5] == 0   # as painted, image-sized
    back = engine.restore_inputs(res["path"])
    assert pathlib.Path(back["inpaint_image"]).is_file() and back["mask_feather"] == 0
    assert np.array_equal(np.asarray(Image.open(back["inpaint_mask"])), saved)


def test_service_passes_the_seed_arguments_the_pipeline_takes(engine, files):
    """Inside the mask the studio's result is the pipeline's own output for the same seed arguments."""
    [res] = _job(engine, variant=FILL, inpaint_image=str(files["photo"]), inpaint_mask=str(files["layer"]),
                 embedded_guidance=30.0)
    pipe = engine.pipeline(FILL)
    image = Image.open(files["photo"]).convert("RGB")
    padded = Image.fromarray(np.pad(np.asarray(image), [(0, 10), (0, 12), (0, 0)], mode="edge"))
    mask = Image.new("L", (112, 80), 0)
    mask.paste(255, (20, 20, 50, 50))
    direct = pipe(prompt="a red ball", flux_fill_image=padded, flux_fill_mask=mask, height=80, width=112, seed=5,
                  num_inference_steps=2, embedded_guidance=30.0, progress_bar_cmd=lambda x: x)
    want = np.asarray(direct).astype(int)[:70, :100]
    assert np.abs(_arr(res["path"])[20:50, 20:50] - want[20:50, 20:50]).max() <= 1


def test_feather_softens_only_near_the_edge_and_invert_flips(engine, files):
    [soft] = _job(engine, variant=FILL, inpaint_image=str(files["photo"]), inpaint_mask=str(files["layer"]),
                  mask_feather=6)
    out, src = _arr(soft["path"]), _arr(files["photo"])
    assert np.array_equal(out[:8], src[:8]) and np.array_equal(out[62:], src[62:])   # far from the mask: kept
    [inv] = _job(engine, variant=FILL, inpaint_image=str(files["photo"]), inpaint_mask=str(files["layer"]),
                 mask_invert=True)
    out = _arr(inv["path"])
    assert np.array_equal(out[22:48, 22:48], src[22:48, 22:48])      # the painted area is now kept
    assert np.abs(out[60:, 60:] - src[60:, 60:]).mean() > 5


def test_bad_inpaint_requests_are_refused_and_the_engine_stays_usable(engine, files):
    with pytest.raises(EngineError, match="empty"):
        _job(engine, variant=FILL, inpaint_image=str(files["photo"]), inpaint_mask=str(files["empty"]))
    with pytest.raises(EngineError, match="No mask"):
        _job(engine, variant=FILL, inpaint_image=str(files["photo"]))
    with pytest.raises(EngineError, match="does not inpaint"):
        _job(engine, variant="FLUX.1-Kontext-dev-random-demo", inpaint_image=str(files["photo"]),
             inpaint_mask=str(files["layer"]))
    with pytest.raises(EngineError, match="takes no control images"):
        _job(engine, variant=FILL, controls=[{"image": str(files["control"]), "preprocessor": "canny"}])
    assert _job(engine, variant=FILL, inpaint_image=str(files["photo"]), inpaint_mask=str(files["layer"]))


def test_flex_inpaints_and_takes_one_control_image(engine, files):
    control = {"image": str(files["control"]), "preprocessor": "canny", "scale": 0.8, "start": 0.0, "end": 0.5}
    [res] = _job(engine, variant=FLEX, inpaint_image=str(files["photo"]), inpaint_mask=str(files["layer"]),
                 controls=[control])
    assert Image.open(res["path"]).size == (100, 70)
    assert res["recipe"]["controls"][0]["preprocessor"] == "canny"
    assert any("another aspect" in n for n in res.get("notes") or [])    # 128x96 fitted to 100x70
    [alone] = _job(engine, variant=FLEX, controls=[control])              # control only: the control's size
    assert Image.open(alone["path"]).size == (128, 96)
    with pytest.raises(EngineError, match="one control image"):
        _job(engine, variant=FLEX, controls=[control, control])


def test_controlnets_are_attached_for_the_job_and_removed_after(engine, files):
    [res] = _job(engine, variant=DEV, inpaint_image=str(files["photo"]), inpaint_mask=str(files["layer"]),
                 controls=[{"image": str(files["control"]), "preprocessor": "canny", "controlnet": "Union-alpha",
                            "scale": 0.7}])
    pipe = engine.pipeline(DEV)
    assert pipe.controlnet is not None and pipe.controlnet.flux_studio_names == ("Inpainting-Beta", "Union-alpha")
    assert set(res["recipe"]["model_files"]) >= {"dit", "controlnet"}
    src, out = _arr(files["photo"]), _arr(res["path"])
    assert np.array_equal(out[:15], src[:15])
    [plain] = _job(engine, variant=DEV, width=64, height=64)
    assert engine.pipeline(DEV).controlnet is None and "controlnet" not in plain["recipe"]["model_files"]


def test_outpaint_canvas_and_preview(engine, files):
    made = engine.outpaint_canvas(str(files["photo"]), str(files["layer"]), left=32, bottom=16)
    img, mask = Image.open(made["image"]), Image.open(made["mask"])
    assert img.size == mask.size == (132, 86)
    alpha = np.asarray(mask)
    assert alpha[40, 5] > 0 and alpha[80, 100] > 0                    # the new strips are masked
    assert alpha[40, 90] == 0                                          # the old image's middle is not
    assert alpha[30, 60] > 0                                           # the painted area moved with the image
    assert np.array_equal(np.asarray(img.convert("RGB"))[:70, 32:], _arr(files["photo"]).astype("uint8"))
    with pytest.raises(EngineError, match="at least one side"):
        engine.outpaint_canvas(str(files["photo"]))
    preview = Image.open(engine.preview_control(str(files["control"]), "canny")["path"]).convert("L")
    edges = np.asarray(preview)
    assert edges.max() == 255 and (edges > 0).mean() < 0.2             # edges, not the image


def test_mask_preview_unites_the_painted_layer_with_the_kept_mask(engine, files, tmp_path):
    kept = Image.new("L", (100, 70), 0)
    kept.paste(255, (80, 0, 100, 70))                                   # a strip kept by the page (outpainting)
    kept.save(tmp_path / "kept.png")
    made = engine.mask_preview(str(files["photo"]), str(files["layer"]), str(tmp_path / "kept.png"))
    mask = np.asarray(Image.open(made["mask"])) > 127
    assert mask[30, 30] and mask[30, 90] and not mask[5, 5] and not mask[60, 60]
    assert 0.2 < made["fraction"] < 0.4
    preview = _arr(made["preview"])
    assert np.array_equal(preview[5, 5], _arr(files["photo"])[5, 5]) and not np.array_equal(preview[30, 90],
                                                                                              _arr(files["photo"])[30, 90])
    small = Image.new("L", (50, 35), 255)                                 # kept for another image: ignored
    small.save(tmp_path / "other.png")
    only_layer = engine.mask_preview(str(files["photo"]), str(files["layer"]), str(tmp_path / "other.png"))
    assert not (np.asarray(Image.open(only_layer["mask"])) > 127)[60, 90]
    assert engine.mask_preview(str(files["photo"]), None, None)["mask"] is None
