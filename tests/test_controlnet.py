"""FLUX.1 ControlNets (engine.controlnet, engine.conditions.controlnet): the three official layouts, parity with
diffusers' FluxControlNetPipeline, the seed's start/end window, inpainting, refusal of other models' ControlNets,
and the seed-style ``from_pretrained`` with ControlNet files.

Parity: the demo FLUX model and demo ControlNets in fp32, the same modules given to both pipelines, the same CPU
noise and the seed's sigmas (diffusers' scheduler with shift 3 and the unshifted sigmas, as in
test_parity_diffusers.py); diffusers samples the control image's VAE posterior, the seed takes its mean, so the
reference is made to take the mean too.
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine import ControlNetInput, EngineError, FluxImagePipeline, ModelConfig
from engine import scheduler as sched
from engine.conditions.controlnet import combine, spread
from engine.controlnet import (MultiControlNet, build_controlnet, classify, infer_controlnet_config, load_controlnet,
                               write_controlnet_demos)
from engine.demo.controlnet import KINDS, controlnet_state_dict, demo_model_id
from engine.loading import ModelFileError, load_models
from tests.helpers import write_sparse_safetensors
from tests.helpers import as_int16 as _arr, box_mask as _mask, no_bar as _no_bar, smooth_photo as _photo

pytestmark = pytest.mark.filterwarnings("ignore")

H, W = 64, 80            # not square, so a swapped height/width shows
STEPS = 4
PIXEL_BOUND = 1          # uint8 levels (measured: 1, a rounding flip; latents agree to ~5e-7)
LATENT_BOUND = 1e-4
DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
MANIFESTS = {  # manifest folder -> (demo kind, double blocks, single blocks, union modes, control features)
    "InstantX--FLUX.1-dev-Controlnet-Union-alpha": ("union", 5, 10, 10, 64),
    "jasperai--Flux.1-dev-Controlnet-Upscaler": ("upscaler", 5, 0, None, 64),
    "alimama-creative--FLUX.1-dev-Controlnet-Inpainting-Beta": ("inpaint", 6, 0, None, 68),
}
FILE = "diffusion_pytorch_model.safetensors"


def _manifest(manifests_dir, folder):
    return json.loads((manifests_dir / "adapters" / folder / f"{FILE}.json").read_text())


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cn_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-models")
    write_controlnet_demos(root)
    return root


@pytest.fixture(scope="module")
def nets(cn_dir):
    return {k: load_controlnet(cn_dir / demo_model_id(k) / FILE, torch_dtype=torch.float32) for k in KINDS}


@pytest.fixture(scope="module")
def base(demo_dir):
    """The demo FLUX.1-dev components in fp32, through the engine's loader."""
    files = [demo_dir / "flux1-dev.safetensors", demo_dir / "ae.safetensors",
             demo_dir / "text_encoder" / "model.safetensors", demo_dir / "text_encoder_2"]
    return load_models(files, torch_dtype=torch.float32, device="cpu")


def engine_pipe(base, tokenizers, controlnets=()):
    pipe = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    modules = dict(base)
    if controlnets:
        modules["controlnet"] = MultiControlNet(list(controlnets))
    pipe.set_models(modules)
    pipe.tokenizer_1, pipe.tokenizer_2 = tokenizers
    return pipe


def reference_pipe(base, tokenizers, controlnet):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetPipeline
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sched.SEED_SHIFT, use_dynamic_shifting=False)
    return FluxControlNetPipeline(scheduler=scheduler, vae=base["vae"], text_encoder=base["text_encoder_1"],
                                  tokenizer=tokenizers[0], text_encoder_2=base["text_encoder_2"],
                                  tokenizer_2=tokenizers[1], transformer=base["dit"], controlnet=controlnet)


