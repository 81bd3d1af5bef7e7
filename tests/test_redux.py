"""FLUX.1-Redux: its two files (manifests, detection, loading), the image prompt condition, parity with diffusers'
``FluxPriorReduxPipeline`` -> ``FluxPipeline`` on the same small random weights, and the random-weight demo.

The small models keep SigLIP's 384x384 input with patches of 14 (729 positions, as the real tower), at 144 wide
(two heads of SigLIP's width 72) and two layers; the embedder writes 32-wide tokens, the tiny transformer's T5 width.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import scheduler as sched
from engine.errors import EngineError
from engine.loading import ModelFileError, detect_component, load_models
from engine.redux import model as redux_model
from engine.roles import ROLES
from tests.helpers import no_bar, smooth_photo, tiny_flux_modules, write_sparse_safetensors

pytestmark = pytest.mark.filterwarnings("ignore")

DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
REDUX = "adapters/black-forest-labs--FLUX.1-Redux-dev/"
ENCODER_MANIFEST = REDUX + "image_encoder/model.safetensors.json"
EMBEDDER_MANIFEST = REDUX + "image_embedder/diffusion_pytorch_model.safetensors.json"
SIGLIP_MANIFEST = "adapters/google--siglip-so400m-patch14-384/model.safetensors.json"
CLIP_MANIFEST = "FLUX.1-dev/text_encoder/model.safetensors.json"
ENCODER_NAME = ROLES["flux_redux_image_encoder"].loader_name
EMBEDDER_NAME = ROLES["flux_redux_image_embedder"].loader_name

H = W = 64
STEPS = 3
PIXEL_BOUND = 1          # uint8 levels, as the other diffusers parity tests
LATENT_BOUND = 1e-4      # final latents (float32 both sides: ~1e-6 apart)
T5_LEN = 512             # diffusers' prior pads the prompt to 512 tokens


def manifest(root, rel):
    return json.loads((root / rel).read_text())


def meta_sd(m):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}


def as_array(image):
    return np.asarray(image, dtype=np.int16)


# ------------------------------------------------------------------------------------------------ manifests

def test_image_encoder_manifest_maps_one_to_one(manifests_dir):
    m = manifest(manifests_dir, ENCODER_MANIFEST)
    sd = meta_sd(m)
    assert detect_component(sd)[:2] == ("flux_redux_image_encoder", "transformers")
    cfg = redux_model.infer_siglip_config(sd)
    assert cfg == dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       num_channels=3, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, vision_use_head=True)
    with torch.device("meta"):
        model = redux_model.build_siglip(cfg)
    converted = redux_model.convert_siglip(sd)
    params = model.state_dict()
    assert converted.keys() == params.keys(), (sorted(params.keys() - converted.keys())[:5],
                                               sorted(converted.keys() - params.keys())[:5])
    assert not [k for k, t in converted.items() if t.shape != params[k].shape]
    assert sum(t.numel() for t in converted.values()) == m["param_count"] == 428_225_600
    assert model.config.image_size // model.config.patch_size == 27     # 729 tokens per image


def test_image_embedder_manifest_maps_one_to_one(manifests_dir):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    m = manifest(manifests_dir, EMBEDDER_MANIFEST)
    sd = meta_sd(m)
    assert detect_component(sd)[:2] == ("flux_redux_image_embedder", "diffusers")
    cfg = redux_model.infer_embedder_config(sd)
    assert cfg == {"redux_dim": 1152, "txt_in_features": 4096}
    with torch.device("meta"):
        model = redux_model.build_embedder(cfg)
    assert isinstance(model, ReduxImageEncoder)
    params = model.state_dict()
    assert sd.keys() == params.keys()
    assert all(sd[k].shape == params[k].shape for k in sd)
    assert sum(t.numel() for t in sd.values()) == m["param_count"]


@pytest.fixture(scope="module")
def sparse_files(manifests_dir, tmp_path_factory):
    """Header-exact sparse copies of the two Redux files, the whole SigLIP and CLIP-L (real sizes, no data)."""
    root = tmp_path_factory.mktemp("redux-sparse")
    out = {}
    for name, rel in (("encoder", ENCODER_MANIFEST), ("embedder", EMBEDDER_MANIFEST), ("siglip", SIGLIP_MANIFEST),
                      ("clip", CLIP_MANIFEST)):
        path = root / name / rel.split("/")[-1].removesuffix(".json")
        path.parent.mkdir(parents=True)
        write_sparse_safetensors(manifest(manifests_dir, rel)["tensors"], path)
        out[name] = path
    return out


def test_full_size_redux_files_load_through_the_real_reading_path(sparse_files):
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionModel
    out = load_models([sparse_files["encoder"], sparse_files["embedder"]], device="meta",
                      expect={sparse_files["encoder"]: "flux_redux_image_encoder",
                              sparse_files["embedder"]: "flux_redux_image_embedder"})
    assert sorted(out) == ["flux_redux_image_embedder", "flux_redux_image_encoder"]
    enc, emb = out["flux_redux_image_encoder"], out["flux_redux_image_embedder"]
    assert isinstance(enc, SiglipVisionModel) and isinstance(emb, ReduxImageEncoder)
    assert (enc.config.hidden_size, enc.config.num_hidden_layers, enc.config.num_attention_heads,
            enc.config.image_size) == (1152, 27, 16, 384)
    assert sum(p.numel() for p in enc.parameters()) == 428_225_600
    assert enc.dtype == torch.bfloat16 and emb.config.txt_in_features == 4096
    assert enc.flux_studio_role == "flux_redux_image_encoder" and not enc.training


# ------------------------------------------------------------------------------------------ SigLIP is not CLIP

def test_a_siglip_file_is_never_taken_for_clip_l(manifests_dir):
    siglip = list(manifest(manifests_dir, SIGLIP_MANIFEST)["tensors"])
    role, _fmt, desc = detect_component(siglip)
    assert role == "image_encoder" and "SigLIP" in desc          # the whole SiglipModel: IP-Adapter's, not ours
    text_tower = [k for k in siglip if k.startswith("text_model.")]
    assert detect_component(text_tower)[0] not in ("text_encoder_1", "flux_redux_image_encoder")
    # its vision tower alone is the Redux encoder's layout (the same shapes)
    vision_tower = [k for k in siglip if k.startswith("vision_model.")]
    assert detect_component(vision_tower)[0] == "flux_redux_image_encoder"


def test_a_clip_file_is_never_taken_for_siglip(manifests_dir):
    from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPConfig
    assert detect_component(list(manifest(manifests_dir, CLIP_MANIFEST)["tensors"]))[0] == "text_encoder_1"
    with torch.device("meta"):
        vision = CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=2))      # CLIP-L's vision tower, as published
        full = CLIPModel(CLIPConfig())
    vision_keys = [k if k.startswith("vision_model.") else "vision_model." + k for k in vision.state_dict()]
    for keys in (vision_keys, list(full.state_dict())):
        assert detect_component(keys)[0] not in ("flux_redux_image_encoder", "text_encoder_1")


def test_the_loader_refuses_siglip_as_clip_and_clip_as_siglip(sparse_files):
    with pytest.raises(ModelFileError) as e:
        load_models([sparse_files["siglip"]], device="meta", expect={sparse_files["siglip"]: "text_encoder_1"})
    assert "SigLIP" in str(e.value) and ROLES["text_encoder_1"].loader_name in str(e.value)
    with pytest.raises(ModelFileError) as e:
        load_models([sparse_files["clip"]], device="meta", expect={sparse_files["clip"]: "flux_redux_image_encoder"})
    assert "CLIP text encoder" in str(e.value) and ENCODER_NAME in str(e.value)
    with pytest.raises(ModelFileError) as e:   # no slot named: the whole SigLIP is still not loaded as anything
        load_models([sparse_files["siglip"]], device="meta")
    assert "SigLIP" in str(e.value) and str(sparse_files["siglip"]) in str(e.value)
    with pytest.raises(ModelFileError) as e:
        load_models([sparse_files["embedder"]], device="meta", expect={sparse_files["embedder"]: "vae"})
    assert "Redux image embedder" in str(e.value)


# ------------------------------------------------------------------------------------------------ small files

ENC_CFG = dict(hidden_size=144, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=384,
               patch_size=14)
TEXT_WIDTH = 32              # the tiny transformer's joint_attention_dim (T5 width)


@pytest.fixture(scope="session")
def redux_modules():
    """A small SigLIP vision tower and Redux embedder built directly from the library classes (not our loader)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(1)
    enc = SiglipVisionModel(SiglipVisionConfig(**ENC_CFG)).eval()
    emb = ReduxImageEncoder(redux_dim=ENC_CFG["hidden_size"], txt_in_features=TEXT_WIDTH).eval()
    with torch.no_grad():   # tokens about as large as T5's (std ~1, not ~0.2), so the image prompt shows
        emb.redux_down.weight.mul_(5)
    return enc, emb


