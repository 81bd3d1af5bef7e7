"""Faster compute (issue 17, item 3): ``engine.acceleration`` on the CPU with tiny models.

Regional compile (forced with the "eager" backend: dynamo traces, guards and caches the blocks without generating
code; inductor on a CPU takes minutes), the attention backend through diffusers' dispatcher, fp8 compute (off on a
CPU, with its note), the first-block step cache (per-call threshold, CFG's passes apart, state reset between calls),
FLUX.2's options and prompt cache, and the studio's settings in the recipe and back.

The random demo transformers' first-block residual changes by 40-120% from step to step (their timestep embedding
reads every frequency of t, and nothing made them smooth), so no threshold a person would use skips anything;
``smooth_time`` keeps only the lowest frequencies of t, as trained models behave, and the usual thresholds skip.
"""
import numpy as np
import pytest
import torch

from engine import EngineError
from engine.acceleration import AccelerationSettings, SettingError
from tests.helpers import demo_pipeline

KW = dict(prompt="a red boat", height=64, width=64, seed=3, num_inference_steps=12, progress_bar_cmd=lambda x: x)
CFG = dict(cfg_scale=3.0, negative_prompt="blurry green")


def arr(image):
    return np.asarray(image, dtype=np.float32)


def smooth_time(dit, keep: float = 0.25):
    """Zero the timestep embedder's inputs but the lowest ``keep`` of the frequencies (cos and sin halves)."""
    for name, p in dit.named_parameters():
        if name.endswith("timestep_embedder.linear_1.weight"):
            with torch.no_grad():
                half = p.shape[1] // 2
                kept = int(half * keep)
                p[:, :half - kept] = 0
                p[:, half:2 * half - kept] = 0


@pytest.fixture(scope="module")
def pipe(demo_dir):
    pipe = demo_pipeline(demo_dir)
    smooth_time(pipe.dit)
    return pipe


@pytest.fixture(scope="module")
def ref(pipe):
    return arr(pipe(**KW))


@pytest.fixture(scope="module")
def ref_cfg(pipe):
    return arr(pipe(**KW, **CFG))


def test_settings_are_checked_by_name():
    s = AccelerationSettings()
    assert s.is_default() and s.changed(compile=None).is_default()
    assert s.changed(compile="eager", attention_backend="SDPA", step_cache=0.1).as_dict() == {
        "compile": "eager", "attention_backend": "sdpa", "fp8_compute": False, "step_cache": 0.1}
    for bad, match in ((dict(compile="turbo"), "compile must be"), (dict(attention_backend="xformers2"),
                       "Unknown attention backend 'xformers2'.*auto, sdpa, flash, cudnn, efficient"),
                       (dict(step_cache=-0.1), "step_cache"), (dict(step_cache=float("nan")), "step_cache"),
                       (dict(fp8_compute="yes please"), "fp8_compute"), (dict(speed=2), "Unknown speed settings")):
        with pytest.raises(SettingError, match=match):
            s.changed(**bad)
    assert issubclass(SettingError, EngineError)     # the studio shows the message as it is


def test_attention_backends_sdpa_equals_default_and_unavailable_is_refused(pipe, ref):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    seen = []
    handle = pipe.dit.register_forward_pre_hook(lambda m, a: seen.append(_AttentionBackendRegistry._active_backend))
    try:
        for choice, backend in (("sdpa", AttentionBackendName.NATIVE), ("flash", AttentionBackendName._NATIVE_FLASH)):
            pipe.set_acceleration(attention_backend=choice)
            seen.clear()
            assert np.array_equal(arr(pipe(**KW)), ref), choice    # the same SDPA math on this CPU
            assert set(seen) == {backend}                          # ...and the dispatcher really ran that kernel
        with pytest.raises(EngineError, match=r"'cudnn' is not available on this machine \(cpu, float32\); it has: "
                                              r"auto, sdpa, flash"):
            pipe.set_acceleration(attention_backend="cudnn")
        assert pipe.acceleration.settings.attention_backend == "flash"   # a refused change changes nothing
    finally:
        handle.remove()
        pipe.set_acceleration(attention_backend="auto")
    assert _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE   # nothing global left behind


def test_compile_is_off_on_cpu_unless_forced_and_gives_the_same_image(pipe, ref):
    from engine.acceleration.compile import repeated_blocks
    blocks = repeated_blocks(pipe.dit)
    assert len(blocks) == 4                         # 2 double + 2 single blocks, each compiled on its own
    notes = pipe.set_acceleration(compile=True)
    assert "off on the CPU" in notes[0] and all(b._compiled_call_impl is None for b in blocks)
    try:
        pipe.set_acceleration(compile="eager")
        assert all(b._compiled_call_impl is not None for b in blocks)
        calls = []
        handle = blocks[0].register_forward_hook(lambda *a: calls.append(1))
        out = arr(pipe(**KW))
        handle.remove()
        assert np.abs(out - ref).max() <= 1 and calls    # measured: identical
        compiled = [b._compiled_call_impl for b in blocks]
        pipe.set_acceleration(compile=False)
        assert all(b._compiled_call_impl is None for b in blocks)
        assert np.array_equal(arr(pipe(**KW)), ref)
        pipe.set_acceleration(compile="eager")          # back on: the cached compiled blocks, not a recompile
        assert [b._compiled_call_impl for b in blocks] == compiled
    finally:
        pipe.set_acceleration(compile=False)