@pytest.fixture
def mean_encoding(monkeypatch):
    import diffusers.pipelines.flux.pipeline_flux_controlnet as ref_module
    real = ref_module.retrieve_latents
    monkeypatch.setattr(ref_module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": real(out, generator, "argmax"))


def _run(pipe, **kw):
    args = dict(prompt="a house by a lake", height=H, width=W, seed=7, num_inference_steps=STEPS,
                progress_bar_cmd=_no_bar)
    args.update(kw)
    return pipe(**args)


# ------------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("folder", list(MANIFESTS))
def test_manifest_maps_exactly_onto_the_model(manifests_dir, folder, tmp_path):
    kind, doubles, singles, modes, cond = MANIFESTS[folder]
    m = _manifest(manifests_dir, folder)
    sd = {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}
    assert classify(sd)[0] == "flux"
    cfg = infer_controlnet_config(sd)
    k = cfg["kwargs"]
    assert (k["num_layers"], k["num_single_layers"], k["num_mode"], cfg["cond_channels"]) == (doubles, singles, modes,
                                                                                               cond)
    assert (k["num_attention_heads"], k["attention_head_dim"], k["joint_attention_dim"], k["pooled_projection_dim"],
            k["guidance_embeds"], tuple(k["axes_dims_rope"])) == (24, 128, 4096, 768, True, (16, 56, 56))
    with torch.device("meta"):
        model = build_controlnet(cfg)
    params = model.state_dict()
    assert params.keys() == sd.keys(), (params.keys() - sd.keys(), sd.keys() - params.keys())
    for key, t in sd.items():
        assert tuple(t.shape) == tuple(params[key].shape), key
    # The real file-reading path: a header-exact sparse file of the full size, loaded onto meta.
    path = tmp_path / FILE
    write_sparse_safetensors(m["tensors"], path)
    loaded = load_controlnet(path, torch_dtype=torch.bfloat16, device="meta")
    assert loaded.controlnet_x_embedder.in_features == cond and loaded.flux_studio_files == [str(path)]
    assert sum(p.numel() for p in loaded.parameters()) == m["param_count"]


@pytest.mark.parametrize("folder", list(MANIFESTS))
def test_demo_files_have_the_official_key_layout(manifests_dir, folder, cn_dir):
    kind = MANIFESTS[folder][0]
    real = _manifest(manifests_dir, folder)["tensors"]
    demo = controlnet_state_dict(kind)

    def pattern(keys):
        return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}
    assert pattern(demo) == pattern(real)
    assert all(t.dtype == torch.bfloat16 for t in demo.values())
    for key, t in demo.items():   # same rank, and the per-token input features are the real ones
        want = real.get(key) or real[re.sub(r"\.\d+\.", ".0.", key)]
        assert t.ndim == len(want["shape"]), key
    assert demo["controlnet_x_embedder.weight"].shape[1] == real["controlnet_x_embedder.weight"]["shape"][1]
    # written idempotently: a second call keeps the file
    path = cn_dir / demo_model_id(kind) / FILE
    before = path.stat().st_mtime_ns
    write_controlnet_demos(cn_dir)
    assert path.stat().st_mtime_ns == before


