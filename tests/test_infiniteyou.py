"""ByteDance InfiniteYou: its two files (manifests on meta, loading by content), the projector against the
references' math written out here, InfuseNet against diffusers' ``FluxControlNetModel`` fed the same identity
tokens, a whole image against a loop written out here (diffusers' transformer + ControlNet, same noise), the face
embedder's interface (replaceable, .npy / tensor input, no face, several faces, insightface absent), the studio
on the demo (recipe, copies, restore) and the engine staying usable after errors.

Small models: the random-weight demo twin (engine.demo.infiniteyou: projector 128 wide, InfuseNet 4 + 10 blocks at
the FLUX.1 demo's widths) with the FLUX.1 demo, float32 on the CPU.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import EngineError
from engine.infiniteyou import face as face_mod
from engine.infiniteyou import model as iy
from tests.helpers import smooth_photo

pytestmark = pytest.mark.filterwarnings("ignore")

DT = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
IY = "adapters/ByteDance--InfiniteYou/infu_flux_v1.0/aes_stage2/"
H = W = 64
STEPS = 3
EMB = torch.from_numpy(np.random.default_rng(7).standard_normal(512).astype(np.float32))
EMB = EMB / EMB.norm()


def meta_sd(m):
    return {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}


def run(pipe, **kw):
    args = dict(prompt="a portrait", seed=3, num_inference_steps=STEPS, height=H, width=W,
                progress_bar_cmd=lambda it: it)
    return pipe(**{**args, **kw})


def as_array(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def models_root(demo_dir):
    from engine.demo import write_infiniteyou_demo
    root = demo_dir.parents[1]
    write_infiniteyou_demo(root)
    return root


@pytest.fixture(scope="module")
def pipe(demo_dir, models_root):
    from engine import FluxImagePipeline, ModelConfig
    iy_id = "FLUX-Studio/InfiniteYou-random-demo"
    d = demo_dir
    return FluxImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(path=d / "flux1-dev.safetensors"), ModelConfig(path=d / "ae.safetensors"),
                       ModelConfig(path=d / "text_encoder" / "model.safetensors"),
                       ModelConfig(path=d / "text_encoder_2"),
                       ModelConfig(model_id=iy_id, origin_file_pattern="infu_flux_v1.0/aes_stage2/image_proj_model.bin",
                                   local_model_path=models_root),
                       ModelConfig(model_id=iy_id, local_model_path=models_root,
                                   origin_file_pattern="infu_flux_v1.0/aes_stage2/InfuseNetModel/*.safetensors")],
        tokenizer_1_config=ModelConfig(path=d / "tokenizer"), tokenizer_2_config=ModelConfig(path=d / "tokenizer_2"))


@pytest.fixture(scope="module")
def plain(pipe):
    return run(pipe)


@pytest.fixture(scope="module")
def with_identity(pipe):
    return run(pipe, infinityou_id_image=EMB)


# ------------------------------------------------------------------------------------------------ manifests

def test_projector_manifest_maps_one_to_one(manifests_dir):
    m = json.loads((manifests_dir / (IY + "image_proj_model.bin.json")).read_text())
    sd = iy.unwrap(meta_sd(m))
    assert iy.is_id_projector(sd) and iy.is_id_projector(m["tensors"])
    cfg = iy.infer_projector_config(sd)
    assert cfg == dict(dim=1280, depth=4, heads=20, inner=1280, num_queries=8, embedding_dim=512, output_dim=4096,
                       ff_hidden=5120)
    with torch.device("meta"):
        model = iy.build_projector(cfg)
    params = model.state_dict()
    assert params.keys() == sd.keys(), (sorted(params.keys() - sd.keys())[:5], sorted(sd.keys() - params.keys())[:5])
    assert not [k for k in sd if tuple(sd[k].shape) != tuple(params[k].shape)]
    assert sum(t.numel() for t in params.values()) == m["param_count"] == 84_595_968
    # the IP-Adapter's file (image_proj beside ip_adapter) is not taken for it
    ipa = json.loads((manifests_dir / "adapters/InstantX--FLUX.1-dev-IP-Adapter/ip-adapter.bin.json").read_text())
    assert not iy.is_id_projector(ipa["tensors"])


def test_infusenet_manifest_maps_one_to_one_and_is_told_from_other_controlnets(manifests_dir):
    from engine.controlnet.config import build_controlnet, infer_controlnet_config
    m = json.loads((manifests_dir / (IY + "InfuseNetModel/diffusion_pytorch_model.safetensors.json")).read_text())
    sd = meta_sd(m)
    assert iy.is_infusenet(sd)
    cfg = infer_controlnet_config(sd)
    k = cfg["kwargs"]
    assert (k["num_layers"], k["num_single_layers"], k["joint_attention_dim"], k["guidance_embeds"], k["num_mode"],
            cfg["cond_channels"]) == (4, 10, 4096, True, None, 64)
    with torch.device("meta"):
        model = build_controlnet(cfg)
    params = model.state_dict()
    assert params.keys() == sd.keys()
    assert not [key for key in sd if tuple(sd[key].shape) != tuple(params[key].shape)]
    assert sum(t.numel() for t in params.values()) == m["param_count"] == 2_952_654_336
    for other in ("InstantX--FLUX.1-dev-Controlnet-Union-alpha", "jasperai--Flux.1-dev-Controlnet-Upscaler",
                  "alimama-creative--FLUX.1-dev-Controlnet-Inpainting-Beta"):
        [path] = list((manifests_dir / "adapters" / other).rglob("*.json"))
        assert not iy.is_infusenet(meta_sd(json.loads(path.read_text()))), other


def test_the_pipeline_loads_both_files_by_content_into_their_roles(pipe):
    from diffusers import FluxControlNetModel
    assert isinstance(pipe.infinityou_image_projector, iy.IdProjector)
    assert isinstance(pipe.infinityou_infusenet, FluxControlNetModel) and pipe.controlnet is None
    assert {"infinityou_image_projector", "infinityou_infusenet"} <= set(pipe.plan.entries)
    assert pipe.plan.entries["infinityou_infusenet"].label == "InfiniteYou InfuseNet"
    assert isinstance(pipe.infinityou_face_embedder, face_mod.InsightFaceEmbedder)


class Smuggled:
    """An arbitrary object in a pickle: torch.load(weights_only=True) refuses to rebuild it."""


def test_the_projector_file_is_read_with_weights_only(models_root, tmp_path):
    """A pickle holding an object (not plain tensors) is refused, never unpickled."""
    from engine.loading import ModelFileError
    bad = tmp_path / "image_proj_model.bin"
    torch.save({"image_proj": {"latents": Smuggled()}}, bad)
    with pytest.raises(ModelFileError, match="weights_only"):
        iy.load_projector(bad)


def test_the_memory_planner_sizes_both_like_the_modules_and_keeps_infusenet_beside_the_dit(manifests_dir):
    """Sizes read from the manifests equal those of the modules built on meta (fp8 rules included); InfuseNet is
    planned as a ControlNet: on the device in the transformer's stage."""
    from engine import memory as vram
    from engine.controlnet.config import build_controlnet, infer_controlnet_config
    paths = {"dit": manifests_dir / "FLUX.1-dev" / "flux1-dev.safetensors.json",
             "infinityou_image_projector": manifests_dir / (IY + "image_proj_model.bin.json"),
             "infinityou_infusenet": manifests_dir / (IY + "InfuseNetModel/diffusion_pytorch_model.safetensors.json")}
    sizes = vram.sizes_from_manifests(paths)
    proj_sd = iy.unwrap(meta_sd(json.loads(paths["infinityou_image_projector"].read_text())))
    net_sd = meta_sd(json.loads(paths["infinityou_infusenet"].read_text()))
    with torch.device("meta"):
        modules = {"infinityou_image_projector": iy.build_projector(iy.infer_projector_config(proj_sd)),
                   "infinityou_infusenet": build_controlnet(infer_controlnet_config(net_sd))}
    for role, module in modules.items():
        got, want = vram.sizes_from_module(role, module), sizes[role]
        assert (got.params, got.largest_layer, dict(got.dims)) == \
               (want.params, want.largest_layer, dict(want.dims)), role
    # fp8 storage (InfuseNet only: the projector is resident or offloaded) casts the same blocks either way
    got = vram.sizes_from_module("infinityou_infusenet", modules["infinityou_infusenet"])
    assert got.fp8_params == sizes["infinityou_infusenet"].fp8_params > 0 and got.blocks == sizes[
        "infinityou_infusenet"].blocks
    assert sizes["infinityou_infusenet"].dims == {"hidden": 3072, "outputs": 14}
    p = vram.plan(sizes, device="cuda", vram_limit_gb=None)
    both = p.entries["dit"].vram_bytes + p.entries["infinityou_infusenet"].vram_bytes
    assert p.entries["infinityou_infusenet"].strategy == "resident" and p.stage_peaks_gb["dit"] * vram.GiB > both
    tight = vram.plan(sizes, device="cuda", vram_limit_gb=20)
    assert tight.fits and tight.predicted_peak_vram_gb <= 20