def test_step_cache_off_is_identical_on_skips_and_resets_between_calls(pipe, ref):
    assert np.array_equal(arr(pipe(**KW, step_cache=0.0)), ref)
    assert pipe.acceleration.last_call == {"threshold": 0.0, "passes": 0, "skipped": 0}   # nothing hooked
    other_seed = np.abs(arr(pipe(**dict(KW, seed=4))) - ref).mean()
    first = arr(pipe(**KW, step_cache=0.1))
    stats = pipe.acceleration.last_call
    assert stats["passes"] == 12 and stats["skipped"] >= 3, stats
    diff = np.abs(first - ref)
    assert 0 < diff.mean() < 0.02 * other_seed and diff.max() <= 8, (diff.mean(), diff.max(), other_seed)
    # A second call starts fresh: same skips, same image (a leftover residual would change its first steps).
    assert np.array_equal(arr(pipe(**KW, step_cache=0.1)), first) and pipe.acceleration.last_call == stats
    assert not pipe.dit.is_cache_enabled                       # the hooks left with the call
    assert np.array_equal(arr(pipe(**KW)), ref)                # and the next uncached call is the reference
    more = arr(pipe(**KW, step_cache=0.3))                     # a higher threshold skips more
    assert pipe.acceleration.last_call["skipped"] > stats["skipped"] and not np.array_equal(more, first)
    pipe.set_acceleration(step_cache=0.1)                      # the setting is what a call without one uses
    try:
        assert np.array_equal(arr(pipe(**KW)), first)
        assert np.array_equal(arr(pipe(**KW, step_cache=0)), ref)   # a call's own threshold wins
    finally:
        pipe.set_acceleration(step_cache=0.0)


def test_step_cache_keeps_cfg_passes_apart(pipe, ref_cfg, monkeypatch):
    from engine.acceleration import step_cache
    names = []
    real = step_cache.StepCache._count

    def count(self, module, args, output):
        names.append(self._leader.state_manager.context.name)
        return real(self, module, args, output)
    monkeypatch.setattr(step_cache.StepCache, "_count", count)
    out = arr(pipe(**KW, **CFG, step_cache=0.1))
    stats = pipe.acceleration.last_call
    assert names == ["cond", "uncond"] * 12                    # each pass in its own cache context
    assert stats["passes"] == 24 and stats["skipped"] >= 6, stats
    assert np.abs(out - ref_cfg).max() <= 8 and np.abs(out - ref_cfg).mean() < 1.5
    # The same call with both passes in one context (what the contexts prevent) compares each pass with the other
    # prompt's residual: different skips and a different image.
    monkeypatch.setattr(step_cache.StepCache, "pass_context", lambda self, negative=False: self.dit.cache_context("x"))
    mixed = arr(pipe(**KW, **CFG, step_cache=0.1))
    assert pipe.acceleration.last_call["skipped"] != stats["skipped"] or not np.array_equal(mixed, out)


def test_fp8_compute_is_off_on_cpu_with_a_note(pipe, ref):
    from engine.acceleration import fp8_compute
    weights = {n: p.clone() for n, p in pipe.dit.named_parameters()}
    notes = pipe.set_acceleration(fp8_compute=True)
    try:
        assert any("fp8 compute is off" in n and "compute capability 8.9" in n and "CPU" in n for n in notes)
        assert not fp8_compute.is_applied(pipe.dit)
        assert all(type(p) is torch.nn.Parameter and torch.equal(p, weights[n])
                   for n, p in pipe.dit.named_parameters())
        assert np.array_equal(arr(pipe(**KW)), ref)
        # What it would convert on a GPU: the blocks' linear layers, not the embedders or the output projection.
        names = [n for n, _ in fp8_compute.target_layers(pipe.dit)]
        assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
        assert "transformer_blocks.0.attn.to_q" in names and not any("proj_out" == n for n in names)
    finally:
        pipe.set_acceleration(fp8_compute=False)


