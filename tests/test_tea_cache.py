"""TeaCache (issue 19, item 4): ``pipe(tea_cache_l1_thresh=...)`` against DiffSynth-Studio's rule written out.

The seed's ``TeaCache.check`` (diffsynth/pipelines/flux_image.py), restated here from its source: the first double
block's modulated image input ``norm1_a(x, temb)``; at every step but the first and the last, the relative L1 change
against the previous step's goes through ``np.poly1d(coefficients)`` into an accumulated distance; under the threshold
the blocks are skipped and the stored residual (blocks' output - input) is added; otherwise they run and the distance
restarts at 0. The run's own first-block inputs are captured (a forward pre-hook runs on skipped passes too) and the
rule is replayed on them: the steps it skips must be the ones the pipeline reports.
"""
import numpy as np
import pytest
import torch

from engine.acceleration import SettingError
from tests.helpers import demo_pipeline

KW = dict(prompt="a red boat", height=64, width=64, seed=3, num_inference_steps=12, progress_bar_cmd=lambda x: x)
SEED_COEFFICIENTS = [4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01]


def arr(image):
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def pipe(demo_dir):
    return demo_pipeline(demo_dir)


@pytest.fixture(scope="module")
def ref(pipe):
    return arr(pipe(**KW))


def seed_skipped_steps(block0, inputs, threshold, num_inference_steps) -> list:
    """DiffSynth-Studio's TeaCache.check, step by step, on the captured (hidden_states, temb) of each pass."""
    rescale_func = np.poly1d(SEED_COEFFICIENTS)
    accumulated, previous, skipped = 0, None, []
    for step, (hidden, temb) in enumerate(inputs):
        modulated = block0.norm1(hidden, emb=temb)[0]
        if step == 0 or step == num_inference_steps - 1:
            should_calc, accumulated = True, 0
        else:
            accumulated += rescale_func(((modulated - previous).abs().mean() / previous.abs().mean()).cpu().item())
            if accumulated < threshold:
                should_calc = False
            else:
                should_calc, accumulated = True, 0
        previous = modulated
        if not should_calc:
            skipped.append(step)
    return skipped


