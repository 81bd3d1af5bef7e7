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
from tests.helpers import no_bar, smooth_photo, write_sparse_safetensors

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
