"""FLUX.1-Fill and Flex.2-preview conditions (engine.conditions.fill / flex) and their random-weight demo files.

Fill: parity with diffusers' FluxFillPipeline on the same tiny random weights, noise and sigmas (fp32), at the
feature level and end to end. Flex.2 has no diffusers pipeline: its features are checked against DiffSynth-Studio's
``FluxImageUnit_Flex`` / ``model_fn_flux_image`` formulas written out below, and the whole sampling loop against
the same loop written out on the pipeline's transformer.
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from engine import latents as lat
from engine import scheduler as sched
from engine.conditions import ConditionContext
from engine.conditions.fill import fill_condition, fill_features
from engine.conditions.flex import flex_condition
from engine.errors import EngineError
from engine.pipeline import FluxImagePipeline
from tests.helpers import as_int16 as _arr, box_mask as _mask, no_bar as _no_bar, smooth_photo as _photo

pytestmark = pytest.mark.filterwarnings("ignore")

H, W = 64, 80               # not square, so a swapped height/width shows
STEPS = 4
PIXEL_BOUND = 1             # uint8 levels
LATENT_BOUND = 1e-4


# ------------------------------------------------------------------------------------------------ tiny models
@pytest.fixture(scope="module")
def fill_modules(demo_tokenizers):
    """A tiny Fill transformer (384 input features, 64 output) and text encoders / VAE from the library classes."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    tok1, tok2 = demo_tokenizers
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok1), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        hidden_act="quick_gelu", eos_token_id=2)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    dit = FluxTransformer2DModel(patch_size=1, in_channels=384, out_channels=64, num_layers=1, num_single_layers=1,
                                 attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 14, 14)).eval()
    with torch.no_grad():                 # diffusers zero-initialises the output projection
        for p in dit.parameters():
            if p.abs().sum() == 0 and p.ndim == 2:
                p.normal_(0, 0.02)
        # The condition features must matter as much as the latents, or parity would not test them.
        dit.x_embedder.weight[:, 64:].mul_(4.0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    return {"dit": dit, "vae": vae, "text_encoder_1": clip, "text_encoder_2": t5}


@pytest.fixture(scope="module")
def fill_pipe(fill_modules, demo_tokenizers):
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.set_models(dict(fill_modules))
    pipe.tokenizer_1, pipe.tokenizer_2 = demo_tokenizers
    return pipe


@pytest.fixture(scope="module")
def reference_fill(fill_modules, demo_tokenizers):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sched.SEED_SHIFT, use_dynamic_shifting=False)
    return FluxFillPipeline(scheduler=scheduler, vae=fill_modules["vae"], text_encoder=fill_modules["text_encoder_1"],
                            tokenizer=demo_tokenizers[0], text_encoder_2=fill_modules["text_encoder_2"],
                            tokenizer_2=demo_tokenizers[1], transformer=fill_modules["dit"])


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers samples the VAE posterior; the seed (and the engine) take its mean. Make diffusers take the mean."""
    import diffusers.pipelines.flux.pipeline_flux_fill as ref_module
    real = ref_module.retrieve_latents
    monkeypatch.setattr(ref_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))


def _ctx(pipe, height=H, width=W, steps=STEPS):
    return ConditionContext(pipe, height, width, torch.device("cpu"), torch.float32, sched.flux_sigmas(steps),
                            lambda im: pipe.encode_image(im))


# ------------------------------------------------------------------------------------------------ FLUX.1-Fill
def test_fill_features_match_diffusers_prepare_mask_latents(fill_pipe, reference_fill, posterior_mean):
    image = _photo(W, H, 1)
    mask = _mask(40, 32, (8, 4, 30, 20))                   # another size: both resize it (Lanczos) and binarise
    ours = fill_features(_ctx(fill_pipe), image, mask)
    ref = reference_fill
    m = ref.mask_processor.preprocess(mask, height=H, width=W)
    init = ref.image_processor.preprocess(image, height=H, width=W).float()
    ref_mask, ref_latents = ref.prepare_mask_latents(m, init * (1 - m), 1, 16, 1, H, W, torch.float32,
                                                     torch.device("cpu"), None)
    expected = torch.cat([ref_latents, ref_mask], dim=-1)
    assert ours.shape == expected.shape == (1, (H // 16) * (W // 16), 320)
    assert (ours - expected).abs().max().item() <= 1e-5
    # The mask part is binary and marks the painted area (white = repaint): 1 somewhere, 0 elsewhere.
    assert set(ours[..., 64:].unique().tolist()) == {0.0, 1.0}


def test_fill_image_matches_diffusers(fill_pipe, reference_fill, posterior_mean):
    image, mask = _photo(W, H, 2), _mask(W, H, (16, 16, 56, 48))
    prompt = "a red ball on a table"
    captured = {}
    real_decode = fill_pipe.decode_latents

    def decode(z, *a, **k):
        captured["z"] = z
        return real_decode(z, *a, **k)

    fill_pipe.decode_latents = decode
    try:
        ours = fill_pipe(prompt=prompt, flux_fill_image=image, flux_fill_mask=mask, height=H, width=W, seed=7,
                         num_inference_steps=STEPS, embedded_guidance=30.0, progress_bar_cmd=_no_bar)
    finally:
        del fill_pipe.decode_latents
    kw = dict(prompt=prompt, image=image, mask_image=mask, height=H, width=W, num_inference_steps=STEPS,
              sigmas=sched.unshifted_sigmas(STEPS).tolist(), guidance_scale=30.0, max_sequence_length=512)
    ref = reference_fill(**kw, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    ref_z = reference_fill(**kw, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    diff = np.abs(_arr(ours) - _arr(ref))
    latent_err = (captured["z"] - lat.unpack(ref_z, H, W)).abs().max().item()
    print(f"Fill parity: max pixel difference {diff.max()}, max latent difference {latent_err:.2e}")
    assert ours.size == ref.size == (W, H)
    assert diff.max() <= PIXEL_BOUND, f"max pixel difference {diff.max()}"
    assert latent_err <= LATENT_BOUND, latent_err
    assert _arr(ours).std() > 5
    # The condition acts: another mask gives another image (so parity above is not parity of the latents alone).
    other = fill_pipe(prompt=prompt, flux_fill_image=image, flux_fill_mask=_mask(W, H, (0, 0, 24, 24)), height=H,
                      width=W, seed=7, num_inference_steps=STEPS, embedded_guidance=30.0, progress_bar_cmd=_no_bar)
    assert np.abs(_arr(other) - _arr(ours)).max() > 10


def test_fill_refuses_missing_inputs_and_wrong_transformer(fill_pipe):
    with pytest.raises(EngineError, match="flux_fill_image.*flux_fill_mask"):
        fill_pipe(prompt="x", height=H, width=W, num_inference_steps=1, progress_bar_cmd=_no_bar)
    with pytest.raises(EngineError, match="flux_fill_mask missing"):
        fill_pipe(prompt="x", flux_fill_image=_photo(W, H, 0), height=H, width=W, num_inference_steps=1,
                  progress_bar_cmd=_no_bar)
    with pytest.raises(EngineError, match="not a PIL image"):
        fill_condition(_ctx(fill_pipe), np.zeros((H, W, 3)), _mask(W, H, (0, 0, 8, 8)))
    with pytest.raises(EngineError, match="flex_inpaint.*Flex.2-preview"):
        fill_pipe(prompt="x", flex_inpaint_image=_photo(W, H, 0), flux_fill_image=_photo(W, H, 0),
                  flux_fill_mask=_mask(W, H, (0, 0, 8, 8)), height=H, width=W, num_inference_steps=1,
                  progress_bar_cmd=_no_bar)
    # Reference tokens carry latents only: a Fill transformer's 384 features per token cannot take them.
    with pytest.raises(EngineError, match="cannot be combined.*kontext.*384 features"):
        fill_pipe(prompt="x", kontext_images=_photo(W, H, 3), flux_fill_image=_photo(W, H, 0),
                  flux_fill_mask=_mask(W, H, (0, 0, 8, 8)), height=H, width=W, num_inference_steps=1,
                  progress_bar_cmd=_no_bar)


def test_fill_inputs_on_a_plain_flux_transformer_are_refused(demo_dir):
    from engine import ModelConfig
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(path=demo_dir / "flux1-dev.safetensors")])
    with pytest.raises(EngineError, match="FLUX.1-Fill-dev transformer.*64 input features"):
        fill_condition(_ctx(pipe), _photo(W, H, 0), _mask(W, H, (0, 0, 8, 8)))
    with pytest.raises(EngineError, match="Flex.2-preview transformer"):
        flex_condition(_ctx(pipe), None, None, _photo(W, H, 0))


# ------------------------------------------------------------------------------------------------ demo files
@pytest.fixture(scope="module")
def inpaint_demos(demo_dir):
    from engine.demo import write_inpaint_demos
    return write_inpaint_demos(demo_dir.parents[1])


def _pattern(key):
    return re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.N.", key)


@pytest.mark.parametrize("kind,rel,in_features", [
    ("fill", "FLUX.1-Fill-dev/flux1-fill-dev.safetensors.json", 384),
    ("flex", "adapters/ostris--Flex.2-preview/Flex.2-preview.safetensors.json", 196)])
def test_demo_files_have_the_official_key_layouts(inpaint_demos, manifests_dir, kind, rel, in_features):
    from engine import demo
    official = json.loads((manifests_dir / rel).read_text())["tensors"]
    path = inpaint_demos[kind]
    assert path.name == {"fill": "flux1-fill-dev.safetensors", "flex": "Flex.2-preview.safetensors"}[kind]
    assert path.parent.name == {"fill": "FLUX.1-Fill-dev-random-demo", "flex": "Flex.2-preview-random-demo"}[kind]
    with safe_open(str(path), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert {_pattern(k) for k in shapes} == {_pattern(k) for k in official}
    assert set(shapes) <= set(official)                          # fewer blocks, never other names
    assert dtypes == {"BF16"}
    h = demo.TRANSFORMER["hidden_size"]
    assert shapes["img_in.weight"] == [h, in_features] and official["img_in.weight"]["shape"] == [3072, in_features]
    assert shapes["final_layer.linear.weight"] == [64, h]
    assert shapes["txt_in.weight"] == [h, demo.TRANSFORMER["context_in_dim"]]
    assert shapes["vector_in.in_layer.weight"] == [h, demo.TRANSFORMER["vec_in_dim"]]
    assert "guidance_in.in_layer.weight" in shapes


def test_demo_writing_is_idempotent_and_leaves_no_temporary_files(inpaint_demos, demo_dir):
    from engine.demo import write_inpaint_demos
    before = {k: p.stat().st_mtime_ns for k, p in inpaint_demos.items()}
    again = write_inpaint_demos(demo_dir.parents[1])
    assert again == inpaint_demos and {k: p.stat().st_mtime_ns for k, p in again.items()} == before
    for p in again.values():
        assert not [x for x in p.parent.iterdir() if ".tmp-" in x.name]
    # A damaged file is rewritten.
    damaged = inpaint_demos["fill"]
    damaged.write_bytes(b"\0" * 16)
    write_inpaint_demos(demo_dir.parents[1])
    with safe_open(str(damaged), "pt") as f:
        assert "img_in.weight" in f.keys()


def _demo_pipe(demo_dir, dit_path):
    from engine import ModelConfig
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=dit_path), ModelConfig(path=demo_dir / "ae.safetensors"),
                       ModelConfig(path=demo_dir / "text_encoder" / "model.safetensors"),
                       ModelConfig(path=demo_dir / "text_encoder_2")],
        tokenizer_1_config=ModelConfig(path=demo_dir / "tokenizer"),
        tokenizer_2_config=ModelConfig(path=demo_dir / "tokenizer_2"))


def test_fill_demo_runs_through_from_pretrained(inpaint_demos, demo_dir):
    pipe = _demo_pipe(demo_dir, inpaint_demos["fill"])
    assert pipe.dit.config.in_channels == 384 and pipe.dit.config.guidance_embeds
    image = _photo(W, H, 3)
    kw = dict(prompt="a cat", flux_fill_image=image, height=H, width=W, seed=1, num_inference_steps=2,
              progress_bar_cmd=_no_bar)
    a = pipe(flux_fill_mask=_mask(W, H, (8, 8, 40, 40)), **kw)
    b = pipe(flux_fill_mask=_mask(W, H, (40, 8, 72, 56)), **kw)
    assert a.size == (W, H) and np.abs(_arr(a) - _arr(b)).max() > 0


# ------------------------------------------------------------------------------------------------ Flex.2
@pytest.fixture(scope="module")
def flex_pipe(inpaint_demos, demo_dir):
    pipe = _demo_pipe(demo_dir, inpaint_demos["flex"])
    assert pipe.dit.config.in_channels == 196 and pipe.dit.config.guidance_embeds
    return pipe


def _diffsynth_preprocess(image):
    """DiffSynth's ``preprocess_image``: H W C uint8 -> 1 C H W in [-1, 1]."""
    x = torch.tensor(np.array(image, dtype=np.float32)) * (2 / 255) - 1
    return x.permute(2, 0, 1)[None]


