"""Bad and hostile input, as an attacker would send it (issue 12): every refusal is the studio's own message, decided
before memory is spent.

- EliGen layout zips: a size of 20000x20000 in prompts.json, a member that is a decompression bomb, a member that
  unpacks to hundreds of MB, a zip-slip name; the peak memory of checking them is measured in a fresh process.
- Masks: a decompression-bomb entity mask through an engine request, and through every mask reader.
- LoRA names: null bytes, 5000 characters, control characters.
- Uploads through the served studio (/edit): an empty file, a text file named .png, a 30000x30000 PNG; the editor
  and image components the tabs use.
"""
from __future__ import annotations

import functools
import io
import json
import pathlib
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest
from PIL import Image

from engine import EngineError
from tests.test_app_client import DEMO

KONTEXT_DEMO = "FLUX.1-Kontext-dev-random-demo"
W, H = 96, 64
ROOT = pathlib.Path(__file__).resolve().parent.parent
BAD_UPLOAD_WORDS = ("Could not preprocess", "Unexpected error", "Traceback")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@functools.lru_cache(maxsize=None)
def png_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A valid 1-bit grey PNG of w x h black pixels: rows of zeros compress about 1000:1 (30000² is ~110 KB and
    would decode to 900 MB), written row block by row block so making it costs no memory."""
    row = b"\x00" * (1 + (w + 7) // 8)
    z, step = zlib.compressobj(9), 500
    body = b"".join(z.compress(row * min(step, h - y)) for y in range(0, h, step)) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _png(size=(W, H), box=(0, 0, 40, 64)) -> bytes:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    buf = io.BytesIO()
    m.save(buf, format="PNG")
    return buf.getvalue()


def layout_zip(path, members: dict, width=W, height=H, prompts=("a cat", "a dog")):
    """A layout zip in DiffSynth's EliGen folder format; ``members`` (name -> bytes) replace or add files."""
    data = {"global_prompt": "a room", "mask_prompts": list(prompts), "seed": 1, "width": width, "height": height}
    files = {"prompts.json": json.dumps(data).encode(), "0.png": _png(), "1.png": _png(box=(50, 0, 96, 64))}
    files.update(members)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


def _zero_member_zip(path, name: str, size: int):
    """A layout whose member ``name`` unpacks to ``size`` zero bytes (written in chunks: the test spends no memory)."""
    layout_zip(path, {})
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as z, z.open(name, "w", force_zip64=True) as f:
        for _ in range(size >> 20):
            f.write(bytes(1 << 20))
    return path


# ------------------------------------------------------------------------------------------------ layout zips
PEAK_SCRIPT = """
import json, resource, sys
from studio import eligen_layout
from engine.errors import EngineError
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # MB, the process's highest
eligen_layout.load_layout_file(sys.argv[1])                                         # warm: a good layout
base, out = peak(), {}
for path in sys.argv[2:]:
    try:
        eligen_layout.load_layout_file(path)
        out[path] = "accepted"
    except EngineError as exc:
        out[path] = str(exc)
print(json.dumps({"messages": out, "growth_mb": peak() - base}))
"""


def test_hostile_layout_zips_are_refused_before_memory_is_spent(tmp_path):
    """Each is refused with a message naming the problem, and checking all of them raises the process's peak memory
    by less than 50 MB (before the checks, the 20000x20000 layout alone grew it by 1.1 GB)."""
    good = layout_zip(tmp_path / "good.zip", {})
    cases = {
        "huge size": (layout_zip(tmp_path / "huge.zip", {}, width=20000, height=20000), ["20000", "64..4096"]),
        "bomb member": (layout_zip(tmp_path / "bomb.zip", {"0.png": png_bomb()}),
                        ["0.png", "30000×30000", "decompression bomb"]),
        "large member": (layout_zip(tmp_path / "large.zip", {"1.png": png_bomb(8192, 8192)}),
                         ["1.png", "8192×8192", "too large"]),
        "unpacks huge": (_zero_member_zip(tmp_path / "zeros.zip", "notes.txt", 200 << 20),
                         ["notes.txt", "200 MB", "no EliGen layout"]),
    }
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(good), *[str(p) for p, _ in cases.values()]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (path, words) in cases.items():
        message = result["messages"][str(path)]
        assert all(w in message for w in words), (name, message)
    assert result["growth_mb"] < 50, result