# ------------------------------------------------------------------------------------------------ parity

def reference_projector(sd, emb, heads):
    """DiffSynth-Studio's InfiniteYouImageProjector / bytedance's Resampler, written out."""
    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])
    x = F.linear(emb, sd["proj_in.weight"], sd["proj_in.bias"])
    latents = sd["latents"].repeat(emb.shape[0], 1, 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    for i in range(depth):
        p = f"layers.{i}.0."
        xn, ln_ = ln(x, p + "norm1"), ln(latents, p + "norm2")
        q = F.linear(ln_, sd[p + "to_q.weight"])
        k, v = F.linear(torch.cat((xn, ln_), dim=-2), sd[p + "to_kv.weight"]).chunk(2, dim=-1)
        b, n, _ = q.shape
        q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        w = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
        out = (w @ v).permute(0, 2, 1, 3).reshape(b, n, -1)
        latents = F.linear(out, sd[p + "to_out.weight"]) + latents
        f = f"layers.{i}.1."
        y = F.linear(F.gelu(F.linear(ln(latents, f + "0"), sd[f + "1.weight"])), sd[f + "3.weight"])
        latents = y + latents
    return ln(F.linear(latents, sd["proj_out.weight"], sd["proj_out.bias"]), "norm_out")


def test_projector_matches_the_reference_math(pipe):
    from engine.demo.infiniteyou import PROJECTOR, projector_state_dict
    sd = {k: v.float() for k, v in projector_state_dict().items()}
    ours = pipe.infinityou_image_projector(EMB[None, None])
    ref = reference_projector(sd, EMB[None, None], PROJECTOR["heads"])
    diff = (ours - ref).abs().max().item()
    print(f"projector max |diff| = {diff:.2e}")
    assert ours.shape == (1, 8, 32) and diff < 1e-5


def reference_infusenet():
    """diffusers' FluxControlNetModel built here from the demo's dimensions, the demo file's tensors loaded."""
    from diffusers import FluxControlNetModel
    from engine.demo.infiniteyou import infusenet_state_dict
    net = FluxControlNetModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=10, attention_head_dim=32,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=64,
                              guidance_embeds=True, axes_dims_rope=(4, 14, 14)).eval()
    net.load_state_dict({k: v.float() for k, v in infusenet_state_dict().items()}, strict=True)
    return net


