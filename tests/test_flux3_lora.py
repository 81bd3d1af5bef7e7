"""FLUX 3 LoRAs (issue 20 item 4): the formats (diffusers/PEFT, BFL, kohya, DiffSynth; ComfyUI, OneTrainer and the
fused q|k|v as mechanical variants) on diffusers' ``Flux3Transformer2DModel``, against diffusers' own FLUX 3 LoRA
loading (``Flux3LoraLoaderMixin``) of the same files; the BFL names against the weights' own BFL -> diffusers
conversion; which family a file is for, and the other families' LoRAs refused naming both; the seed API's
``load_lora`` / ``clear_lora``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from engine.demo.flux3_loras import FORMATS, _bfl_linears, _linears, write_flux3_demo_loras
from engine.lora import LoraError, attach_lora, detach_loras, read_lora
from engine.lora.family import family_of_shapes, file_family

FLUX3 = "FLUX 3"
FORMAT_NAMES = {"diffusers": "diffusers/PEFT", "bfl": "BFL", "kohya": "kohya", "diffsynth": "DiffSynth"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_flux3_demo_loras(tmp_path_factory.mktemp("flux3-loras"))


@pytest.fixture(scope="module")
def dit():
    """The step-distilled demo's transformer shape in float32 with random weights."""
    from diffusers import Flux3Transformer2DModel

    from engine.demo.flux3 import transformer_config
    cfg = transformer_config(flow_map=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Flux3Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])}).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.2)
    return model


def _ids(n: int, index: float = 0.0) -> torch.Tensor:
    ids = torch.zeros(n, 4)
    ids[:, 0], ids[:, 2], ids[:, 3] = index, torch.arange(n) // 4, torch.arange(n) % 4
    return ids


def run(model):
    """One prediction with a reference (so the reference stream and its embedder run too)."""
    g = torch.Generator().manual_seed(1)
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8.0)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, 128, generator=g),
                     encoder_hidden_states=torch.randn(1, 8, 256, generator=g), timestep=torch.tensor([0.6]),
                     img_ids=_ids(16), txt_ids=txt_ids, image_cond_hidden_states=torch.randn(1, 16, 128, generator=g),
                     image_cond_ids=_ids(16, -1.0), target_timestep=torch.tensor([0.4]), return_dict=False)[0]


def _bfl_names() -> dict:
    """{BFL module name with '.' -> '_': BFL module name} of the demo transformer (kohya's names read back)."""
    return {n.replace(".", "_"): n for n in _bfl_linears(_linears())}