def _patchify(x):
    """'B C (H P) (W Q) -> B (H W) (C P Q)', written with strided slices."""
    b, c, h, w = x.shape
    parts = torch.stack([x[:, :, p::2, q::2] for p in range(2) for q in range(2)], dim=2)   # B C 4 h/2 w/2
    return parts.reshape(b, c * 4, (h // 2) * (w // 2)).transpose(1, 2)


def _diffsynth_flex(pipe, steps, inpaint_image=None, inpaint_mask=None, control_image=None, strength=0.5,
                    stop=0.5):
    """DiffSynth-Studio's FluxImageUnit_Flex and the Flex branch of model_fn_flux_image, written out: returns the
    per-step packed features (what it concatenates to the latents before patchify)."""
    lh, lw = H // 8, W // 8
    encode = lambda im: pipe.encode_image(_diffsynth_preprocess(im))   # noqa: E731  (the VAE is not under test)
    shape = (1, 16, lh, lw)
    stop = 1 if stop is None else stop
    image = torch.zeros(shape) if inpaint_image is None else encode(inpaint_image)
    if inpaint_mask is None:
        mask = torch.ones(shape)[:, 0:1]
    else:
        mask = _diffsynth_preprocess(inpaint_mask.resize((lw, lh)))        # PIL's default filter, as DiffSynth
        mask = (mask[:, 0:1] + 1) / 2
    image = image * (1 - mask)
    control = torch.zeros(shape) if control_image is None else encode(control_image) * strength
    cond = torch.concat([image, mask, control], dim=1)
    uncond = torch.concat([image, mask, torch.zeros_like(control)], dim=1)
    timesteps = sched.flux_sigmas(steps)[:steps] * 1000
    stop_timestep = timesteps[int(stop * (len(timesteps) - 1))]
    return [_patchify(cond if timesteps[i] >= stop_timestep else uncond) for i in range(steps)]


@pytest.fixture(scope="module")
def flex_inputs():
    return {"inpaint_image": _photo(W, H, 4), "inpaint_mask": _mask(W, H, (20, 12, 60, 44)).convert("RGB"),
            "control_image": _photo(W, H, 5)}


@pytest.mark.parametrize("case", [
    dict(strength=0.5, stop=0.5, steps=4),           # control for steps 0, 1 (int(0.5 * 3) = 1)
    dict(strength=0.8, stop=1.0, steps=4),           # every step
    dict(strength=1.3, stop=0.0, steps=5),           # the first step only
    dict(strength=0.5, stop=None, steps=3),          # None means 1
    dict(strength=0.5, stop=0.7, steps=5, soft_mask=True),
])
def test_flex_features_match_diffsynth_written_out(flex_pipe, flex_inputs, case):
    pipe, steps = flex_pipe, case["steps"]
    inputs = dict(flex_inputs)
    if case.get("soft_mask"):            # a grey, smaller mask: not binarised, resized bicubic to the latent grid
        grad = np.tile(np.linspace(0, 255, 40, dtype=np.float32), (30, 1))
        inputs["inpaint_mask"] = Image.fromarray(grad.astype("uint8")).convert("RGB")
    cond = flex_condition(_ctx(pipe, steps=steps), inputs["inpaint_image"], inputs["inpaint_mask"],
                          inputs["control_image"], case["strength"], case["stop"])
    expected = _diffsynth_flex(pipe, steps, **inputs, strength=case["strength"], stop=case["stop"])
    for i in range(steps):
        got = cond.features(i)
        assert got.shape == (1, (H // 16) * (W // 16), 132)
        assert (got - expected[i]).abs().max().item() <= 1e-5, (case, i)
    with_control = [i for i in range(steps) if expected[i].abs()[..., 68:].max() > 0]
    assert with_control == list(range(int((1 if case["stop"] is None else case["stop"]) * (steps - 1)) + 1))


def test_flex_defaults_are_blank_inpaint_full_mask_no_control(flex_pipe):
    cond = flex_condition(_ctx(flex_pipe), None, None, None)
    expected = _diffsynth_flex(flex_pipe, STEPS)
    got = cond.features(0)
    assert torch.equal(got, expected[0]) and torch.equal(cond.features(STEPS - 1), expected[0])
    f = got.view(1, -1, 33, 4)
    assert f[:, :, :16].abs().max() == 0 and f[:, :, 16].min() == 1 and f[:, :, 17:].abs().max() == 0
    # The mask alone (no image): the blank latents stay blank, the mask is taken.
    m = flex_condition(_ctx(flex_pipe), None, _mask(W, H, (0, 0, 40, 64)), None).features(0).view(1, -1, 33, 4)
    assert m[:, :, 16].min() == 0 and m[:, :, 16].max() == 1
    # A Flex.2 transformer always gets its 132 features, so a plain prompt runs (DiffSynth does the same).
    assert flex_pipe(prompt="x", height=H, width=W, num_inference_steps=1, progress_bar_cmd=_no_bar).size == (W, H)


def test_flex_refuses_a_stop_outside_0_1(flex_pipe):
    with pytest.raises(EngineError, match="fraction of the steps"):
        flex_condition(_ctx(flex_pipe), None, None, None, 0.5, 1.5)


def test_flex_sampling_matches_the_loop_written_out(flex_pipe, flex_inputs):
    """The seed's loop with DiffSynth's Flex features on the pipeline's own transformer: noise from the seed on the
    CPU, [latents | features(step)] into the DiT at every step, Euler; compared on the final latents."""
    pipe, seed, steps = flex_pipe, 3, STEPS
    kw = dict(flex_inpaint_image=flex_inputs["inpaint_image"], flex_inpaint_mask=flex_inputs["inpaint_mask"],
              flex_control_image=flex_inputs["control_image"], flex_control_strength=0.7, flex_control_stop=0.5)
    captured = {}
    real_decode = pipe.decode_latents

    def decode(z, *a, **k):
        captured["z"] = z
        return real_decode(z, *a, **k)

    pipe.decode_latents = decode
    try:
        image = pipe(prompt="a lighthouse", height=H, width=W, seed=seed, num_inference_steps=steps,
                     embedded_guidance=3.5, progress_bar_cmd=_no_bar, **kw)
    finally:
        del pipe.decode_latents
    features = _diffsynth_flex(pipe, steps, flex_inputs["inpaint_image"], flex_inputs["inpaint_mask"],
                               flex_inputs["control_image"], 0.7, 0.5)
    emb, pooled = pipe.encode_prompt("a lighthouse")
    sigmas = sched.flux_sigmas(steps)
    x = _patchify(torch.randn((1, 16, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(seed)))
    ids = lat.image_ids(H, W)
    with torch.no_grad():
        for i in range(steps):
            v = pipe.dit(hidden_states=torch.cat([x, features[i]], dim=-1), encoder_hidden_states=emb,
                         pooled_projections=pooled, timestep=sigmas[i].expand(1), img_ids=ids,
                         txt_ids=torch.zeros(emb.shape[1], 3), guidance=torch.full((1,), 3.5),
                         return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    err = (captured["z"] - lat.unpack(x, H, W)).abs().max().item()
    assert err <= 1e-5, err
    assert image.size == (W, H)


def test_flex_control_strength_and_stop_act(flex_pipe, flex_inputs):
    kw = dict(prompt="a lighthouse", height=H, width=W, seed=3, num_inference_steps=STEPS, progress_bar_cmd=_no_bar,
              flex_inpaint_image=flex_inputs["inpaint_image"], flex_inpaint_mask=flex_inputs["inpaint_mask"])
    plain = _arr(flex_pipe(**kw))
    # Strength 0 scales the control latents to zeros: exactly the image without a control image.
    assert np.array_equal(_arr(flex_pipe(**kw, flex_control_image=flex_inputs["control_image"],
                                         flex_control_strength=0.0)), plain)
    early = _arr(flex_pipe(**kw, flex_control_image=flex_inputs["control_image"], flex_control_strength=1.0,
                           flex_control_stop=0.0))
    full = _arr(flex_pipe(**kw, flex_control_image=flex_inputs["control_image"], flex_control_strength=1.0,
                          flex_control_stop=1.0))
    assert np.abs(full - plain).max() > 0 and np.abs(full - early).max() > 0 and np.abs(early - plain).max() > 0
