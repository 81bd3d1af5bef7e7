"""Live previews: the pipeline's preview hook (engine.pipeline), the pictures made from it (engine.preview: the
fitted latent projection, TAEF1), the studio passing them on (studio.engine.generate(preview=...)), and the Generate
tab showing one while a job runs."""
import json
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine import pipeline as pipeline_mod
from engine import preview as P
from tests.helpers import demo_pipeline


@pytest.fixture(scope="module")
def pipe(demo_dir):
    return demo_pipeline(demo_dir)


def run(pipe, **kwargs):
    return pipe(prompt="a red cube", width=96, height=64, num_inference_steps=6, seed=3,
                progress_bar_cmd=lambda it: it, **kwargs)


# ----------------------------------------------------------------------------------------------- the engine's hook
def test_hook_gets_each_step_but_the_last_and_changes_nothing(pipe):
    calls = []
    with_preview = run(pipe, preview_callback=lambda done, total, x0: calls.append((done, total, x0.clone())))
    plain = run(pipe)
    assert [(d, t) for d, t, _ in calls] == [(k, 6) for k in range(1, 6)]
    assert all(x0.shape == (1, 16, 8, 12) and x0.dtype == torch.float32 for *_, x0 in calls)
    assert not torch.equal(calls[0][2], calls[-1][2])            # the estimate moves as the image denoises
    assert np.array_equal(np.asarray(with_preview), np.asarray(plain))


def test_clean_estimate_is_where_the_step_points(pipe, monkeypatch):
    """x0 = x - sigma v: after the last step (sigma 0) the latents are exactly the last estimate."""
    seen = []
    step = pipeline_mod.Denoiser.step

    def recording(self, tokens, i):
        out = step(self, tokens, i)
        seen.append((out, self.clean_estimate(), float(self.ctx.sigmas[i + 1])))
        return out
    monkeypatch.setattr(pipeline_mod.Denoiser, "step", recording)
    run(pipe)
    final, estimate, sigma_next = seen[-1]
    assert sigma_next == 0.0 and torch.allclose(final, estimate, atol=1e-6)
    out, estimate, _ = seen[0]
    assert not torch.allclose(out, estimate)     # earlier steps: still noisy, the estimate is not the latents


def test_cancel_from_step_callback_stops_before_a_preview(pipe):
    previews = []

    def cancel(done, total):
        if done == 2:
            raise KeyboardInterrupt("cancelled")
    with pytest.raises(KeyboardInterrupt):
        run(pipe, step_callback=cancel, preview_callback=lambda d, t, x0: previews.append(d))
    assert previews == [1]


# ---------------------------------------------------------------------------------------------- the projection
def test_fit_recovers_a_linear_decoder():
    """A VAE whose decoder is linear per cell: the fit finds its matrix and bias."""
    g = torch.Generator().manual_seed(0)
    encoder = torch.randn(16, 3, generator=g)
    true_w, true_b = torch.randn(16, 3, generator=g) * 0.2, torch.tensor([0.1, -0.2, 0.05])

    def encode(images):
        cells = F.avg_pool2d(images, 8)
        return torch.einsum("nrhw,cr->nchw", cells, encoder) + 0.1 * torch.randn(
            cells.shape[0], 16, *cells.shape[-2:], generator=g)

    def decode(z):
        rgb = torch.einsum("nchw,cr->nrhw", z, true_w) + true_b[None, :, None, None]
        return F.interpolate(rgb, scale_factor=8, mode="nearest")
    fitted = P.fit_projection(encode, decode)
    assert torch.allclose(fitted.weight, true_w, atol=1e-4) and torch.allclose(fitted.bias, true_b, atol=1e-4)