def test_layout_zip_never_writes_outside_and_a_good_layout_loads(tmp_path):
    from studio import eligen_layout
    path = layout_zip(tmp_path / "slip.zip", {"../escaped.png": _png(), "/abs-escaped.png": _png(),
                                              "sub/../../escaped2.png": _png()})
    data = eligen_layout.load_layout_file(path)
    assert (data["width"], data["height"], data["prompts"]) == (W, H, ["a cat", "a dog"])
    assert [m.size for m in data["masks"]] == [(W, H), (W, H)] and data["masks"][0].getpixel((10, 10)) == 255
    assert not list(tmp_path.parent.rglob("*escaped*"))
    bad = layout_zip(tmp_path / "bad-json.zip", {"prompts.json": b"[1, 2]"})
    with pytest.raises(EngineError, match="not an EliGen layout"):
        eligen_layout.load_layout_file(bad)


# ------------------------------------------------------------------------------------------------ masks
@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    from tests.helpers import linked_models
    root = tmp_path_factory.mktemp("bad-input")
    return Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs",
                  allow_dirs=[tmp_path_factory.getbasetemp()])


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    path = tmp_path_factory.mktemp("bombs") / "innocent.png"
    path.write_bytes(png_bomb())
    return path


def _eligen_request(mask, **extra):
    return {"variant": DEMO, "prompt": "a room", "width": W, "height": H, "num_inference_steps": 1, "seed": 1,
            "eligen_entity_prompts": ["a cat"], "eligen_entity_masks": [str(mask)], **extra}


def test_a_bomb_entity_mask_is_refused_by_name_through_the_engine(engine, bomb):
    with pytest.raises(EngineError) as caught:
        engine.generate(_eligen_request(bomb))
    message = str(caught.value)
    assert "innocent.png" in message and "decompression bomb" in message and "resize it first" in message


def test_a_bomb_among_training_uploads_is_skipped_by_name(engine, bomb, tmp_path):
    good = tmp_path / "dog.png"
    Image.new("RGB", (80, 64), (120, 90, 60)).save(good)
    made = engine.training.prepare_dataset([good, bomb])
    assert [row[0] for row in made["rows"]] == ["dog.png"]
    note = " ".join(made["notes"])
    assert "innocent.png skipped" in note and "30000" in note


def test_every_mask_reader_checks_the_header_first(bomb, tmp_path):
    from studio import eligen_layout
    from engine import masks
    from engine.eligen.layout import load_layout
    text, cut = tmp_path / "notes.png", tmp_path / "cut.png"
    text.write_text("not a picture\n" * 20)
    Image.effect_noise((W, H), 60).convert("RGBA").save(cut)
    cut.write_bytes(cut.read_bytes()[:600])            # the header reads, the pixels do not
    folder = tmp_path / "layout"
    folder.mkdir()
    (folder / "prompts.json").write_text(json.dumps({"global_prompt": "", "mask_prompts": ["a cat"]}))
    (folder / "0.png").write_bytes(bomb.read_bytes())
    readers = {"mask_from_file": lambda p: masks.mask_from_file(str(p), (W, H)),
               "fit": lambda p: eligen_layout.fit(str(p), (W, H)),
               "masks_from_layer": lambda p: eligen_layout.masks_from_layer(str(p), (W, H), 2)}
    for name, read in readers.items():
        with pytest.raises(EngineError, match="decompression bomb"):
            read(bomb)
        with pytest.raises(EngineError, match="not an image"):
            read(text)
        with pytest.raises(EngineError, match="damaged or truncated"):
            read(cut)
    with pytest.raises(EngineError, match="0.png of the EliGen layout.*decompression bomb"):
        load_layout(folder)


# ------------------------------------------------------------------------------------------------ LoRA names
@pytest.mark.parametrize("name, problem", [
    ("style\x00.safetensors", "null byte"),
    ("x" * 5000 + ".safetensors", "too long"),
    ("a/" + "y" * 300, "too long"),
    ("style\x1b[31m.safetensors", "control characters"),
])
def test_bad_lora_names_are_named_problems(engine, name, problem):
    from engine.lora import library
    with pytest.raises(EngineError, match=problem):
        library.normalize([{"name": name, "weight": 1.0}])
    with pytest.raises(EngineError, match=problem):
        library.resolve(engine.models_dir, name)
    with pytest.raises(EngineError, match=problem):
        engine.generate({"variant": DEMO, "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1,
                         "loras": [[name, 1.0]]})
    # The existing refusals stay: a path out of the LoRA folder.
    with pytest.raises(EngineError, match="outside the LoRA folder"):
        library.resolve(engine.models_dir, "../../etc/passwd")


# ------------------------------------------------------------------------------------------------ uploads


@pytest.fixture(scope="session")
def client(studio, tmp_path_factory):
    from gradio_client import Client
    return Client(studio.url, verbose=False, download_files=str(tmp_path_factory.mktemp("bad-input-downloads")))