def capture(module, store):
    def hook(m, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        store.append((hidden.clone(), kwargs["temb"].clone() if "temb" in kwargs else args[1].clone()))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_skips_the_seeds_steps_and_reuses_the_residual(pipe, ref, threshold):
    dit = pipe.dit
    firsts, finals = [], []           # block 0's (input, temb); the final LayerNorm's input, per pass
    handles = [capture(dit.transformer_blocks[0], firsts),
               dit.norm_out.norm.register_forward_pre_hook(lambda m, args: finals.append(args[0].clone()))]
    try:
        out = arr(pipe(**KW, tea_cache_l1_thresh=threshold))
    finally:
        for h in handles:
            h.remove()
    notes = pipe.acceleration.last_call
    steps = KW["num_inference_steps"]
    assert len(firsts) == len(finals) == steps and notes["passes"] == steps
    with torch.no_grad():
        expected = seed_skipped_steps(dit.transformer_blocks[0], firsts, threshold, steps)
    assert 0 < len(expected) < steps - 2, expected          # a pattern with skips and computed middle steps
    assert notes["skipped_steps"] == {"cond": expected} and notes["skipped"] == len(expected)
    assert notes["cache"] == "tea_cache" and notes["threshold"] == threshold
    # A skipped pass's final norm reads its own block input + the last computed pass's residual.
    last = None
    for step, ((h, _), final) in enumerate(zip(firsts, finals)):
        if step in expected:
            torch.testing.assert_close(final, h + last, rtol=0, atol=1e-6)
        else:
            last = final - h
    diff = np.abs(out - ref)
    assert 0 < diff.mean() and diff.max() <= 16, (diff.mean(), diff.max())   # measured: max 1-3 on this model


def test_off_by_default_bit_equal_and_hooks_leave_with_the_call(pipe, ref):
    assert np.array_equal(arr(pipe(**KW, tea_cache_l1_thresh=None)), ref)
    assert pipe.acceleration.last_call == {"threshold": 0.0, "passes": 0, "skipped": 0}   # nothing hooked
    assert np.array_equal(arr(pipe(**KW, tea_cache_l1_thresh=0)), ref)     # the seed's 0 never skips (poly > 0.18)
    first = arr(pipe(**KW, tea_cache_l1_thresh=0.6))
    notes = pipe.acceleration.last_call
    hooked = [m for m in pipe.dit.modules() if getattr(m, "_diffusers_hook", None) is not None
              and any(name.startswith("tea_cache") for name in m._diffusers_hook.hooks)]
    assert not hooked                                           # the hooks left with the call
    assert np.array_equal(arr(pipe(**KW)), ref)                 # and the next plain call is the reference
    # A second call starts fresh: same skips, same image (a leftover residual would change its first steps).
    assert np.array_equal(arr(pipe(**KW, tea_cache_l1_thresh=0.6)), first) and pipe.acceleration.last_call == notes


def test_cfg_passes_keep_their_own_state(pipe):
    pipe(**KW, cfg_scale=3.0, negative_prompt="blurry green", tea_cache_l1_thresh=0.6)
    notes = pipe.acceleration.last_call
    steps = KW["num_inference_steps"]
    assert notes["passes"] == 2 * steps and set(notes["skipped_steps"]) == {"cond", "uncond"}
    for skipped in notes["skipped_steps"].values():             # each pass sequence: first and last step computed
        assert skipped and 0 not in skipped and steps - 1 not in skipped


def test_bad_settings_are_refused_with_the_fix(pipe):
    for bad in (-0.1, float("nan"), "fast", True):
        with pytest.raises(SettingError, match="tea_cache_l1_thresh"):
            pipe(**KW, tea_cache_l1_thresh=bad)
    with pytest.raises(SettingError, match="One step cache per call"):
        pipe(**KW, tea_cache_l1_thresh=0.3, step_cache=0.1)
    from engine.acceleration.tea_cache import TeaCache
    with pytest.raises(SettingError, match="works with FLUX.1 transformers.*step_cache"):
        TeaCache(torch.nn.Linear(2, 2), 0.3, 4).__enter__()


def test_a_skipped_pass_ignores_what_the_transformer_adds_between_blocks(pipe):
    """ControlNet residuals are added between blocks inside the transformer; the seed's skipped pass reuses the
    residual (which already holds them) and adds nothing more: a skipped pass's output must not depend on them."""
    from engine.acceleration.tea_cache import TeaCache
    dit = pipe.dit
    torch.manual_seed(0)
    n_img, n_txt, width = 16, 8, dit.config.num_attention_heads * dit.config.attention_head_dim
    args = dict(encoder_hidden_states=torch.randn(1, n_txt, dit.config.joint_attention_dim),
                pooled_projections=torch.randn(1, dit.config.pooled_projection_dim), guidance=torch.full((1,), 3.5),
                img_ids=torch.zeros(n_img, 3), txt_ids=torch.zeros(n_txt, 3), return_dict=False)
    samples = [torch.randn(1, n_img, width) for _ in dit.transformer_blocks]
    first = torch.randn(1, n_img, dit.config.in_channels)
    latents = [first, first + 0.02 * torch.randn_like(first)]       # a small change: the middle step is skipped
    outputs = []
    with torch.no_grad():
        for second_samples in (samples, None):
            with TeaCache(dit, 100.0, 3) as cache:     # 100: every middle step is skipped
                dit(hidden_states=latents[0], timestep=torch.full((1,), 1.0), controlnet_block_samples=samples, **args)
                outputs.append(dit(hidden_states=latents[1], timestep=torch.full((1,), 0.9),
                                   controlnet_block_samples=second_samples, **args)[0])
            assert cache.stats()["skipped_steps"] == {"inference": [1]}
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