def test_infusenet_residuals_match_diffusers_fed_the_same_identity_tokens(pipe):
    from engine import latents as lat
    from engine.conditions import ConditionContext, StepState
    from engine.conditions.infiniteyou import InfiniteYouCondition
    from engine.scheduler import flux_sigmas
    sigmas = flux_sigmas(STEPS, 1.0, None, "seed", image_seq_len=16)
    ctx = ConditionContext(pipe, H, W, torch.device("cpu"), torch.float32, sigmas, pipe.encode_image,
                           encode_prompt=pipe.encode_text)
    cond = InfiniteYouCondition.prepare(ctx, {"infinityou_id_image": EMB, "infinityou_guidance": 1.5})
    text = pipe.encode_text("a portrait")
    latents = lat.pack(lat.initial_noise(H, W, 5))
    ids = lat.image_ids(H, W)
    t = sigmas[1].reshape(1)
    state = StepState(step=1, negative=False, latents=latents, latent_ids=ids, hidden_states=latents, image_ids=ids,
                      timestep=t, guidance=torch.full((1,), 3.5), text=text)
    ours = cond.dit_kwargs(state)
    tokens = reference_projector({k: v.float() for k, v in __import__(
        "engine.demo.infiniteyou", fromlist=["x"]).projector_state_dict().items()}, EMB[None, None], 2)
    black = pipe.vae.encode(-torch.ones(1, 3, H, W)).latent_dist.mean
    from diffusers import FluxPipeline
    control = FluxPipeline._pack_latents((black - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor,
                                         1, 16, H // 8, W // 8)
    with torch.no_grad():
        ref_double, ref_single = reference_infusenet()(
            hidden_states=latents, controlnet_cond=control, conditioning_scale=1.0, encoder_hidden_states=tokens,
            pooled_projections=text.pooled, timestep=t, img_ids=ids, txt_ids=torch.zeros(8, 3),
            guidance=torch.full((1,), 1.5), return_dict=False)
        loaded = pipe.infinityou_infusenet(
            hidden_states=latents, controlnet_cond=control, conditioning_scale=1.0, encoder_hidden_states=tokens,
            pooled_projections=text.pooled, timestep=t, img_ids=ids, txt_ids=torch.zeros(8, 3),
            guidance=torch.full((1,), 1.5), return_dict=False)
    assert len(ref_double) == 4 and len(ref_single) == 10
    loaded_diff = max((a - b).abs().max().item() for a, b in zip(loaded[0] + loaded[1], ref_double + ref_single))
    # the demo transformer has 2 + 2 blocks: block i takes residual i // ceil(2 / n), as diffusers indexes them
    cond_diff = max((a - b).abs().max().item() for a, b in zip(
        ours["controlnet_block_samples"] + ours["controlnet_single_block_samples"], ref_double[:2] + ref_single[:2]))
    scale = max(r.abs().max().item() for r in ref_double + ref_single)
    print(f"InfuseNet residuals max |diff|: loaded {loaded_diff:.2e}, condition {cond_diff:.2e} (scale {scale:.2f})")
    assert loaded_diff < 1e-5 and cond_diff < 1e-4 * max(1.0, scale)


def packed_latents(pipe, pixels):
    from diffusers import FluxPipeline
    mean = pipe.vae.encode(pixels).latent_dist.mean
    return FluxPipeline._pack_latents((mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor,
                                      1, 16, H // 8, W // 8)


def reference_image(pipe, other=None):
    """The loop written out: diffusers' transformer given diffusers' InfuseNet residuals at every step (same noise,
    same schedule); ``other`` = (ControlNet, its packed control image, mode, scale): its residuals too, each list
    spread over the transformer's blocks (diffusers' indexing) and summed, as the seed sums its ControlNets'."""
    from engine import latents as lat
    from engine.scheduler import flux_sigmas
    from engine.demo.infiniteyou import projector_state_dict
    sigmas = flux_sigmas(STEPS, 1.0, None, "seed", image_seq_len=(H // 16) * (W // 16))
    text = pipe.encode_text("a portrait")
    tokens = reference_projector({k: v.float() for k, v in projector_state_dict().items()}, EMB[None, None], 2)
    control = packed_latents(pipe, -torch.ones(1, 3, H, W))
    net, dit = reference_infusenet(), pipe.dit
    depth = (len(dit.transformer_blocks), len(dit.single_transformer_blocks))

    def spread(res, n):
        return [res[b // math.ceil(n / len(res))] for b in range(n)] if res else [0] * n
    x = lat.pack(lat.initial_noise(H, W, 3))
    ids = lat.image_ids(H, W)
    with torch.no_grad():
        for i in range(STEPS):
            t = sigmas[i].reshape(1)
            double, single = net(hidden_states=x, controlnet_cond=control, conditioning_scale=1.0,
                                 encoder_hidden_states=tokens, pooled_projections=text.pooled, timestep=t,
                                 img_ids=ids, txt_ids=torch.zeros(8, 3), guidance=torch.full((1,), 1.0),
                                 return_dict=False)
            if other is not None:
                cn, cond, mode, scale = other
                d2, s2 = cn(hidden_states=x, controlnet_cond=cond, controlnet_mode=torch.tensor([[mode]]),
                            conditioning_scale=scale, encoder_hidden_states=text.embeds,
                            pooled_projections=text.pooled, timestep=t, img_ids=ids, txt_ids=text.ids,
                            guidance=torch.full((1,), 3.5), return_dict=False)
                double = [a + b for a, b in zip(spread(double, depth[0]), spread(d2, depth[0]))]
                single = [a + b for a, b in zip(spread(single, depth[1]), spread(s2, depth[1]))]
            v = dit(hidden_states=x, encoder_hidden_states=text.embeds, pooled_projections=text.pooled, timestep=t,
                    img_ids=ids, txt_ids=text.ids, guidance=torch.full((1,), 3.5), controlnet_block_samples=double,
                    controlnet_single_block_samples=single, return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return pipe.decode_latents(lat.unpack(x, H, W))


def test_a_whole_image_matches_the_loop_written_out_with_diffusers(pipe, with_identity, plain):
    ref = reference_image(pipe)
    diff = int(np.abs(as_array(ref) - as_array(with_identity)).max())
    print(f"end-to-end image max |diff| = {diff}/255; identity vs none: "
          f"{int(np.abs(as_array(plain) - as_array(with_identity)).max())}/255")
    assert diff <= 1
    assert np.abs(as_array(plain) - as_array(with_identity)).max() > 0, "InfuseNet changed nothing"


def test_with_a_controlnet_beside_it_the_residuals_add_up(pipe, with_identity, demo_dir, models_root):
    """A Union ControlNet (2 + 1 blocks) and InfuseNet (4 + 10) over the 2 + 2-block transformer: each spread over the
    blocks, then summed; the loop written out gives the same image."""
    from engine import ControlNetInput
    from engine.controlnet import attach_controlnets
    from engine.controlnet.modes import union_mode
    from engine.demo import write_controlnet_demo
    [cn] = attach_controlnets(pipe, [write_controlnet_demo(models_root, "union")]).nets
    try:
        control = smooth_photo(W, H, seed=6)
        image = run(pipe, infinityou_id_image=EMB,
                    controlnet_inputs=[ControlNetInput(image=control, scale=0.7, processor_id="canny")])
        pixels = torch.from_numpy(np.asarray(control, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        ref = reference_image(pipe, (cn, packed_latents(pipe, pixels), union_mode("canny", 10, "x"), 0.7))
    finally:
        attach_controlnets(pipe, None)
    diff = int(np.abs(as_array(ref) - as_array(image)).max())
    print(f"ControlNet + InfiniteYou image max |diff| = {diff}/255")
    assert diff <= 1 and np.abs(as_array(image) - as_array(with_identity)).max() > 0


# ------------------------------------------------------------------------------------------------ face embedder

class FakeEmbedder(face_mod.FaceEmbedder):
    """Behind the real interface: a fixed detector result, and an 'embedding' read from the chosen face's box."""

    def __init__(self, faces):
        super().__init__()
        self.faces, self.embedded = faces, []

    def detect(self, bgr):
        return self.faces

    def embed(self, bgr, face):
        self.embedded.append(face)
        x0, y0, x1, y1 = [int(v) for v in face["bbox"]]
        crop = bgr[y0:y1, x0:x1].astype(np.float32).mean(axis=(0, 1))
        return np.resize(np.concatenate([crop, [x1 - x0, y1 - y0]]), 512) / 255.0


def test_the_face_embedder_is_a_replaceable_attribute(pipe, with_identity):
    seen = []

    def embedder(image):
        seen.append(image.size)
        return EMB.clone()
    old = pipe.infinityou_face_embedder
    pipe.infinityou_face_embedder = embedder
    try:
        image = run(pipe, infinityou_id_image=smooth_photo(96, 80, seed=1))
    finally:
        pipe.infinityou_face_embedder = old
    assert seen == [(96, 80)]
    assert np.array_equal(as_array(image), as_array(with_identity))     # the same embedding as the tensor input


def test_a_precomputed_embedding_as_npy_or_array(pipe, with_identity, tmp_path):
    path = tmp_path / "face.npy"
    np.save(path, EMB.numpy()[None])                                     # (1, 512) is fine
    assert np.array_equal(as_array(run(pipe, infinityou_id_image=str(path))), as_array(with_identity))
    assert np.array_equal(as_array(run(pipe, infinityou_id_image=EMB.numpy())), as_array(with_identity))
    np.save(tmp_path / "short.npy", np.zeros(100, np.float32))
    with pytest.raises(EngineError, match="512 numbers"):
        run(pipe, infinityou_id_image=str(tmp_path / "short.npy"))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(EngineError, match="not a readable .npy"):
        run(pipe, infinityou_id_image=str(tmp_path / "objects.npy"))


def test_no_face_and_several_faces(pipe):
    photo = smooth_photo(120, 100, seed=2)
    old = pipe.infinityou_face_embedder
    try:
        pipe.infinityou_face_embedder = FakeEmbedder([])
        with pytest.raises(EngineError, match="No face was found"):
            run(pipe, infinityou_id_image=photo)
        small = {"bbox": [5, 5, 25, 30], "kps": np.zeros((5, 2))}
        big = {"bbox": [40, 20, 100, 90], "kps": np.zeros((5, 2))}
        fake = pipe.infinityou_face_embedder = FakeEmbedder([small, big])
        notes = []
        run(pipe, infinityou_id_image=photo, infinityou_notes=notes)
        assert fake.embedded == [big]
        assert notes == ["The identity photo shows 2 faces; InfiniteYou used the largest (60x70 px at 40,20)."]
    finally:
        pipe.infinityou_face_embedder = old


def test_without_insightface_the_message_says_what_to_install_and_where(pipe, models_root, monkeypatch, tmp_path):
    root = face_mod.default_root(tmp_path)
    embedder = face_mod.InsightFaceEmbedder(root=root)
    monkeypatch.setattr(face_mod, "missing_packages", lambda: ["insightface", "onnxruntime", "facexlib"])
    with pytest.raises(EngineError) as e:
        embedder(smooth_photo(80, 80, seed=3))
    text = str(e.value)
    assert "pip install -r requirements-infiniteyou.txt" in text and "insightface, onnxruntime, facexlib" in text
    assert str(root / "models" / "antelopev2") in text and "scrfd_10g_bnkps.onnx" in text and ".npy" in text
    # installed but the antelopev2 files missing: the folder alone
    monkeypatch.setattr(face_mod, "missing_packages", lambda: [])
    with pytest.raises(EngineError, match="go in " + str(root / "models" / "antelopev2")):
        embedder(smooth_photo(80, 80, seed=3))
    # the pipeline's default embedder looks in the models folder its projector came from, and says the same
    with pytest.raises(EngineError) as e:
        run(pipe, infinityou_id_image=smooth_photo(80, 80, seed=3))
    assert str(models_root.resolve() / "ByteDance/InfiniteYou/supports/insightface/models/antelopev2") in str(e.value)


def test_the_insightface_call_path_with_stand_in_packages(monkeypatch, tmp_path):
    """The default embedder's calls, as the references make them, against stand-ins of insightface, onnxruntime and
    facexlib (the real ones are an optional extra): the antelopev2 folder by path (never a download), detection
    only, det sizes 640 -> 320 -> 160 until a face is found, the largest face's key points to norm_crop at 112, the
    BGR crop in [-1, 1] through facexlib's IR-SE50 ArcFace loaded with weights_only from its file."""
    import importlib.machinery
    import sys
    import types
    calls = {"apps": [], "get": [], "crop": []}

    class FaceAnalysis:
        def __init__(self, name, root, allowed_modules=None, providers=None):
            calls["apps"].append(dict(name=name, root=root, allowed_modules=allowed_modules, providers=providers))

        def prepare(self, ctx_id=0, det_size=None):
            self.size = det_size

        def get(self, img):
            calls["get"].append(self.size)
            if self.size[0] > 160:
                return []
            return [{"bbox": np.array([10, 10, 30, 30]), "kps": np.full((5, 2), 1.0)},
                    {"bbox": np.array([20, 5, 90, 95]), "kps": np.full((5, 2), 2.0)}]

    def norm_crop(img, landmark, image_size=112):
        calls["crop"].append((img.shape, landmark[0, 0], image_size))
        return np.ascontiguousarray(np.resize(img, (112, 112, 3)))

    class Backbone(torch.nn.Module):
        def __init__(self, num_layers, drop_ratio, mode):
            super().__init__()
            assert (num_layers, drop_ratio, mode) == (50, 0.6, "ir_se")
            self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
            self.fc = torch.nn.Linear(8 * 14 * 14, 512)

        def forward(self, x):
            return F.normalize(self.fc(self.conv(x).flatten(1)), dim=1)

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
    module("insightface"), module("insightface.app", FaceAnalysis=FaceAnalysis)
    module("insightface.utils"), module("insightface.utils.face_align", norm_crop=norm_crop)
    module("onnxruntime", get_available_providers=lambda: ["CPUExecutionProvider"])
    module("facexlib"), module("facexlib.recognition"), module("facexlib.recognition.arcface_arch", Backbone=Backbone)
    monkeypatch.setattr(face_mod, "missing_packages", lambda: [])
    root = face_mod.default_root(tmp_path)
    (root / face_mod.ANTELOPE).mkdir(parents=True)
    (root / face_mod.ANTELOPE / face_mod.DETECTOR_FILE).write_bytes(b"onnx")
    torch.manual_seed(0)
    arcface = Backbone(50, 0.6, "ir_se")
    (root.parent / "facexlib").mkdir()
    torch.save(arcface.state_dict(), root.parent / "facexlib" / face_mod.ARCFACE_FILE)

    embedder = face_mod.InsightFaceEmbedder(root=root, device="cpu")
    photo = smooth_photo(120, 100, seed=4)
    got = embedder(photo)
    assert calls["get"] == [(640, 640), (320, 320), (160, 160)]
    assert {a["name"] for a in calls["apps"]} == {str((root / face_mod.ANTELOPE).resolve())}
    assert all(a["allowed_modules"] == ["detection"] for a in calls["apps"])
    assert calls["crop"] == [((100, 120, 3), 2.0, 112)]                   # the largest face's key points
    assert embedder.last_notes and "2 faces" in embedder.last_notes[0]
    bgr = np.asarray(photo)[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(np.resize(bgr, (112, 112, 3)))).permute(2, 0, 1)[None].float()
    want = arcface(x / 255.0 * 2.0 - 1.0)[0]
    assert got.shape == (512,) and got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


def test_bad_input_is_named_and_the_engine_stays_usable(pipe, with_identity):
    with pytest.raises(EngineError, match="infinityou_guidance"):
        run(pipe, infinityou_id_image=EMB, infinityou_guidance=50)
    with pytest.raises(EngineError, match="give a photo"):
        run(pipe, infinityou_id_image=42)
    with pytest.raises(EngineError, match="was not found"):
        run(pipe, infinityou_id_image="/nowhere/face.png")
    assert np.array_equal(as_array(run(pipe, infinityou_id_image=EMB)), as_array(with_identity))


def test_a_ported_seed_script_passing_infusenets_black_control_image_is_told_to_drop_it(pipe):
    from engine import ControlNetInput
    black = Image.new("RGB", (W, H))
    with pytest.raises(EngineError, match="drop controlnet_inputs"):
        run(pipe, infinityou_id_image=EMB, controlnet_inputs=[ControlNetInput(image=black, processor_id="None")])


def test_without_the_files_the_message_names_the_model_configs(demo_dir):
    from tests.helpers import demo_pipeline
    bare = demo_pipeline(demo_dir)
    with pytest.raises(EngineError, match="infu_flux_v1.0/aes_stage2/image_proj_model.bin"):
        run(bare, infinityou_id_image=EMB)


# ------------------------------------------------------------------------------------------------ studio

@pytest.fixture(scope="module")
def id_photo(studio):
    import pathlib
    folder = pathlib.Path(studio.engine.models_dir) / "identity-photos"
    folder.mkdir(exist_ok=True)
    path = folder / "person.png"
    smooth_photo(160, 200, seed=9).save(path)
    np.save(folder / "person.npy", EMB.numpy())
    return path


def studio_job(**extra) -> dict:
    return {**dict(variant="FLUX.1-dev-random-demo", prompt="a portrait", width=64, height=64,
                   num_inference_steps=2, seed=11), **extra}


def test_the_studio_runs_an_identity_photo_records_it_and_restores_it(studio, id_photo):
    import pathlib
    from app.recipe_text import recipe_text
    engine = studio.engine
    [result] = engine.generate(studio_job(infinityou_id_image=str(id_photo), infinityou_guidance=1.5))
    assert engine.models.pipe.infinityou_infusenet is not None
    assert any("stand-in" in n for n in result.get("notes", []))
    recipe = result["recipe"]
    entry = recipe["infinityou_id_image"]
    assert entry["file"] == "person.png" and entry["size"] == [160, 200] and recipe["infinityou_guidance"] == 1.5
    assert entry["embedder"] == "pixel-hash stand-in (demo)"
    copy = pathlib.Path(result["path"]).with_name(pathlib.Path(result["path"]).stem + entry["copy"])
    assert entry["copy"] == ".idf0.png" and Image.open(copy).size == (160, 200)
    assert {"infinityou_image_projector", "infinityou_infusenet"} <= set(recipe["model_files"])
    text = recipe_text(recipe)
    assert "Identity (InfiniteYou), guidance 1.5:" in text and "person.png" in text
    restored = engine.read_recipe(result["path"])
    assert restored["infinityou_id_image"] == str(copy) and restored["infinityou_guidance"] == 1.5
    [again] = engine.generate({k: v for k, v in restored.items() if k != "sigma_shift"})
    assert np.array_equal(as_array(Image.open(again["path"])), as_array(Image.open(result["path"])))
    # an embedding (.npy) is copied as is and comes back
    [emb] = engine.generate(studio_job(infinityou_id_image=str(id_photo.with_suffix(".npy"))))
    e = emb["recipe"]["infinityou_id_image"]
    npy = pathlib.Path(emb["path"]).with_name(pathlib.Path(emb["path"]).stem + e["copy"])
    assert e["embedding"] and np.array_equal(np.load(npy), EMB.numpy())
    restored = engine.read_recipe(emb["path"])
    assert restored["infinityou_id_image"] == str(npy)
    [again] = engine.generate({k: v for k, v in restored.items() if k != "sigma_shift"})
    assert np.array_equal(as_array(Image.open(again["path"])), as_array(Image.open(emb["path"])))
    # a job without it empties the two slots
    engine.generate(studio_job())
    assert engine.models.pipe.infinityou_infusenet is None and engine.models.pipe.infinityou_image_projector is None


@pytest.mark.parametrize("extra, words", [
    ({"infinityou_guidance": 11}, "guidance must be a number from 0 to 10"),
    ({"infinityou_guidance": "high"}, "guidance must be a number"),
    ({"variant": "Step1X-Edit-random-demo"}, "cannot steer it"),
    ({"variant": "FLUX.1-dev"}, "pip install -r requirements-infiniteyou.txt"),
])
def test_bad_identity_requests_are_refused_by_name(studio, id_photo, extra, words):
    job = {**studio_job(infinityou_id_image=str(id_photo)), **extra}
    with pytest.raises(EngineError, match=words):
        studio.engine.validate(job)


def test_the_hires_fix_follows_the_identity(studio, id_photo):
    """The identity tokens fit any size, so the hires fix refines with them too (studio.features.img2img)."""
    [result] = studio.engine.generate(studio_job(infinityou_id_image=str(id_photo), hires_scale=2,
                                                 hires_strength=0.5))
    assert (result["width"], result["height"]) == (128, 128) and result["recipe"]["hires_scale"] == 2
    assert result["recipe"]["infinityou_id_image"]["file"] == id_photo.name