def official_encoder_sd(enc) -> dict:
    """The file's layout: every tensor under ``vision_model.`` (transformers 5 names them without it)."""
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v.detach().clone()
            for k, v in enc.state_dict().items() if not k.endswith("position_ids")}


@pytest.fixture(scope="session")
def redux_files(redux_modules, tmp_path_factory):
    """The small modules saved in the official layouts: <models>/black-forest-labs/FLUX.1-Redux-dev/..."""
    from safetensors.torch import save_file
    enc, emb = redux_modules
    models = tmp_path_factory.mktemp("redux-models")
    folder = models / "black-forest-labs" / "FLUX.1-Redux-dev"
    (folder / "image_encoder").mkdir(parents=True)
    (folder / "image_embedder").mkdir()
    save_file(official_encoder_sd(enc), str(folder / "image_encoder" / "model.safetensors"))
    save_file({k: v.detach().clone() for k, v in emb.state_dict().items()},
              str(folder / "image_embedder" / "diffusion_pytorch_model.safetensors"))
    return models


def redux_configs():
    from engine import ModelConfig
    return [ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="image_encoder/model.safetensors"),
            ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev",
                        origin_file_pattern="image_embedder/diffusion_pytorch_model.safetensors")]


def test_small_files_load_with_the_same_outputs(redux_modules, redux_files):
    enc, emb = redux_modules
    folder = redux_files / "black-forest-labs" / "FLUX.1-Redux-dev"
    out = load_models([folder / "image_encoder" / "model.safetensors",
                       folder / "image_embedder" / "diffusion_pytorch_model.safetensors"], torch_dtype=torch.float32)
    mine_enc, mine_emb = out["flux_redux_image_encoder"], out["flux_redux_image_embedder"]
    assert mine_enc.config.num_attention_heads == 2 and mine_enc.config.image_size == 384   # head width 72
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        want = emb(enc(pixel_values=x).last_hidden_state).image_embeds
        got = mine_emb(mine_enc(pixel_values=x).last_hidden_state).image_embeds
    assert want.shape == (1, 729, TEXT_WIDTH)
    assert torch.equal(want, got)