def test_flux2_step_cache_and_prompt_cache():
    """FLUX.2 takes the same options; its single-stream blocks need the split tail hook (engine.acceleration.
    step_cache.ConcatTailHook). Prompt encodings are cached across calls in the pipeline's prompt_cache."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from engine import Flux2ImagePipeline
    from engine.demo import flux2 as demo
    torch.manual_seed(0)
    cfg = demo.transformer_config()
    dit = Flux2Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])}).eval()
    vae = AutoencoderKLFlux2(**demo.vae_config()).eval()
    demo._randomise(dit)
    demo._randomise(vae)
    smooth_time(dit)

    class Encoder:                       # the text encoder's output, counted (the real one loads in ~10 s)
        calls = 0
        text_encoder = torch.nn.Linear(2, 2)

        def encode(self, prompt, max_length, run_model=None):
            Encoder.calls += 1
            return torch.randn(1, 16, cfg["joint_attention_dim"], generator=torch.Generator().manual_seed(len(prompt)))

    pipe = Flux2ImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.set_models({"dit": dit, "vae": vae})
    pipe._prompt_encoder = Encoder()
    kw = dict(KW, max_sequence_length=16)
    ref = arr(pipe(**kw))
    cached = arr(pipe(**kw, step_cache=0.1))
    stats = pipe.acceleration.last_call
    assert stats["passes"] == 12 and stats["skipped"] >= 3, stats
    assert 0 < np.abs(cached - ref).mean() < 1 and np.abs(cached - ref).max() <= 8
    assert np.array_equal(arr(pipe(**kw)), ref)
    cfg_ref = arr(pipe(**kw, **CFG))
    cfg_cached = arr(pipe(**kw, **CFG, step_cache=0.1))
    assert pipe.acceleration.last_call["skipped"] >= 6 and np.abs(cfg_cached - cfg_ref).max() <= 8
    assert Encoder.calls == 2                      # the prompt and the negative prompt, each encoded once
    shared = Flux2ImagePipeline(device="cpu", torch_dtype=torch.float32)
    shared.set_models({"dit": dit, "vae": vae})
    shared._prompt_encoder, shared.prompt_cache = Encoder(), pipe.prompt_cache     # as the studio shares it
    shared.encode_prompt("a red boat", 16)
    assert Encoder.calls == 2
    with pytest.raises(EngineError, match="not available on this machine"):
        pipe.set_acceleration(attention_backend="efficient")


@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    return Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path_factory.mktemp("outputs"))


def test_studio_settings_reach_the_recipe_and_a_restore_reproduces_them(engine):
    from PIL import Image

    from studio import recipes
    from tabs.settings import speed_notes_md
    request = dict(prompt="a red boat", width=64, height=64, num_inference_steps=12, seed=5)
    plain = engine.generate(request)[0]
    assert "acceleration" not in plain["recipe"]                 # all off: recipes stay as they were
    with pytest.raises(EngineError, match="not available on this machine"):
        engine.models.set_acceleration(attention_backend="cudnn")
    engine.models.set_acceleration(step_cache=0.6, attention_backend="sdpa")   # the demo is not smooth: 0.6
    fast = engine.generate(request)[0]
    assert fast["recipe"]["acceleration"] == {"compile": False, "attention_backend": "sdpa", "fp8_compute": False,
                                              "step_cache": 0.6}
    from app.recipe_text import recipe_text
    assert "Speed: attention sdpa, step cache 0.6" in recipe_text(fast["recipe"])     # what the image info shows
    assert "Speed:" not in recipe_text(plain["recipe"])
    assert engine.models.pipe.acceleration.last_call["skipped"] > 0
    made = np.asarray(Image.open(fast["path"]), dtype=np.int16)
    assert not np.array_equal(made, np.asarray(Image.open(plain["path"]), dtype=np.int16))
    engine.models.set_acceleration(step_cache=0.0, attention_backend="auto")
    restored = engine.read_recipe(fast["path"])
    engine.models.set_acceleration(**recipes.acceleration_of(recipes.read_recipe(fast["path"])))
    again = engine.generate({k: restored[k] for k in request})[0]
    assert np.array_equal(np.asarray(Image.open(again["path"]), dtype=np.int16), made)
    info = engine.models.speed_notes()
    assert info["attention_choices"] == ["auto", "sdpa", "flash"] and info["settings"]["step_cache"] == 0.6
    text = speed_notes_md(info)
    assert "Compile**: Compile is off on the CPU" in text and "fp8 compute is off" in text
    assert "not cudnn, efficient" in text
    engine.models.set_acceleration(step_cache=0.0, attention_backend="auto")


def test_the_first_image_at_a_new_size_says_it_compiles(monkeypatch):
    """The job's progress names the wait while torch compiles (once per size; nothing said when not compiled)."""
    import types

    from engine.acceleration import compile as compiling
    from studio import runner
    said = []
    pipe = types.SimpleNamespace(dit=object())
    runner.say_if_compiling(pipe, (64, 64), lambda done, total, text: said.append(text), 4)
    assert said == []                                              # not compiled: nothing to say
    monkeypatch.setattr(compiling, "compiled_backend", lambda dit: "inductor")
    for size in ((64, 64), (64, 64), (128, 64)):
        runner.say_if_compiling(pipe, size, lambda done, total, text: said.append(text), 4)
    assert len(said) == 2 and "for 64×64 (inductor" in said[0] and "for 128×64" in said[1]