def test_spread_follows_diffusers_block_indexing():
    import math
    for depth, n in ((19, 5), (38, 10), (19, 6), (2, 1), (2, 5)):
        res = list(range(n))
        interval = int(math.ceil(depth / n))               # FluxTransformer2DModel's rule
        assert spread(res, depth) == [res[b // interval] for b in range(depth)]
    a = [torch.tensor(1.0), torch.tensor(2.0)]
    b = [torch.tensor(10.0)]
    assert [float(x) for x in combine([a, None, [torch.tensor(5.0), torch.tensor(6.0)]], 4)] == [6.0, 8.0]
    assert [float(x) for x in combine([a, b], 4)] == [11.0, 11.0, 12.0, 12.0]   # spread to the depth, then summed
    assert combine([None, None], 4) is None


def test_window_follows_the_seed():
    inp = ControlNetInput(start=0.5, end=0.0)
    assert [inp.active(i, 4) for i in range(4)] == [False, False, True, True]   # progress 1, 2/3, 1/3, 0
    assert [ControlNetInput().active(i, 4) for i in range(4)] == [True] * 4
    assert [ControlNetInput(start=1.0, end=0.5).active(i, 4) for i in range(4)] == [True, True, False, False]
    assert ControlNetInput(start=1.0, end=0.0).active(0, 1)


# ------------------------------------------------------------------------------------------------ parity
def test_union_with_a_mode_matches_diffusers(base, nets, demo_tokenizers, mean_encoding):
    from engine import latents as lat
    control = _photo(W, H, 1)
    pipe = engine_pipe(base, demo_tokenizers, [nets["union"]])
    captured, decode = {}, pipe.decode_latents
    pipe.decode_latents = lambda z, *a, **k: decode(captured.setdefault("z", z), *a, **k)
    ours = _run(pipe, controlnet_inputs=[ControlNetInput(image=control, scale=0.7, processor_id="depth")])
    args = dict(prompt="a house by a lake", height=H, width=W, num_inference_steps=STEPS,
                sigmas=sched.unshifted_sigmas(STEPS, 1.0).tolist(), guidance_scale=3.5, control_image=control,
                control_mode=2, controlnet_conditioning_scale=0.7, max_sequence_length=512)
    ref_pipe = reference_pipe(base, demo_tokenizers, nets["union"])
    ref = ref_pipe(**args, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    diff = np.abs(_arr(ours) - _arr(ref))
    assert ours.size == ref.size == (W, H)
    assert diff.max() <= PIXEL_BOUND, f"max pixel difference {diff.max()}"
    ref_z = ref_pipe(**args, generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    err = (captured["z"] - lat.unpack(ref_z, H, W)).abs().max().item()
    assert err <= LATENT_BOUND, err                               # measured ~5e-7 (fp32 rounding order)
    plain = _run(engine_pipe(base, demo_tokenizers))
    assert np.abs(_arr(plain) - _arr(ours)).max() > 10            # the ControlNet really acts
    other_mode = _run(engine_pipe(base, demo_tokenizers, [nets["union"]]),
                      controlnet_inputs=[ControlNetInput(image=control, scale=0.7, processor_id="canny")])
    assert np.abs(_arr(other_mode) - _arr(ours)).max() > 0        # the mode matters


def test_two_controlnets_match_diffusers_multi(base, nets, demo_tokenizers, mean_encoding):
    from diffusers import FluxMultiControlNetModel
    c1, c2 = _photo(W, H, 2), _photo(W // 2, H // 2, 3)            # the second one is resized to the output size
    ours = _run(engine_pipe(base, demo_tokenizers, [nets["union"], nets["upscaler"]]),
                controlnet_inputs=[ControlNetInput(controlnet_id=0, image=c1, scale=0.6, processor_id="canny"),
                                   ControlNetInput(controlnet_id=1, image=c2, scale=0.8)])
    ref = reference_pipe(base, demo_tokenizers, FluxMultiControlNetModel([nets["union"], nets["upscaler"]]))(
        prompt="a house by a lake", height=H, width=W, num_inference_steps=STEPS,
        sigmas=sched.unshifted_sigmas(STEPS, 1.0).tolist(), guidance_scale=3.5,
        control_image=[c1, c2.resize((W, H), Image.LANCZOS)], control_mode=[0, None],
        controlnet_conditioning_scale=[0.6, 0.8], generator=torch.Generator("cpu").manual_seed(7),
        max_sequence_length=512).images[0]
    diff = np.abs(_arr(ours) - _arr(ref))
    assert diff.max() <= PIXEL_BOUND, f"max pixel difference {diff.max()}"
    only_first = _run(engine_pipe(base, demo_tokenizers, [nets["union"], nets["upscaler"]]),
                      controlnet_inputs=[ControlNetInput(controlnet_id=0, image=c1, scale=0.6, processor_id="canny")])
    assert np.abs(_arr(only_first) - _arr(ours)).max() > 5         # the second one adds its share


# ------------------------------------------------------------------------------------------------ semantics
def _spy(pipe):
    """Per transformer call: whether ControlNet residuals came with it, and its input tokens."""
    calls = []

    def hook(_module, args, kwargs):
        calls.append((kwargs.get("controlnet_block_samples") is not None, kwargs["hidden_states"].clone()))
    return calls, pipe.dit.register_forward_pre_hook(hook, with_kwargs=True)


def test_outside_the_window_the_steps_are_those_without_controlnet(base, nets, demo_tokenizers):
    control = _photo(W, H, 4)
    plain_pipe = engine_pipe(base, demo_tokenizers)
    calls_plain, h = _spy(plain_pipe)
    plain = _run(plain_pipe)
    h.remove()
    pipe = engine_pipe(base, demo_tokenizers, [nets["union"]])
    calls, h = _spy(pipe)
    late = _run(pipe, controlnet_inputs=[ControlNetInput(image=control, start=0.5, end=0.0, processor_id="tile")])
    h.remove()
    assert [c[0] for c in calls] == [False, False, True, True]
    for i in (0, 1, 2):   # the first two steps are exactly those without a ControlNet, so step 2's input is too
        assert torch.equal(calls[i][1], calls_plain[i][1]), i
    assert not torch.equal(calls[3][1], calls_plain[3][1])
    assert np.abs(_arr(late) - _arr(plain)).max() > 0
    calls.clear()
    h = pipe.dit.register_forward_pre_hook(lambda m, a, k: calls.append((k.get("controlnet_block_samples") is not None,
                                                                        None)), with_kwargs=True)
    _run(pipe, controlnet_inputs=[ControlNetInput(image=control, start=1.0, end=0.5, processor_id="tile")])
    h.remove()
    assert [c[0] for c in calls] == [True, True, False, False]


def test_scale_zero_equals_no_controlnet(base, nets, demo_tokenizers):
    plain = _run(engine_pipe(base, demo_tokenizers))
    zero = _run(engine_pipe(base, demo_tokenizers, [nets["upscaler"]]),
                controlnet_inputs=[ControlNetInput(image=_photo(W, H, 5), scale=0.0)])
    assert np.array_equal(_arr(plain), _arr(zero))


def test_cfg_negative_pass_gets_its_own_residuals(base, nets, demo_tokenizers):
    pipe = engine_pipe(base, demo_tokenizers, [nets["upscaler"]])
    seen = []
    h = nets["upscaler"].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        _run(pipe, negative_prompt="blurry", cfg_scale=3.0,
             controlnet_inputs=[ControlNetInput(image=_photo(W, H, 6), scale=0.5)])
    finally:
        h.remove()
    assert len(seen) == 2 * STEPS
    assert not torch.equal(seen[0], seen[1])                      # positive, then negative text embeddings


def test_inpainting_controlnet_end_to_end(base, nets, demo_tokenizers):
    from engine.conditions.base import ConditionContext
    from engine.conditions.controlnet import controlnet_condition
    pipe = engine_pipe(base, demo_tokenizers, [nets["inpaint"]])
    image = _photo(W, H, 7)
    m1, m2 = _mask(W, H, (16, 16, 48, 48)), _mask(W, H, (32, 0, 80, 32))
    a = _run(pipe, controlnet_inputs=[ControlNetInput(image=image, inpaint_mask=m1, scale=0.9)])
    b = _run(pipe, controlnet_inputs=[ControlNetInput(image=image, inpaint_mask=m1, scale=0.9)])
    c = _run(pipe, controlnet_inputs=[ControlNetInput(image=image, inpaint_mask=m2, scale=0.9)])
    plain = _run(engine_pipe(base, demo_tokenizers))
    assert np.array_equal(_arr(a), _arr(b))                        # deterministic
    assert np.abs(_arr(a) - _arr(c)).max() > 0                     # depends on the mask
    assert np.abs(_arr(a) - _arr(plain)).max() > 0
    # The control input, as the seed builds it: masked pixels black, then the mask (1 = keep) as 4 features/token.
    sigmas = sched.flux_sigmas(STEPS)
    ctx = ConditionContext(pipe, H, W, torch.device("cpu"), torch.float32, sigmas, lambda im: pipe.encode_image(im))
    cond = controlnet_condition(ctx, [ControlNetInput(image=image, inpaint_mask=m1)]).prepared[0].cond
    assert cond.shape == (1, (H // 16) * (W // 16), 68)
    keep = cond[0, :, 64:].reshape(H // 16, W // 16, 4)
    assert torch.all(keep[1:3, 1:3] == 0) and torch.all(keep[0] == 1) and torch.all(keep[:, 3:] == 1)
    black = np.array(image)
    black[16:48, 16:48] = 0
    from engine import latents as lat
    expected = lat.pack(pipe.encode_image(Image.fromarray(black)))
    assert torch.allclose(cond[..., :64], expected, atol=1e-6)
    with pytest.raises(EngineError, match="inpaint_mask"):
        _run(pipe, controlnet_inputs=[ControlNetInput(image=image)])
    with pytest.raises(EngineError, match="Inpainting ControlNet"):
        _run(engine_pipe(base, demo_tokenizers, [nets["upscaler"]]),
             controlnet_inputs=[ControlNetInput(image=image, inpaint_mask=m1)])


def test_bad_inputs_are_named(base, nets, demo_tokenizers):
    pipe = engine_pipe(base, demo_tokenizers, [nets["union"]])
    with pytest.raises(EngineError, match="processor_id"):
        _run(pipe, controlnet_inputs=[ControlNetInput(image=_photo(W, H, 8))])
    with pytest.raises(EngineError, match="controlnet_id 3"):
        _run(pipe, controlnet_inputs=[ControlNetInput(controlnet_id=3, image=_photo(W, H, 8), processor_id="canny")])
    with pytest.raises(EngineError, match="no ControlNet is loaded"):
        _run(engine_pipe(base, demo_tokenizers), controlnet_inputs=[ControlNetInput(image=_photo(W, H, 8))])
    with pytest.raises(EngineError, match="no image"):
        _run(pipe, controlnet_inputs=[ControlNetInput(processor_id="canny")])


def test_with_kontext_reference_tokens(base, nets, demo_tokenizers):
    # Reference tokens come after the image's in the transformer's input; they get no residual.
    out = _run(engine_pipe(base, demo_tokenizers, [nets["upscaler"]]), kontext_images=_photo(48, 32, 9),
               controlnet_inputs=[ControlNetInput(image=_photo(W, H, 9), scale=0.5)])
    assert out.size == (W, H)


# ------------------------------------------------------------------------------------------------ refusals
def _sd3_controlnet():
    r = torch.zeros
    return {"pos_embed.proj.weight": r(64, 16, 2, 2), "pos_embed_input.proj.weight": r(64, 16, 2, 2),
            "context_embedder.weight": r(64, 32), "time_text_embed.timestep_embedder.linear_1.weight": r(64, 256),
            "transformer_blocks.0.attn.to_q.weight": r(64, 64), "controlnet_blocks.0.weight": r(64, 64)}


def _sdxl_controlnet():
    r = torch.zeros
    return {"conv_in.weight": r(32, 4, 3, 3), "controlnet_cond_embedding.conv_in.weight": r(16, 3, 3, 3),
            "controlnet_down_blocks.0.weight": r(32, 32, 1, 1), "controlnet_mid_block.weight": r(64, 64, 1, 1),
            "add_embedding.linear_1.weight": r(64, 256), "down_blocks.0.resnets.0.conv1.weight": r(32, 32, 3, 3)}


@pytest.mark.parametrize("make,words", [(_sd3_controlnet, "SD3 ControlNet"),
                                        (_sdxl_controlnet, "Stable Diffusion XL ControlNet")])
def test_controlnets_of_other_models_are_refused_by_name(demo_dir, tmp_path, make, words):
    path = tmp_path / "other-controlnet.safetensors"
    save_file(make(), str(path))
    with pytest.raises(ModelFileError) as e:
        load_controlnet(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg and "FluxControlNetModel" in msg
    # through the seed's from_pretrained too, beside a FLUX model
    with pytest.raises(ModelFileError, match=words):
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(demo_dir / "flux1-dev.safetensors")), ModelConfig(path=str(path))])


def test_a_controlnet_of_another_width_is_refused_naming_the_file(demo_dir, tmp_path):
    from diffusers import FluxControlNetModel
    torch.manual_seed(0)
    wide = FluxControlNetModel(in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=32,
                               num_attention_heads=3, joint_attention_dim=32, pooled_projection_dim=64,
                               guidance_embeds=True, axes_dims_rope=[4, 14, 14])
    path = tmp_path / "wide-controlnet.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    with pytest.raises(ModelFileError) as e:
        FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
            ModelConfig(path=str(demo_dir / "flux1-dev.safetensors")), ModelConfig(path=str(path))])
    msg = str(e.value)
    assert str(path) in msg and "width 96" in msg and "64" in msg


# ------------------------------------------------------------------------------------------------ seed API
def test_seed_style_from_pretrained_with_controlnet_files(demo_dir, cn_dir):
    import shutil
    from engine.demo import DEMO_MODEL_ID
    models = demo_dir.parents[1]
    for kind in ("union", "inpaint"):
        target = models / demo_model_id(kind)
        if not target.exists():
            shutil.copytree(cn_dir / demo_model_id(kind), target)
    configs = [ModelConfig(model_id=DEMO_MODEL_ID, origin_file_pattern=p) for p in (
        "flux1-dev.safetensors", "text_encoder/model.safetensors", "text_encoder_2/*.safetensors", "ae.safetensors")]
    configs += [ModelConfig(model_id=demo_model_id(k), origin_file_pattern=FILE) for k in ("union", "inpaint")]
    pipe = FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=configs, models_dir=models,
        tokenizer_1_config=ModelConfig(model_id=DEMO_MODEL_ID, origin_file_pattern="tokenizer/"),
        tokenizer_2_config=ModelConfig(model_id=DEMO_MODEL_ID, origin_file_pattern="tokenizer_2/"))
    assert isinstance(pipe.controlnet, MultiControlNet) and len(pipe.controlnet) == 2
    assert [n.union for n in pipe.controlnet.nets] == [True, False]            # controlnet_id = order of the files
    assert pipe.model_files["controlnet"][0].endswith(f"ControlNet-Union-alpha-random-demo/{FILE}")
    assert pipe.plan.entries["controlnet"].label == "ControlNet"
    image = _photo(W, H, 10)
    out = pipe(prompt="a cat", height=H, width=W, seed=1, num_inference_steps=2, progress_bar_cmd=_no_bar,
               controlnet_inputs=[ControlNetInput(image=image, scale=0.3, processor_id="canny"),
                                  ControlNetInput(controlnet_id=1, image=image, inpaint_mask=_mask(W, H, (0, 0, 40, 40)),
                                                  scale=0.9)])
    assert out.size == (W, H)


def test_attach_on_a_built_pipeline_and_remove(base, nets, demo_tokenizers, cn_dir):
    from engine.controlnet import attach_controlnets
    pipe = engine_pipe(base, demo_tokenizers)
    multi = attach_controlnets(pipe, [cn_dir / demo_model_id("upscaler") / FILE, nets["union"]])
    assert pipe.controlnet is multi and len(multi) == 2 and "controlnet" in pipe.plan.entries
    assert multi.nets[0].dtype == torch.float32
    attach_controlnets(pipe, None)
    assert pipe.controlnet is None and "controlnet" not in pipe.plan.entries and "controlnet" not in pipe.model_files


# ------------------------------------------------------------------------------------------------ memory plan
def test_plan_keeps_controlnet_beside_the_transformer(manifests_dir, nets):
    from engine import memory as vram
    from engine.memory.layers import fp8_layers
    sizes = vram.sizes_from_manifests({
        "dit": manifests_dir / "FLUX.1-dev" / "flux1-dev.safetensors.json",
        "controlnet": manifests_dir / "adapters" / "InstantX--FLUX.1-dev-Controlnet-Union-alpha" / f"{FILE}.json"})
    p = vram.plan(sizes, device="cuda", vram_limit_gb=None)
    assert p.entries["controlnet"].strategy == "resident"
    both = p.entries["dit"].vram_bytes + p.entries["controlnet"].vram_bytes
    assert p.stage_peaks_gb["dit"] * vram.GiB > both                    # one stage holds both
    tight = vram.plan(sizes, device="cuda", vram_limit_gb=20)
    assert tight.entries["controlnet"].strategy in ("resident", "offload", "fp8", "fp8+offload")
    assert tight.fits and tight.predicted_peak_vram_gb <= 20
    assert vram.plan(sizes, device="cuda", vram_limit_gb=40).entries["controlnet"].strategy == "resident"
    # fp8 storage casts the same tensors whether counted from the file's keys or from the loaded module
    multi = MultiControlNet([nets["union"]])
    from_module = vram.sizes_from_module("controlnet", multi)
    from_file = vram.sizes_from_tensors("controlnet", controlnet_state_dict("union"))
    assert from_module.fp8_params == from_file.fp8_params > 0
    names = [n for n, _ in fp8_layers("controlnet", multi)]
    assert names and all(re.match(r"nets\.0\.(single_)?transformer_blocks\.", n) for n in names)