def test_config_json_beside_the_encoder_gives_its_heads(redux_modules, tmp_path):
    sd = official_encoder_sd(redux_modules[0])
    assert redux_model.infer_siglip_config(sd)["num_attention_heads"] == 2
    cfg = redux_model.infer_siglip_config(sd, {"model_type": "siglip_vision_model", "num_attention_heads": 4})
    assert cfg["num_attention_heads"] == 4
    # a config.json of another kind says nothing about the tower
    assert redux_model.infer_siglip_config(sd, {"model_type": "clip_text_model", "num_attention_heads": 4}
                                           )["num_attention_heads"] == 2


def test_a_broken_embedder_is_named(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"redux_up.weight": torch.zeros(30, 8), "redux_up.bias": torch.zeros(30),
               "redux_down.weight": torch.zeros(16, 30), "redux_down.bias": torch.zeros(16)}, str(path))
    with pytest.raises(ModelFileError) as e:
        load_models([path])
    assert str(path) in str(e.value) and "redux_up" in str(e.value)


# ------------------------------------------------------------------------------------------------ the condition

@pytest.fixture(scope="session")
def base_modules(demo_tokenizers):
    """Small random FLUX components from the library classes (T5 width 32, pooled 64), as the other parity tests."""
    return tiny_flux_modules(demo_tokenizers, text_width=TEXT_WIDTH)