def _edit(client, image, seed=3):
    from gradio_client import handle_file
    return client.predict(handle_file(str(image)), KONTEXT_DEMO, "make it red", "", 1, 2.5, 1.0, seed, 0.06, 0, 0, 1,
                          api_name="/edit")


def test_bad_uploads_to_edit_get_the_studios_message(client, tmp_path):
    from gradio_client.exceptions import AppError
    empty, text, huge = tmp_path / "empty.png", tmp_path / "letter.png", tmp_path / "huge.png"
    empty.write_bytes(b"")
    text.write_text("Dear studio,\nthis is not a picture.\n" * 5)
    huge.write_bytes(png_bomb())
    expected = {empty: "empty.png is an empty file",
                text: "letter.png is not an image (it looks like text). Use a PNG, JPEG or WebP file.",
                huge: "huge.png: 30000×30000 is too large: at most 40 MP / 8192 px a side; resize it first"}
    for path, words in expected.items():
        with pytest.raises(AppError) as caught:
            _edit(client, path)
        message = str(caught.value)
        assert message.startswith("Image to edit: ") and words in message, message
        assert not any(w in message for w in BAD_UPLOAD_WORDS), message
    good = tmp_path / "good.png"
    Image.new("RGB", (160, 96), (200, 40, 40)).save(good)
    images, _, seed = _edit(client, good, seed=5)          # the studio still works
    assert seed == 5 and len(images) == 1


def test_bad_uploads_in_the_browser_show_the_message(browser, studio, tmp_path):
    """In the page, a refused upload is named in a note under its field (uploads.NotedImage), the field is emptied,
    and no output of the field's other events shows a bare "Error" badge."""
    from tests.browser import studio_page
    text = tmp_path / "letter.png"
    text.write_text("Dear studio,\nthis is not a picture.\n")
    with studio_page(browser, studio.url, timeout_ms=60_000) as page:
        page.locator("#gen-info-accordion button").first.click()
        page.locator("#info-image input[type='file']").set_input_files(str(text))
        page.locator("#info-image-note", has_text="Drop a PNG: letter.png is not an image").first.wait_for()
        page.get_by_role("tab", name="Edit").click()
        page.locator("#edit-input input[type='file']").set_input_files(str(text))
        note = page.locator("#edit-input-note", has_text="Image to edit: letter.png is not an image (it looks like")
        note.first.wait_for()
        assert not any(w in note.first.inner_text() for w in BAD_UPLOAD_WORDS)


def test_every_image_input_of_the_studio_checks_uploads(studio):
    import gradio as gr
    from app import uploads
    inputs = [b for b in studio.demo.blocks.values()
              if isinstance(b, (gr.Image, gr.ImageEditor)) and b.interactive is not False]
    labels = {str(b.label) for b in inputs}
    assert {"Image to edit (upload or paste)", "Image and mask: paint the area to change",
            "Drop a PNG (made here, in A1111 or in Forge)", "Input image (becomes the canvas)"} <= labels
    unchecked = [b.label for b in inputs if not isinstance(b, (uploads.Image, uploads.ImageEditor))]
    assert not unchecked, unchecked
    assert {b.get_block_name() for b in inputs} == {"image", "imageeditor"}     # drawn as Gradio's own


def _refusal(component, payload) -> str:
    import gradio as gr
    with pytest.raises(gr.Error) as caught:
        component.preprocess(payload)
    return caught.value.message


def test_the_editor_checks_background_layers_and_blobs(tmp_path):
    from gradio.components.image_editor import EditorData, EditorDataBlobs
    from gradio.data_classes import FileData
    from app import uploads
    editor = uploads.ImageEditor(label="Image and mask: paint the area to change", type="filepath", format="png")
    text, bomb_file, good = tmp_path / "scan.png", tmp_path / "layer.png", tmp_path / "ok.png"
    text.write_text("hello")
    bomb_file.write_bytes(png_bomb())
    Image.new("RGB", (80, 64), "white").save(good)
    message = _refusal(editor, EditorData(background=FileData(path=str(text), orig_name="scan.png")))
    assert message == "Image and mask: scan.png is not an image (it looks like text). Use a PNG, JPEG or WebP file."
    assert "decompression bomb" in _refusal(editor, EditorData(layers=[FileData(path=str(bomb_file))]))
    editor.blob_storage["paste"] = EditorDataBlobs(background=b"", layers=[], composite=None)
    assert "is an empty file" in _refusal(editor, EditorData(id="paste"))
    value = editor.preprocess(EditorData(background=FileData(path=str(good)), composite=FileData(path=str(good))))
    assert value["background"] and value["composite"]