def as_bfl_peft(fmt: str, sd: dict) -> dict:
    """The file as BFL-named PEFT pairs under ``diffusion_model.`` (what diffusers' FLUX 3 converter reads), scale
    folded into the up matrix: DiffSynth's ``.default`` dropped, kohya's underscored names read back to BFL's."""
    if fmt == "diffsynth":
        return {"diffusion_model." + k.replace(".default.", "."): v for k, v in sd.items()}
    if fmt != "kohya":
        return dict(sd)
    names, out = _bfl_names(), {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            scale = float(sd[module + ".alpha"]) / down.shape[0]
            bfl = "diffusion_model." + names[module.removeprefix("lora_unet_")]
            out[bfl + ".lora_A.weight"] = down.float()
            out[bfl + ".lora_B.weight"] = sd[module + ".lora_up.weight"].float() * scale
    return out


def top_level_converted(sd: dict) -> dict:
    """diffusers' FLUX 3 LoRA converter renames only the block layers (the top-level BFL names stay, and PEFT finds no
    such layer): rename those as the weights' converter (``convert_flux3_transformer_checkpoint_to_diffusers``) does,
    the final adaLN's (shift, scale) halves of the up matrix swapped with the weight's."""
    from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers as convert
    out = {}
    for key, value in sd.items():
        module, _, role = key.removeprefix("diffusion_model.").rpartition(".lora_")
        if "blocks." in module:
            out[key] = value
            continue
        weight = value if role.startswith("B") else torch.zeros(2, 1)
        ((name, converted),) = convert({f"{module}.weight": weight}).items()
        out[f"diffusion_model.{name.removesuffix('.weight')}.lora_{role}"] = value if role.startswith("A") else \
            converted
    return out


def diffusers_loaded(dit, fmt, path):
    """A copy of ``dit`` with the file loaded by diffusers' FLUX 3 LoRA loader (``Flux3LoraLoaderMixin``'s
    ``lora_state_dict`` + ``load_lora_into_transformer``: what a FLUX 3 pipeline's ``load_lora_weights`` does). The
    diffusers file goes in as the file; the others as BFL-named PEFT pairs (``as_bfl_peft``, ``top_level_converted``:
    diffusers has no kohya or DiffSynth reader for FLUX 3)."""
    from diffusers.loaders.lora_pipeline import Flux3LoraLoaderMixin
    ref = copy.deepcopy(dit)
    source = str(path) if fmt == "diffusers" else top_level_converted(as_bfl_peft(fmt, load_file(str(path))))
    sd, metadata = Flux3LoraLoaderMixin.lora_state_dict(source, return_lora_metadata=True)
    Flux3LoraLoaderMixin.load_lora_into_transformer(sd, transformer=ref, metadata=metadata)
    return ref


def layer_delta(module, n_in):
    """What a layer adds to its base output, as a weight matrix [out, in] (the identity fed through)."""
    eye = torch.eye(n_in)
    with torch.no_grad():
        return (module(eye) - torch.nn.functional.linear(eye, module.weight, module.bias)).T


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_matches_diffusers_loading_of_the_same_file(dit, files, fmt):
    base = run(dit)
    report = attach_lora(dit, files[fmt], weight=1.0)
    try:
        assert report["format"] == FORMAT_NAMES[fmt] and report["bound"] == report["total"] > 0
        ours = run(dit)
        layers = dict(dit.named_modules())
        ours_delta = {name: layer_delta(layers[name], layers[name].in_features)
                      for name in read_lora(files[fmt], family=FLUX3).targets}
    finally:
        detach_loras(dit)
    assert torch.equal(run(dit), base)                      # detached: exactly as before
    ref = diffusers_loaded(dit, fmt, files[fmt])
    diff = (ours - run(ref)).abs().max().item()
    print(f"\n{fmt}: max |ours - diffusers| = {diff:.3g} (LoRA's effect {(ours - base).abs().max().item():.3g}, "
          f"{report['bound']} layers)")
    assert diff <= 1e-5 and (ours - base).abs().max().item() > 1e-2
    # Layer by layer: our applied change equals PEFT's delta weight (= scale * B @ A) on the same layer.
    ref_layers = dict(ref.named_modules())
    assert set(ours_delta) == {n for n, m in ref_layers.items() if hasattr(m, "lora_A")}
    for name, delta in ours_delta.items():
        peft = ref_layers[name]
        assert torch.allclose(delta, peft.get_delta_weight(next(iter(peft.lora_A))), atol=1e-5), name
    if fmt in ("diffusers", "bfl"):                          # every linear layer, the modulations included
        assert set(ours_delta) == set(_linears())


@pytest.mark.parametrize("fmt", ["bfl", "kohya", "diffsynth"])
def test_bfl_names_follow_the_bfl_weight_conversion(files, fmt):
    """Each pair's change made in BFL's layout and converted like BFL's transformer file (diffusers'
    ``convert_flux3_transformer_checkpoint_to_diffusers``: renames, the final adaLN's halves) equals ours."""
    from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers as convert
    sd = as_bfl_peft(fmt, load_file(str(files[fmt])))
    bfl = {k.removeprefix("diffusion_model.").replace(".lora_A.weight", ".weight"):
           sd[k.replace(".lora_A.", ".lora_B.")].float() @ v.float() for k, v in sd.items() if ".lora_A." in k}
    expected = convert(bfl)
    lf = read_lora(files[fmt], family=FLUX3)
    ours = {t + ".weight": s * B.float() @ A.float() for t, (A, B, s) in lf.targets.items()}
    assert set(ours) == set(expected)
    if fmt == "bfl":
        assert {"norm_out.linear.weight", "single_stream_modulations.image_cond.linear.weight",
                "target_timestep_embedder.linear_2.weight", "x_embedders.image_cond.weight"} <= set(ours)
    for key, value in expected.items():
        assert torch.allclose(ours[key], value, atol=1e-6), key


def test_mechanical_variants_read_as_the_same_lora(files):
    """ComfyUI's saves (the BFL names, lora_down/lora_up + alpha = rank), OneTrainer's (diffusers names, '.' -> '_',
    lora_transformer_) and diffusers' fused ``attn.to_qkv`` (split onto q, k, v; a block-diagonal up matrix keeps each
    part's own rank) give the same change as the plain files."""
    sd = load_file(str(files["bfl"]))
    comfy = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in sd.items()}
    comfy.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(float(v.shape[0]))
                  for k, v in sd.items() if k.endswith(".lora_A.weight")})
    a, b = read_lora(sd, family=FLUX3), read_lora(comfy, family=FLUX3)
    assert b.format == "ComfyUI" and set(a.targets) == set(b.targets)
    assert all(torch.equal(a.targets[t][1], b.targets[t][1]) and b.targets[t][2] == 1.0 for t in a.targets)

    sd = load_file(str(files["diffusers"]))
    one = {"lora_transformer_" + k.removeprefix("transformer.").rsplit(".lora_", 1)[0].replace(".", "_")
           + (".lora_down.weight" if ".lora_A." in k else ".lora_up.weight"): v for k, v in sd.items()}
    c = read_lora(one, family=FLUX3)
    assert c.format == "OneTrainer" and set(c.targets) == set(read_lora(sd, family=FLUX3).targets)

    g = torch.Generator().manual_seed(7)
    A, parts = torch.randn(6, 64, generator=g), [torch.randn(64, 2, generator=g) for _ in range(3)]
    fused = {"transformer.single_transformer_blocks.1.attn.to_qkv.lora_A.weight": A,
             "transformer.single_transformer_blocks.1.attn.to_qkv.lora_B.weight": torch.block_diag(*parts),
             "transformer.txt_mode_blocks.0.attn.to_qkv.lora_A.weight": A[:4],
             "transformer.txt_mode_blocks.0.attn.to_qkv.lora_B.weight": torch.randn(192, 4, generator=g)}
    lf = read_lora(fused, family=FLUX3)
    for j, p in enumerate("qkv"):
        A_j, B_j, _ = lf.targets[f"single_transformer_blocks.1.attn.to_{p}"]
        assert A_j.shape[0] == 2 and torch.equal(B_j @ A_j, parts[j] @ A[2 * j: 2 * j + 2])
        A_j, B_j, _ = lf.targets[f"txt_mode_blocks.0.attn.to_{p}"]
        assert torch.equal(B_j, fused["transformer.txt_mode_blocks.0.attn.to_qkv.lora_B.weight"][64 * j: 64 * j + 64])