def test_projection_of_the_loaded_vae_gives_a_small_picture_in_range(pipe):
    kind, decode = P.PreviewCache().decoder(pipe, models_dir=None)
    assert kind == "latent projection"
    latents = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(1)) * 3
    rgb = decode(latents)
    assert rgb.shape == (1, 3, 8, 12) and rgb.min() >= -1 and rgb.max() <= 1
    image = P.to_image(rgb, long_side=96)
    assert image.size == (96, 64) and image.mode == "RGB"
    # Fitted on the VAE itself: it follows what the VAE decodes (per cell) better than a flat grey would.
    z = pipe.encode_image(Image.new("RGB", (96, 64), (200, 40, 40)))
    decoded = torch.from_numpy(np.asarray(pipe.decode_latents(z), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    target = F.avg_pool2d(decoded[None], 8)
    error = (decode(z) - target).pow(2).mean()
    assert error < target.pow(2).mean()


def test_projection_is_fitted_once_per_vae(pipe, monkeypatch):
    cache, fits = P.PreviewCache(), []
    original = P.pipeline_projection
    monkeypatch.setattr(P, "pipeline_projection", lambda p: fits.append(1) or original(p))
    first = cache.decoder(pipe)[1]
    assert cache.decoder(pipe)[1] is first and len(fits) == 1


def test_taef1_is_used_when_its_file_is_in_the_models_folder(pipe, tmp_path):
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file
    folder = tmp_path / P.TAEF1_ID
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    tiny = AutoencoderTiny(latent_channels=16)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(folder / P.TAEF1_FILE))
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "latent_channels": 16}))
    kind, decode = P.PreviewCache().decoder(pipe, models_dir=tmp_path)
    assert kind == "TAEF1"
    latents = torch.randn(1, 16, 8, 12)
    rgb = decode(latents)
    assert rgb.shape == (1, 3, 64, 96) and rgb.min() >= -1 and rgb.max() <= 1
    with torch.no_grad():
        expected = tiny.decode(latents).sample.clamp(-1, 1)
    assert torch.allclose(rgb, expected, atol=1e-5)       # its own weights, read from the file


# -------------------------------------------------------------------------------------------------- the stream
def test_stream_every_few_steps_and_at_most_three_a_second():
    assert [P.preview_every(n) for n in (1, 6, 20, 30, 50, 100)] == [2, 2, 2, 3, 4, 4]
    now = [0.0]
    sent = []
    stream = P.PreviewStream(lambda z: torch.zeros(1, 3, *z.shape[-2:]), lambda im, d, t: sent.append((d, im.size)),
                             long_side=64, clock=lambda: now[0])
    z = torch.zeros(1, 16, 8, 12)
    for done in range(1, 12):
        now[0] += 0.1 if done < 6 else 1.0        # fast steps first: the interval limits them
        stream(done, 12, z)
    assert [d for d, _ in sent] == [2, 6, 8, 10]
    assert sent[0][1] == (64, 43)


# ------------------------------------------------------------------------------------------------- the studio
def test_studio_job_sends_previews_and_saves_the_same_image(tmp_path):
    from studio.engine import Engine
    engine = Engine(models_dir=tmp_path / "models", demo=True, outputs_dir=tmp_path / "outputs")
    request = {"prompt": "a red cube", "width": 96, "height": 64, "num_inference_steps": 6, "seed": 5}
    sent = []
    shown = engine.generate(request, preview=sent.append)
    plain = engine.generate(request)
    assert len(sent) >= 1
    for path in sent:
        assert pathlib.Path(path).parent.parent.name == ".work"       # scratch files, never results
        with Image.open(path) as im:
            assert im.size == (96, 64)
    assert np.array_equal(np.asarray(Image.open(shown[0]["path"])), np.asarray(Image.open(plain[0]["path"])))