@pytest.fixture(scope="session")
def redux_pipe(base_modules, redux_files, demo_tokenizers):
    """Our pipeline: the Redux files through from_pretrained, the base modules installed beside them."""
    from engine.pipeline import FluxImagePipeline
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=redux_configs(),
                                             models_dir=redux_files)
    assert {"flux_redux_image_encoder", "flux_redux_image_embedder"} <= set(pipe.installed_models())
    pipe.set_models(dict(base_modules))
    pipe.tokenizer_1, pipe.tokenizer_2 = demo_tokenizers
    return pipe


@pytest.fixture(scope="session")
def photos():
    return smooth_photo(300, 200, 3), smooth_photo(160, 240, 4)


def context(pipe, t5_len=T5_LEN):
    from engine.conditions.base import ConditionContext
    return ConditionContext(pipe, H, W, torch.device("cpu"), torch.float32, sched.flux_sigmas(STEPS), None,
                            t5_sequence_length=t5_len)


def prepare(pipe, **args):
    from engine.conditions.redux import ReduxCondition
    full = dict(ReduxCondition.call_args)
    full.update(args)
    return ReduxCondition.prepare(context(pipe), full)


def reference_tokens(redux_modules, image):
    """The embedder's tokens for one image, as diffusers' prior makes them (SiglipImageProcessor at 384)."""
    from transformers import SiglipImageProcessor
    enc, emb = redux_modules
    pixels = SiglipImageProcessor(size={"height": 384, "width": 384}).preprocess(
        images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True).pixel_values
    with torch.no_grad():
        return emb(enc(pixel_values=pixels).last_hidden_state).image_embeds


def test_seed_text_is_zeros_then_the_image_tokens_in_both_passes(redux_pipe, redux_modules, photos):
    c = prepare(redux_pipe, flux_redux_image=photos[0])
    assert c.replaces_prompt                          # CLIP and T5 need not run
    pos, neg = c.prompt_text(None, 0, False), c.prompt_text(None, 0, True)
    assert pos is neg
    assert pos.embeds.shape == (1, T5_LEN + 729, TEXT_WIDTH)
    assert not pos.embeds[:, :T5_LEN].any() and not pos.pooled.any() and not pos.ids.any()
    assert pos.pooled.shape == (1, 64) and pos.ids.shape == (T5_LEN + 729, 3)
    ref = reference_tokens(redux_modules, photos[0])
    assert (pos.embeds[:, T5_LEN:] - ref).abs().max() < 1e-4          # same preprocessing as diffusers' prior
    assert prepare(redux_pipe, flux_redux_image=photos[0]).prompt_text(None, 2, False).embeds.shape[1] == 1241


def test_strength_scales_the_tokens_and_several_images_concatenate(redux_pipe, photos):
    a = prepare(redux_pipe, flux_redux_image=photos[0]).tokens
    b = prepare(redux_pipe, flux_redux_image=photos[1]).tokens
    assert not torch.allclose(a, b)
    half = prepare(redux_pipe, flux_redux_image=photos[0], flux_redux_strength=0.5).tokens
    assert torch.allclose(half, 0.5 * a, atol=1e-6)
    both = prepare(redux_pipe, flux_redux_image=list(photos), flux_redux_strength=[1.0, 2.0]).tokens
    assert both.shape == (1, 2 * 729, TEXT_WIDTH)
    assert torch.allclose(both[:, :729], a) and torch.allclose(both[:, 729:], 2 * b, atol=1e-6)
    one = prepare(redux_pipe, flux_redux_image=list(photos), flux_redux_strength=0.25).tokens
    assert torch.allclose(one[:, 729:], 0.25 * b, atol=1e-6)


def test_keep_prompt_appends_to_the_prompt_and_leaves_the_negative(redux_pipe, photos):
    from engine.conditions.base import Text
    c = prepare(redux_pipe, flux_redux_image=photos[0], flux_redux_keep_prompt=True)
    assert not c.replaces_prompt
    prompt = Text(torch.randn(1, 20, TEXT_WIDTH), torch.randn(1, 64), torch.zeros(20, 3))
    negative = Text(torch.randn(1, 20, TEXT_WIDTH), torch.randn(1, 64), torch.zeros(20, 3))
    pos = c.prompt_text(prompt, 0, False)
    assert torch.equal(pos.embeds[:, :20], prompt.embeds) and torch.equal(pos.embeds[:, 20:], c.tokens)
    assert pos.pooled is prompt.pooled and pos.ids.shape == (20 + 729, 3) and not pos.ids.any()
    assert c.prompt_text(negative, 0, True) is negative