def _flux2_dit():
    from diffusers import Flux2Transformer2DModel

    from engine.demo.flux2 import transformer_config
    cfg = transformer_config()
    with torch.device("meta"):
        return Flux2Transformer2DModel(**{**cfg, "axes_dims_rope": tuple(cfg["axes_dims_rope"])})


def test_families_are_told_apart_and_the_others_refused_naming_both(dit, files, tmp_path):
    from safetensors.torch import save_file

    from engine.demo.flux2_loras import flux2_lora_state_dict
    assert {fmt: file_family(p) for fmt, p in files.items()} == dict.fromkeys(FORMATS, FLUX3)
    flux2 = {}
    for fmt in ("diffusers", "kohya", "ai-toolkit"):
        flux2[fmt] = tmp_path / f"flux2-{fmt}.safetensors"
        save_file(flux2_lora_state_dict(fmt)[0], str(flux2[fmt]))
    assert {file_family(p) for p in flux2.values()} == {"FLUX.2"}
    # FLUX.1's single-block attention is named as FLUX 3's joint blocks' is: FLUX.1 unless a FLUX 3 name is there.
    flux1 = {f"transformer.{m}.lora_{r}.weight": (4, 64) for m in ("single_transformer_blocks.0.attn.to_q",
             "transformer_blocks.0.attn.to_q") for r in "AB"}
    assert family_of_shapes(flux1) == "FLUX.1"
    assert family_of_shapes({**flux1, "transformer.mode_blocks.image.0.attn.to_q.lora_A.weight": (4, 64),
                             "transformer.mode_blocks.image.0.attn.to_q.lora_B.weight": (64, 4)}) == FLUX3
    for path in (flux2["kohya"], flux2["diffusers"]):
        with pytest.raises(LoraError) as err:
            attach_lora(dit, path)
        assert "is a FLUX.2 LoRA" in str(err.value) and "is FLUX 3" in str(err.value)
        assert "Use a FLUX 3 LoRA, or choose a FLUX.2 model" in str(err.value)
    with pytest.raises(LoraError) as err:
        attach_lora(_flux2_dit(), files["bfl"])
    assert "is a FLUX 3 LoRA" in str(err.value) and "is FLUX.2" in str(err.value)
    assert not [n for n, _ in dit.named_children() if n.startswith("flux_studio_lora_")]