# --------------------------------------------------------------------------------------------- the web app's side
def test_stream_job_yields_previews_then_the_results():
    import threading

    import gradio as gr

    from app.jobs import engine_job, stream_job
    from engine.errors import EngineError
    release = threading.Event()

    class FakeEngine:
        def generate(self, request, progress=None, job=None, preview=None):
            preview = preview or (lambda path: None)
            preview("first.jpg")
            release.wait(10)                  # the first preview is shown while the job still runs
            preview("second.jpg")
            preview("third.jpg")
            if request.get("fail"):
                raise EngineError("the model is missing")
            return []

    items = stream_job(FakeEngine(), {}, lambda *a, **k: None, title="Could not generate")
    first = next(items)
    assert first[4] == "first.jpg" and all(isinstance(x, dict) for x in first[:4])   # gr.update(): unchanged
    release.set()
    rest = list(items)
    assert rest[-1] == ([], "", None, [], None)                  # the results, and no preview: it is hidden
    # Previews Gradio had no time to show are skipped for the newest (none at all once the job has ended).
    assert {item[4] for item in rest[:-1]} <= {"third.jpg"}
    with pytest.raises(gr.Error, match="the model is missing"):
        list(stream_job(FakeEngine(), {"fail": True}, lambda *a, **k: None, title="Could not generate"))
    # Without previews: one item, the results.
    assert list(stream_job(FakeEngine(), {}, lambda *a, **k: None, "t", previews=False)) == [([], "", None, [], None)]

    def handler(a, b=1, progress=gr.Progress()):
        """Doc."""
        yield a
    import inspect
    wrapped = engine_job(handler)
    assert inspect.isasyncgenfunction(wrapped) and wrapped.__doc__ == "Doc."
    assert inspect.signature(wrapped) == inspect.signature(handler)


# ---------------------------------------------------------------------------------------------------- the browser


def watch_previews(page, box: str) -> None:
    """Record every picture the preview box ``#<box>`` shows (a demo job is quick: it may show one briefly)."""
    page.evaluate("""(box) => { window.previewsSeen = []; new MutationObserver(() => {
        const img = document.querySelector('#' + box + ' img');
        if (img && img.src && !window.previewsSeen.includes(img.src)) window.previewsSeen.push(img.src); })
        .observe(document.body, {subtree: true, childList: true, attributes: true}); }""", box)


def test_browser_shows_a_preview_while_a_job_runs(browser, studio, tmp_path_factory):
    from tests.browser import set_number, studio_page, wait_for_job
    with studio_page(browser, studio.url, 60_000) as page:
        watch_previews(page, "gen-preview")
        page.locator("#gen-prompt textarea").fill("a preview test")
        for elem_id, value in (("gen-width", 256), ("gen-height", 256), ("gen-steps", 6)):
            set_number(page, elem_id, value)
        page.locator("#gen-generate").click()
        wait_for_job(page, "window.previewsSeen.length >= 1", studio, button="#gen-generate")
        page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('a preview test')")
        page.wait_for_selector("#gen-preview", state="hidden")         # the job ended: the result replaces it
        assert all("/.work/" in src or "preview-" in src for src in page.evaluate("window.previewsSeen"))
        # Turned off, a job shows none.
        page.evaluate("window.previewsSeen = []")
        page.locator("#gen-live-preview input").uncheck()
        page.locator("#gen-prompt textarea").fill("no preview")
        page.locator("#gen-generate").click()
        page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('no preview')")
        assert page.evaluate("window.previewsSeen") == []


def test_browser_edit_tab_shows_previews_too(browser, studio, tmp_path_factory):
    from tests.browser import set_number, studio_page
    photo = tmp_path_factory.mktemp("preview-edit") / "photo.png"
    Image.new("RGB", (256, 192), (40, 90, 200)).save(photo)
    with studio_page(browser, studio.url, 60_000) as page:
        page.get_by_role("tab", name="Edit").click()
        page.wait_for_selector("#edit-generate", state="visible")
        watch_previews(page, "edit-preview")
        page.locator("#edit-input input[type=file]").set_input_files(str(photo))
        page.wait_for_function("document.querySelector('#edit-size-line').innerText.includes('Output:')")
        page.locator("#edit-prompt textarea").fill("make it red")
        set_number(page, "edit-steps", 6)
        page.locator("#edit-generate").click()
        page.wait_for_function("window.previewsSeen.length >= 1", timeout=60_000)
        page.wait_for_function("document.querySelector('#edit-selected-info textarea').value.includes('make it red')")
        page.wait_for_selector("#edit-preview", state="hidden")