def test_extra_tokens_count_729_per_image(photos):
    from engine.conditions.redux import ReduxCondition
    assert ReduxCondition.extra_tokens({"flux_redux_image": photos[0]}, W, H) == 729
    assert ReduxCondition.extra_tokens({"flux_redux_image": list(photos)}, W, H) == 2 * 729
    assert ReduxCondition.extra_tokens({"flux_redux_image": None}, W, H) == 0


def test_bad_inputs_are_named(redux_pipe, base_modules, photos):
    from engine.pipeline import FluxImagePipeline
    with pytest.raises(EngineError, match="not a PIL image"):
        prepare(redux_pipe, flux_redux_image="photo.png")
    with pytest.raises(EngineError, match=r"flux_redux_image\[1\]"):
        prepare(redux_pipe, flux_redux_image=[photos[0], 3])
    for bad in (3.0, -0.1, "1", True, float("nan")):
        with pytest.raises(EngineError, match="flux_redux_strength"):
            prepare(redux_pipe, flux_redux_image=photos[0], flux_redux_strength=bad)
    with pytest.raises(EngineError, match="2 values for 1 image"):
        prepare(redux_pipe, flux_redux_image=photos[0], flux_redux_strength=[1.0, 1.0])
    plain = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    plain.set_models(dict(base_modules))
    with pytest.raises(EngineError) as e:
        prepare(plain, flux_redux_image=photos[0])
    for pattern in ("image_encoder/model.safetensors", "image_embedder/diffusion_pytorch_model.safetensors"):
        assert f'ModelConfig(model_id="black-forest-labs/FLUX.1-Redux-dev", origin_file_pattern="{pattern}")' in str(
            e.value)


# ------------------------------------------------------------------------------------- parity with diffusers

def prior_pipe(redux_modules, base_modules=None, tokenizers=None):
    from diffusers import FluxPriorReduxPipeline
    from transformers import SiglipImageProcessor
    enc, emb = redux_modules
    text = {}
    if base_modules is not None:
        text = dict(text_encoder=base_modules["text_encoder_1"], tokenizer=tokenizers[0],
                    text_encoder_2=base_modules["text_encoder_2"], tokenizer_2=tokenizers[1])
    return FluxPriorReduxPipeline(image_encoder=enc, image_embedder=emb, **text,
                                  feature_extractor=SiglipImageProcessor(size={"height": 384, "width": 384}))