def test_seed_api_load_lora_and_clear(dit, files, tmp_path):
    from safetensors.torch import save_file

    from engine import EngineError, Flux3ImagePipeline
    from engine.demo.flux2_loras import flux2_lora_state_dict
    pipe = Flux3ImagePipeline.from_modules(dit=dit, device="cpu", torch_dtype=torch.float32)
    base = run(dit)
    report = pipe.load_lora(pipe.dit, str(files["kohya"]), alpha=0.5, verbose=0)
    assert report["format"] == "kohya" and report["weight"] == 0.5
    once = run(dit)
    assert not torch.equal(once, base)
    assert pipe.clear_lora(verbose=0) == ["flux3-kohya"] and torch.equal(run(dit), base)
    pipe.load_lora(pipe.dit, state_dict=load_file(str(files["kohya"])), alpha=0.5, verbose=0)   # a state dict
    assert torch.equal(run(dit), once)
    pipe.clear_lora(verbose=0)
    with pytest.raises(EngineError, match="pipe.dit"):
        pipe.load_lora(torch.nn.Linear(2, 2), str(files["kohya"]))
    save_file(flux2_lora_state_dict("diffsynth")[0], str(tmp_path / "f2.safetensors"))
    with pytest.raises(EngineError, match="is a FLUX.2 LoRA.*is FLUX 3"):
        pipe.load_lora(pipe.dit, str(tmp_path / "f2.safetensors"), verbose=0)
    assert torch.equal(run(dit), base)


def _manifest(rel):
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoint-manifests" / rel
    if not path.exists():
        pytest.skip("checkpoint manifests not available")
    return json.loads(path.read_text())["tensors"]


@pytest.mark.parametrize("fmt", ["bfl", "kohya", "diffusers"])
def test_full_size_loras_in_the_official_names_map_one_to_one(fmt):
    """A rank-1 LoRA on every linear of klein's official files (the BFL single file's names, as BFL, ComfyUI and
    kohya name them; the diffusers folder's), on meta: each pair lands on the diffusers folder's linear of the same
    shape, and binds to a full-size ``Flux3Transformer2DModel`` built on meta."""
    from diffusers import Flux3Transformer2DModel

    from engine.lora.attach import bind
    rel = "model.safetensors.json" if fmt != "diffusers" else "transformer/diffusion_pytorch_model.safetensors.json"
    tensors = _manifest("flux-3-image-klein/" + rel)
    linears = {k[: -len(".weight")]: v["shape"] for k, v in tensors.items() if len(v["shape"]) == 2}
    sd = {}
    for name, (n_out, n_in) in linears.items():
        key = {"bfl": "diffusion_model." + name, "kohya": "lora_unet_" + name.replace(".", "_"),
               "diffusers": "transformer." + name}[fmt]
        down, up = (".lora_down.weight", ".lora_up.weight") if fmt == "kohya" else (".lora_A.weight", ".lora_B.weight")
        sd[key + down], sd[key + up] = torch.empty(1, n_in, device="meta"), torch.empty(n_out, 1, device="meta")
    assert family_of_shapes({k: tuple(v.shape) for k, v in sd.items()}) == FLUX3
    lf = read_lora(sd, family=FLUX3)
    official = {k[: -len(".weight")]: v["shape"] for k, v in
                _manifest("flux-3-image-klein/transformer/diffusion_pytorch_model.safetensors.json").items()
                if len(v["shape"]) == 2}
    assert lf.pairs == len(lf.targets) == len(official) == 3 * 5 * 6 + 28 * 6 + 15     # streams, joint, top
    assert not lf.unmapped and not lf.problems
    assert {t: [B.shape[0], A.shape[1]] for t, (A, B, _s) in lf.targets.items()} == official
    with torch.device("meta"):
        model = Flux3Transformer2DModel(num_layers=5, num_single_layers=28, flow_map=True)
    bound, report = bind(model, lf)
    assert report["bound"] == report["total"] == len(official)