def flux_pipe(base_modules, tokenizers=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    scheduler = FlowMatchEulerDiscreteScheduler(shift=sched.SEED_SHIFT, use_dynamic_shifting=False)
    text = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if tokenizers is not None:
        text = dict(text_encoder=base_modules["text_encoder_1"], tokenizer=tokenizers[0],
                    text_encoder_2=base_modules["text_encoder_2"], tokenizer_2=tokenizers[1])
    return FluxPipeline(scheduler=scheduler, vae=base_modules["vae"], transformer=base_modules["dit"], **text)


def reference_run(base_modules, prior_out, seed, tokenizers=None, **kw):
    """diffusers' (image, final latents (1, 16, H/8, W/8)) for the prior's text."""
    from engine import latents as lat
    pipe = flux_pipe(base_modules, tokenizers)
    args = dict(prompt_embeds=prior_out.prompt_embeds, pooled_prompt_embeds=prior_out.pooled_prompt_embeds, height=H,
                width=W, num_inference_steps=STEPS, sigmas=sched.unshifted_sigmas(STEPS, 1.0).tolist(),
                guidance_scale=3.5, **kw)
    image = pipe(**args, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    z = pipe(**args, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
    return image, lat.unpack(z, H, W)


def our_run(pipe, **kw):
    """Our (image, final latents) for one call."""
    seen = {}
    decode = pipe.decode_latents
    pipe.decode_latents = lambda z, *a, **k: decode(seen.setdefault("z", z), *a, **k)
    try:
        image = pipe(height=H, width=W, num_inference_steps=STEPS, progress_bar_cmd=no_bar, **kw)
    finally:
        del pipe.decode_latents
    return image, seen["z"]


def assert_same(ours, ref):
    (image, z), (ref_image, ref_z) = ours, ref
    diff = np.abs(as_array(image) - as_array(ref_image))
    assert image.size == ref_image.size == (W, H)
    assert diff.max() <= PIXEL_BOUND, f"max pixel difference {diff.max()}"
    assert (z - ref_z).abs().max().item() <= LATENT_BOUND
    assert as_array(image).std() > 5                  # not trivially constant


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_image_prompt_matches_diffusers_prior_redux(redux_pipe, redux_modules, base_modules, photos, strength):
    """The seed's behaviour against FluxPriorReduxPipeline -> FluxPipeline. Without text encoders diffusers' prior
    pads with zeros 4096 wide (the real T5 width), which the 32-wide tiny transformer cannot read; the same zeros at
    the tiny width go in through its ``prompt_embeds`` (512 tokens, pooled 64), and its scale is our strength."""
    from engine.pipeline import FluxImagePipeline
    no_text = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)       # CLIP and T5 are not needed
    no_text.set_models({r: m for r, m in redux_pipe.installed_models().items() if not r.startswith("text_encoder")})
    ours = our_run(no_text, flux_redux_image=photos[0], flux_redux_strength=strength, seed=7, embedded_guidance=3.5)
    # The prior is given (unused) text encoders only so that it takes our zeros instead of its 4096-wide ones.
    prior = prior_pipe(redux_modules, base_modules, (None, None))
    out = prior(photos[0], prompt_embeds=torch.zeros(1, T5_LEN, TEXT_WIDTH), pooled_prompt_embeds=torch.zeros(1, 64),
                prompt_embeds_scale=strength, pooled_prompt_embeds_scale=strength)
    assert out.prompt_embeds.shape == (1, T5_LEN + 729, TEXT_WIDTH)
    assert_same(ours, reference_run(base_modules, out, 7))
    # The image prompt acts, far beyond the bound (the tiny transformer reads its text weakly: pixels move little).
    other = our_run(no_text, flux_redux_image=photos[1], flux_redux_strength=strength, seed=7)
    assert (other[1] - ours[1]).abs().max().item() > 100 * LATENT_BOUND


def test_cfg_with_the_seed_text_reads_it_in_both_passes(redux_pipe, photos):
    plain = our_run(redux_pipe, flux_redux_image=photos[0], seed=5)
    cfg = our_run(redux_pipe, flux_redux_image=photos[0], seed=5, cfg_scale=4.0, prompt="ignored",
                  negative_prompt="also ignored")
    assert torch.equal(plain[1], cfg[1])              # v_neg == v, so v_neg + 4 (v - v_neg) is v exactly


def test_keep_prompt_matches_diffusers_prior_with_text_encoders(redux_pipe, redux_modules, base_modules, photos,
                                                                demo_tokenizers):
    prompt = "a red fox in the snow"
    ours = our_run(redux_pipe, prompt=prompt, flux_redux_image=photos[0], flux_redux_keep_prompt=True, seed=11)
    out = prior_pipe(redux_modules, base_modules, demo_tokenizers)(photos[0], prompt=prompt)
    assert out.prompt_embeds.shape == (1, T5_LEN + 729, TEXT_WIDTH) and out.pooled_prompt_embeds.abs().sum() > 0
    assert_same(ours, reference_run(base_modules, out, 11))
    # the prompt counts: the seed's behaviour (prompt replaced) gives another picture
    replaced = our_run(redux_pipe, prompt=prompt, flux_redux_image=photos[0], seed=11)
    assert (replaced[1] - ours[1]).abs().max().item() > 100 * LATENT_BOUND


def test_keep_prompt_with_cfg_steers_away_from_the_negative_prompt_alone(redux_pipe, photos):
    """diffusers' FluxPipeline refuses a negative text of another length than the positive, so this is ours alone:
    the negative pass reads the negative prompt without the image tokens, and CFG then acts (with the seed's text it
    changes nothing, both passes reading the same)."""
    kw = dict(prompt="a red fox", negative_prompt="blurry", flux_redux_image=photos[0], seed=11)
    plain = our_run(redux_pipe, flux_redux_keep_prompt=True, **kw)
    cfg = our_run(redux_pipe, flux_redux_keep_prompt=True, cfg_scale=3.0, **kw)
    assert np.abs(as_array(cfg[0]) - as_array(plain[0])).max() > 10
    texts = []
    real = redux_pipe.encode_text
    redux_pipe.encode_text = lambda text, *a: texts.append(text) or real(text, *a)
    try:
        our_run(redux_pipe, flux_redux_keep_prompt=True, cfg_scale=3.0, **kw)
    finally:
        del redux_pipe.encode_text
    assert sorted(texts) == ["a red fox", "blurry"]


# ------------------------------------------------------------------------------------------------ the demo

def test_demo_files_load_through_from_pretrained_and_change_the_image(demo_dir, tmp_path, photos):
    from engine import ModelConfig
    from engine.demo.redux import EMBEDDER_FILE, ENCODER_FILE, MODEL_ID, write_redux_demo
    from engine.pipeline import FluxImagePipeline
    from engine.registry import get_adapter
    from tests.helpers import official_models_dir
    models = official_models_dir(tmp_path / "models", demo_dir)
    folder = write_redux_demo(models)
    spec = get_adapter("FLUX.1-Redux-dev", demo=True)
    assert {f.model_id for f in spec.files} == {MODEL_ID} and {f.pattern for f in spec.files} == {ENCODER_FILE,
                                                                                                 EMBEDDER_FILE}
    stamp = (folder / ENCODER_FILE).stat().st_mtime_ns
    assert write_redux_demo(models) == folder and (folder / ENCODER_FILE).stat().st_mtime_ns == stamp   # once
    dev = "black-forest-labs/FLUX.1-dev"
    configs = [ModelConfig(model_id=dev, origin_file_pattern=p) for p in (
        "flux1-dev.safetensors", "ae.safetensors", "text_encoder/model.safetensors", "text_encoder_2/*.safetensors")]
    configs += [ModelConfig(model_id=f.model_id, origin_file_pattern=f.pattern) for f in spec.files]
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=configs,
                                             models_dir=models)
    assert type(pipe.flux_redux_image_encoder).__name__ == "SiglipVisionModel"
    assert type(pipe.flux_redux_image_embedder).__name__ == "ReduxImageEncoder"
    kw = dict(prompt="a cat", height=H, width=W, seed=2, num_inference_steps=2, progress_bar_cmd=no_bar)
    with_image = pipe(flux_redux_image=photos[0], **kw)
    without = pipe(**kw)
    assert np.abs(as_array(with_image) - as_array(without)).max() > 10
    kept = pipe(flux_redux_image=photos[0], flux_redux_keep_prompt=True, **kw)
    assert np.abs(as_array(kept) - as_array(with_image)).max() > 10


# ---------------------------------------------------------------------------------------------------------------
# The studio: the image prompt as a feature (studio.features.redux), and the Generate tab's control in a browser
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_image(studio):
    """An image prompt inside a folder the studio reads (its models folder)."""
    import pathlib
    folder = pathlib.Path(studio.engine.models_dir) / "image-prompts"
    folder.mkdir(exist_ok=True)
    path = folder / "robot.png"
    smooth_photo(300, 200, seed=5).save(path)
    return path


def studio_job(**extra) -> dict:
    return {**dict(variant="FLUX.1-dev-random-demo", prompt="", width=64, height=64, num_inference_steps=2, seed=11),
            **extra}


def test_the_studio_runs_an_image_prompt_records_it_and_restores_it(studio, prompt_image):
    import pathlib
    from app.recipe_text import recipe_text
    engine = studio.engine
    plain = engine.generate(studio_job())[0]
    [result] = engine.generate(studio_job(flux_redux_image=str(prompt_image), flux_redux_strength=1.5))
    assert engine.models.pipe.flux_redux_image_encoder is not None and engine.models.pipe.flux_redux_image_embedder is not None
    a, b = as_array(Image.open(plain["path"])), as_array(Image.open(result["path"]))
    assert np.abs(a - b).max() > 0, "the image prompt changed nothing"
    # The recipe names the image (its copy beside the result) and the strength; the Redux files are among the model's.
    recipe = result["recipe"]
    [entry] = recipe["flux_redux_image"]
    assert entry["file"] == "robot.png" and entry["size"] == [300, 200] and recipe["flux_redux_strength"] == 1.5
    copy = pathlib.Path(result["path"]).with_name(pathlib.Path(result["path"]).stem + entry["copy"])
    assert copy.is_file() and Image.open(copy).size == (300, 200)
    assert {"flux_redux_image_encoder", "flux_redux_image_embedder"} <= set(recipe["model_files"])
    text = recipe_text(recipe)
    assert "Image prompt (Redux), strength 1.5:" in text and "robot.png" in text
    # Restoring points the image prompt at the copy, with the strength.
    restored = engine.read_recipe(result["path"])
    assert restored["flux_redux_image"] == [str(copy)] and restored["flux_redux_strength"] == 1.5
    # Redone from the restored settings: the same image.
    [again] = engine.generate({k: v for k, v in restored.items() if k != "sigma_shift"})
    assert np.array_equal(as_array(Image.open(again["path"])), b)
    # A job without an image prompt empties the Redux slots (their memory is given back) and gives the plain image.
    [plain_again] = engine.generate(studio_job())
    assert engine.models.pipe.flux_redux_image_encoder is None and engine.models.pipe.flux_redux_image_embedder is None
    assert np.array_equal(as_array(Image.open(plain_again["path"])), a)


def test_a_prompt_and_the_image_both_count(studio, prompt_image):
    """With a prompt, the image's tokens follow the prompt's (keep_prompt): the prompt still changes the image."""
    engine = studio.engine
    one = engine.generate(studio_job(prompt="a red house", flux_redux_image=str(prompt_image)))[0]
    two = engine.generate(studio_job(prompt="a blue lake", flux_redux_image=str(prompt_image)))[0]
    assert np.abs(as_array(Image.open(one["path"])) - as_array(Image.open(two["path"]))).max() > 0


@pytest.mark.parametrize("extra, words", [
    ({"flux_redux_strength": 3}, "strength must be a number from 0 to 2"),
    ({"flux_redux_strength": "strong"}, "strength must be a number"),
    ({"variant": "Step1X-Edit-random-demo"}, "cannot take an image prompt"),
])
def test_bad_image_prompts_are_refused_by_name(studio, prompt_image, extra, words):
    from engine.errors import EngineError
    job = {**studio_job(flux_redux_image=str(prompt_image)), **extra}
    with pytest.raises(EngineError, match=words):
        studio.engine.validate(job)


def test_an_image_prompt_outside_the_studio_folders_is_refused(studio, tmp_path):
    from engine.errors import EngineError
    outside = tmp_path.parent.parent / "elsewhere.png"
    with pytest.raises(EngineError, match="image prompt"):
        studio.engine.validate(studio_job(flux_redux_image=str(outside)))


def test_image_prompt_in_the_browser(browser, studio, prompt_image, tmp_path):
    from tests.browser import set_number, studio_page
    with studio_page(browser, studio.url, 60_000) as page:
        page.locator("#gen-prompt textarea").fill("")
        for elem, value in (("gen-width", 64), ("gen-height", 64), ("gen-steps", 2), ("gen-seed", 2024)):
            set_number(page, elem, value)
        page.locator("#gen-references").click()                       # Reference images
        page.get_by_role("tab", name="Image prompt (Redux)").click()
        page.locator("#gen-redux-image input[type='file']").set_input_files(str(prompt_image))
        page.wait_for_selector("#gen-redux-image img")
        set_number(page, "gen-redux-strength", 1.25)
        page.locator("#gen-generate").click()
        page.wait_for_function("document.querySelector('#selected-info textarea').value.includes('Seed: 2024,')",
                               timeout=90_000)
        info = page.locator("#selected-info textarea").input_value()
        assert "Image prompt (Redux), strength 1.25:" in info and "robot.png" in info
        page.screenshot(path=str(tmp_path / "redux-generated.png"), full_page=True)
        # Change the strength and clear the image, then restore both from the result.
        set_number(page, "gen-redux-strength", 0.3)
        page.locator("#gen-redux-image button[aria-label='Remove Image']").first.click()
        page.wait_for_selector("#gen-redux-image img", state="detached")
        page.locator("#restore-selected").click()
        page.wait_for_selector("#gen-redux-image img")
        page.wait_for_function("document.querySelector('#gen-redux-strength input[type=number]').value === '1.25'")
        src = page.locator("#gen-redux-image img").first.get_attribute("src")
        assert "red0.png" in src, src
