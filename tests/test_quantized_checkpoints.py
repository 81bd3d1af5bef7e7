"""Community checkpoint formats for the FLUX.1 transformer: GGUF (Q8_0, Q5_K, Q4_K), bitsandbytes NF4 (Forge's
layout) and fp8 single files (plain, and ComfyUI's two scaled layouts).

Each file is written by the tools' own writers (``gguf.GGUFWriter`` + ``gguf.quants``) or, for NF4, by
``engine.demo.quantized.nf4_reference``: bitsandbytes' ``quantize_4bit`` (plain and double-quantised) +
``QuantState.as_dict(packed=True)``, the bytes ``Linear4bit`` saves, byte-identical to bitsandbytes 0.50.2 (checked
against its output kept in tests/data/, so bitsandbytes is not needed here). The files are detected, loaded and
run. "Dequantised weights" are computed by the formats' reference implementations (``gguf.quants.dequantize``,
bitsandbytes' ``dequantize_4bit`` as ``nf4_dequantize_reference``, checked bit-exact the same way; fp8 * scale),
written as a float32 safetensors file and loaded through the plain path: the quantized model must give the same
output.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib

import numpy as np
import pytest
import torch

from engine.demo import quantized as writers
from engine.demo.flux1 import bfl_transformer_state_dict
from engine.loading import ModelFileError, load_models
from engine.loading.quantized import PackedLinear, dequantize_module_weight, file_kind
from engine.loading.files import resolve_group

# K types need rows of whole 256-value super-blocks: the demo's shapes at width 256 (head 128, FLUX's rotary split)
WIDE = {"hidden_size": 256, "num_heads": 2, "head_dim": 128, "axes_dim": [16, 56, 56], "depth": 1, "depth_single_blocks": 1}
# Bounds on max |dequantised - original| / max |original| over the blocks' matrices, from each format's step: Q8_0
# half of amax/127 per 32 values (0.004); Q5_K / Q4_K half a step of a sub-block's range over 31 / 15 (0.032 /
# 0.067); NF4 half its widest level gap (1 - 0.723) / 2 = 0.139; e4m3 half an ulp, 2**-4 of the value (0.0625).
# Measured on these weights: 0.0039, 0.027, 0.057, 0.147 (incl. bf16 rounding), 0.059 / scaled 0.036. And on the
# transformer's output, relative to its largest value (measured 0.008, 0.048, 0.096, 0.167, 0.018 / 0.015).
WEIGHT_BOUND = {"Q8_0": 0.006, "Q5_K": 0.04, "Q4_K": 0.08, "NF4": 0.16, "fp8": 0.07, "fp8s": 0.07}
OUTPUT_BOUND = {"Q8_0": 0.02, "Q5_K": 0.08, "Q4_K": 0.15, "NF4": 0.25, "fp8": 0.05, "fp8s": 0.05}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantized")
    sd, wide = bfl_transformer_state_dict(0), bfl_transformer_state_dict(0, WIDE)
    out = {"Q8_0": (writers.write_gguf(sd, d / "q8_0.gguf", "Q8_0"), sd),
           "Q5_K": (writers.write_gguf(wide, d / "q5_k.gguf", "Q5_K"), wide),
           "Q4_K": (writers.write_gguf(wide, d / "q4_k.gguf", "Q4_K"), wide),
           "fp8": (writers.write_fp8(sd, d / "fp8.safetensors"), sd),
           "fp8s": (writers.write_fp8(sd, d / "fp8_scaled.safetensors", scaled="scale_weight"), sd),
           "fp8n": (writers.write_fp8(sd, d / "fp8_new.safetensors", scaled="weight_scale",
                                      prefix="model.diffusion_model."), sd)}
    # NF4: text width 64, not the demo's 32: bitsandbytes 0.50's CPU dequantise kernel blocks each row on its own
    # when a row is narrower than a block (its quantiser does not), so a 32-wide txt_in would not round-trip
    # through bitsandbytes itself; FLUX's rows are >= 3072 wide.
    sd64 = bfl_transformer_state_dict(0, {"context_in_dim": 64})
    out["NF4"] = (writers.write_nf4(sd64, d / "nf4.safetensors"), sd64)
    out["NF4dq"] = (writers.write_nf4(sd64, d / "nf4_dq.safetensors", double_quant=True), sd64)
    return d, out


def _bitsandbytes():
    try:
        import bitsandbytes.functional as bnbf
        return bnbf
    except Exception:  # noqa: BLE001 - not a requirement: only the golden NF4 test also compares with it, if present
        return None


@functools.lru_cache(maxsize=None)
def _reference_bfl(path, kind) -> dict:
    """The file's weights dequantised by the format's reference implementation, BFL keys, float32 (read-only)."""
    from safetensors.torch import load_file
    if kind == "gguf":
        import gguf
        out = {}
        for t in gguf.GGUFReader(str(path)).tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
        return out
    sd = load_file(str(path))
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items() if k != "scaled_fp8"}
    out = {}
    for k, v in sd.items():
        if ".weight." in k or k.endswith((".scale_weight", ".weight_scale", ".comfy_quant")):
            continue
        base = k[:-len(".weight")]
        if k + ".quant_state.bitsandbytes__nf4" in sd:
            parts = {"": v, **{s[len(k) + 1:]: sd[s] for s in sd if s.startswith(k + ".")}}
            out[k] = writers.nf4_dequantize_reference(parts).float()
        elif v.dtype == torch.float8_e4m3fn:
            scale = sd.get(base + ".scale_weight", sd.get(base + ".weight_scale"))
            out[k] = v.float() * (1.0 if scale is None else scale.float())
        else:
            out[k] = v.float()
    return out


def _run(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    hidden = torch.randn(1, 16, cfg.in_channels, generator=g)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"), -1)
    with torch.no_grad():
        return model(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                     timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=ids.reshape(-1, 3),
                     txt_ids=torch.zeros(8, 3), return_dict=False)[0]


def _load(path):
    return load_models([str(path)], torch_dtype=torch.float32)["dit"]


@functools.lru_cache(maxsize=None)
def _loaded(path):
    """``_load`` once per file, for tests that only read the model."""
    return _load(path)


def _save(sd, path):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


CASES = [("Q8_0", "gguf", "GGUF: Q8_0"), ("Q5_K", "gguf", "GGUF: Q5_K"), ("Q4_K", "gguf", "GGUF: Q4_K"),
         ("NF4", "nf4", "4-bit: NF4"), ("NF4dq", "nf4", "4-bit: NF4"), ("fp8", "fp8", "fp8: float8_e4m3fn x"),
         ("fp8s", "fp8", "fp8: float8_e4m3fn scaled x"), ("fp8n", "fp8", "fp8: float8_e4m3fn scaled x")]


@pytest.mark.parametrize("name,kind,note", CASES)
def test_detected_loaded_and_equal_to_dequantised_weights(files, name, kind, note):
    d, out = files
    path, original = out[name]
    assert file_kind(resolve_group(path)) == kind
    model = _loaded(path)
    assert model.flux_studio_role == "dit" and note in model.flux_studio_description
    quantized = [m for m in model.modules()
                 if isinstance(m, PackedLinear) or hasattr(getattr(m, "weight", None), "quant_type")]
    assert len(quantized) >= 20                      # the blocks' matrices stayed quantized
    ref_bfl = _reference_bfl(path, "gguf" if kind == "gguf" else "st")
    ref = _load(_save(ref_bfl, d / f"{name}_dequantised.safetensors"))
    y, y_ref = _run(model), _run(ref)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=0), (y - y_ref).abs().max()
    # and close to the float weights it was made from (bounded quantisation error)
    base = name.rstrip("dqn") if name.startswith("NF4") else ("fp8s" if name == "fp8n" else name)
    err = max(((ref_bfl[k] - w.float()).abs().max() / w.float().abs().max()).item() for k, w in original.items()
              if w.dim() == 2 and k.startswith(("double_blocks.", "single_blocks.")))
    assert 0 < err < WEIGHT_BOUND[base]
    y0 = _run(_load(_save({k: v.float() for k, v in original.items()}, d / f"{name}_float.safetensors")))
    assert 0 < (y - y0).abs().max() / y0.abs().max() < OUTPUT_BOUND[base]


def test_layer_weights_match_the_reference_dequantisation(files):
    """One converted layer (q of the fused qkv, cut by rows from the packed bytes) against the reference."""
    _d, out = files
    for name in ("Q4_K", "NF4", "fp8s"):
        path, _ = out[name]
        model = _loaded(path)
        kind = "gguf" if name.startswith("Q") else "st"
        qkv = _reference_bfl(path, kind)["double_blocks.0.txt_attn.qkv.weight"]
        k_rows = qkv.chunk(3)[1]
        got = dequantize_module_weight(model.transformer_blocks[0].attn.add_k_proj)
        assert torch.equal(got, k_rows), name


# bitsandbytes' own NF4 output for _golden_input(), written once by write_nf4_golden() with bitsandbytes 0.50.2
# (torch 2.13, CPU): under "plain.weight*" the state of its first 16 rows (quantize_4bit(quant_type="nf4")), under
# "nested.weight*" the double-quantised state of all 72 rows (compress_statistics=True: 288 absmax in two nested
# blocks of 256, the second partial), as Forge's files carry them; under "blockwise.*" quantize_blockwise(blocksize=
# 256)'s codes and absmax (the nested step) for values 3e-6 beside each midpoint of its 8-bit table, where its
# 65536-entry lookup often differs from the nearest value, then 64 zeros; the metadata names the versions and holds
# the sha256 of the input and of bitsandbytes' dequantize_4bit of each state. ~17 KB.
GOLDEN = pathlib.Path(__file__).parent / "data" / "nf4_bitsandbytes_0.50.2.safetensors"


def _golden_input():
    """72 x 256 bfloat16 (seeded randn, rows scaled 0.05 .. 2 so the absmax spread), row 5 all zero."""
    w = torch.randn(72, 256, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.05, 2, 72)[:, None]
    w[5] = 0
    return w.bfloat16()


def _blockwise_golden_input(code):
    """Two blocks of 256 (1.0 / -1.0 then the values beside the table's 255 midpoints) and a partial block of 0."""
    mids = (code[:-1] + code[1:]) / 2
    v = torch.cat([mids - 3e-6, mids + 3e-6]).clamp(-1, 1)
    return torch.cat([torch.tensor([1.0]), v[:255], torch.tensor([-1.0]), v[255:], torch.zeros(64)])


def _nf4_golden_cases(w):
    return {"plain": (w[:16], False), "nested": (w, True)}


def _sha(t):
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _bitsandbytes_nf4(bnbf, w, double_quant):
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return {"": packed, **state.as_dict(packed=True)}, bnbf.dequantize_4bit(packed, state)


def write_nf4_golden(path=GOLDEN):
    """Remake GOLDEN (needs bitsandbytes):
    ``.venv/bin/python -c "from tests.test_quantized_checkpoints import write_nf4_golden; write_nf4_golden()"``."""
    import bitsandbytes
    from safetensors.torch import save_file
    w = _golden_input()
    tensors, meta = {}, {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__, "input_sha256": _sha(w)}
    for name, (x, dq) in _nf4_golden_cases(w).items():
        parts, deq = _bitsandbytes_nf4(_bitsandbytes(), x, dq)
        tensors.update({f"{name}.weight" + (f".{k}" if k else ""): v.contiguous() for k, v in parts.items()})
        meta[f"{name}_dequantised_sha256"] = _sha(deq)
    x = _blockwise_golden_input(_bitsandbytes().create_dynamic_map())
    codes, state = _bitsandbytes().quantize_blockwise(x, blocksize=256)
    tensors.update({"blockwise.input": x, "blockwise.codes": codes, "blockwise.absmax": state.absmax})
    save_file(tensors, str(path), metadata=meta)


def test_nf4_reference_writer_gives_bitsandbytes_bytes():
    """nf4_reference (plain and double-quantised) gives bitsandbytes' bytes, and nf4_dequantize_reference its
    dequantised bytes: against GOLDEN always, and against the installed bitsandbytes too where there is one."""
    from safetensors import safe_open
    with safe_open(str(GOLDEN), "pt") as f:
        meta, golden = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["bitsandbytes"] == "0.50.2"
    w = _golden_input()
    assert _sha(w) == meta["input_sha256"], "torch's seeded randn gives another input: remake GOLDEN (write_nf4_golden)"
    assert golden["nested.weight.nested_absmax"].numel() == 2 and golden["nested.weight.absmax"].dtype == torch.uint8
    live = _bitsandbytes()
    for name, (x, dq) in _nf4_golden_cases(w).items():
        mine = writers.nf4_reference(x, double_quant=dq)
        theirs = {k.removeprefix(f"{name}.weight").removeprefix("."): v for k, v in golden.items()
                  if k.startswith(name + ".")}
        assert mine.keys() == theirs.keys(), name
        for k in mine:
            assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), (name, k)
        assert _sha(writers.nf4_dequantize_reference(mine)) == meta[f"{name}_dequantised_sha256"], name
        if live is not None:   # bitsandbytes is optional (not in requirements); compare with it where installed
            parts, deq = _bitsandbytes_nf4(live, x, dq)
            assert mine.keys() == parts.keys() and all(torch.equal(mine[k], parts[k]) for k in mine), name
            assert torch.equal(writers.nf4_dequantize_reference(mine), deq), name
    x = golden["blockwise.input"]
    codes, absmax = writers.quantize_blockwise_8bit(x, writers.dynamic_map())
    assert torch.equal(codes, golden["blockwise.codes"]) and torch.equal(absmax, golden["blockwise.absmax"])
    assert (codes != (x[:, None] - writers.dynamic_map()).abs().argmin(-1)).sum() > 100   # not plain nearest


def test_planned_at_real_size(files):
    from engine import memory
    d, out = files
    sd = out["Q8_0"][1]
    plain = memory.sizes_from_files({"dit": [_save(sd, d / "plain_bf16.safetensors")]})["dit"]
    for name in ("Q8_0", "Q4_K", "NF4", "fp8s"):
        path, _ = out[name]
        header = memory.sizes_from_files({"dit": [path]})["dit"]
        loaded = memory.sizes_from_module("dit", _loaded(path))
        # (NF4: each layer cut from a fused matrix keeps its own copy of the 64-byte code table)
        assert header.packed_bytes > 0 and header.packed_bytes == pytest.approx(loaded.packed_bytes, rel=0.01), name
        assert header.fp8_params == loaded.fp8_params, name
        assert header.params == loaded.params and header.blocks == loaded.blocks, name
        assert header.block_packed == pytest.approx(loaded.block_packed, rel=0.01) and header.dims == loaded.dims
        assert header.packed_params == loaded.packed_params > 0.8 * header.params, name   # counted for compute
        blocks = header.block_bytes("bfloat16", "bfloat16")
        assert sum(blocks) + header.nonblock_bytes("bfloat16", "bfloat16") == header.nbytes("bfloat16", "bfloat16")
        assert blocks == pytest.approx(loaded.block_bytes("bfloat16", "bfloat16"), rel=0.01), name
        # the weights on the device: the file's bytes (+ the unquantized rest in bf16), not a bf16 copy of all
        need = header.nbytes("bfloat16", "bfloat16")
        assert header.packed_bytes <= need < path.stat().st_size * 1.1 + header.params * 2, name
        if name in ("Q8_0", "NF4", "fp8s"):
            assert need < 0.6 * plain.nbytes("bfloat16", "bfloat16"), name
        p = memory.plan({"dit": header}, "cuda", vram_limit_gb=1)
        assert p.as_dict()["components"][0]["vram_gb"] * memory.GiB == pytest.approx(need, rel=1e-6, abs=2e4)


def _write_gguf_raw(path, tensors):
    import gguf
    w = gguf.GGUFWriter(str(path), "flux")
    for key, (data, qt) in tensors.items():
        w.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_types_are_named(files):
    import gguf
    d, out = files
    T = gguf.GGMLQuantizationType
    sd = bfl_transformer_state_dict(0)
    tensors = {k: (v.float().numpy(), T.F32) for k, v in sd.items()}
    block, size = gguf.GGML_QUANT_SIZES[T.TQ2_0]
    tensors["double_blocks.0.img_mlp.2.weight"] = (np.zeros((64, 256 // block * size), np.uint8), T.TQ2_0)
    path = _write_gguf_raw(d / "tq2.gguf", tensors)
    with pytest.raises(ModelFileError) as e:
        _load(path)
    assert "TQ2_0" in str(e.value) and "Q4_K" in str(e.value) and "double_blocks.0.img_mlp.2.weight" in str(e.value)

    from safetensors.torch import load_file
    sd8 = load_file(str(out["fp8n"][0]))
    key = next(k for k in sd8 if k.endswith(".comfy_quant"))
    sd8[key] = writers._json_tensor({"format": "int8_blockwise", "group_size": 128})
    with pytest.raises(ModelFileError) as e:
        _load(_save(sd8, d / "int8.safetensors"))
    assert "int8_blockwise" in str(e.value) and "float8_e4m3fn" in str(e.value)


def test_other_components_are_refused_by_name(files):
    d, _out = files
    from engine.demo.flux1 import bfl_ae_state_dict
    path = writers.write_gguf(bfl_ae_state_dict(0), d / "ae.gguf", "Q8_0")
    with pytest.raises(ModelFileError) as e:
        _load(path)
    assert "GGUF" in str(e.value) and "VAE" in str(e.value) and "transformers are loaded" in str(e.value)


def test_studio_generates_with_a_gguf_transformer_under_the_official_name(demo_dir, tmp_path):
    """A GGUF file saved as black-forest-labs/FLUX.1-dev/flux1-dev.safetensors (told by its bytes, not its name)
    loads through the studio's normal path; its image is close to the bf16 file's."""
    from PIL import Image
    from safetensors.torch import load_file
    from studio.engine import Engine
    from tests.helpers import official_models_dir
    job = {"variant": "FLUX.1-dev", "prompt": "a lighthouse", "seed": 3, "width": 64, "height": 64,
           "num_inference_steps": 2}
    images = {}
    for name in ("bf16", "gguf"):
        models = official_models_dir(tmp_path / name, demo_dir)
        dit = models / "black-forest-labs/FLUX.1-dev/flux1-dev.safetensors"
        if name == "gguf":
            dit.unlink()
            writers.write_gguf(load_file(str(demo_dir / "flux1-dev.safetensors")), dit, "Q8_0")
        eng = Engine(models_dir=models, outputs_dir=tmp_path / f"out_{name}")
        result = eng.generate(job)[0]
        images[name] = np.asarray(Image.open(result["path"]), dtype=np.int16)
        if name == "gguf":
            assert "GGUF" in eng.models.pipe.dit.flux_studio_description
    diff = np.abs(images["gguf"] - images["bf16"])
    assert 0 < diff.mean() < 3 and diff.max() < 40, (diff.mean(), diff.max())


def test_runtime_loras_attach_to_quantized_layers(files):
    """engine.lora's hooks bind to the quantized Linears (GGUF, NF4, fp8) as to plain ones: same output as the
    dequantised model with the same LoRA."""
    from engine.lora import attach_lora
    d, out = files
    for name in ("Q8_0", "NF4", "fp8s"):
        path, _ = out[name]
        model = _load(path)
        ref = _load(_save(_reference_bfl(path, "gguf" if name.startswith("Q") else "st"), d / f"{name}_l.safetensors"))
        g, lora = torch.Generator().manual_seed(5), {}
        for layer in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out"):
            m = ref.get_submodule(layer)
            lora[f"transformer.{layer}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.1
            lora[f"transformer.{layer}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.1
        y0 = _run(model)
        # dtype: a packed weight has no float dtype to take the LoRA's from (engine.lora then stores it in bf16)
        assert attach_lora(model, dict(lora), dtype=torch.float32)["bound"] == 2
        attach_lora(ref, dict(lora), dtype=torch.float32)
        y, y_ref = _run(model), _run(ref)
        assert (y - y0).abs().max() > 1e-3 and torch.allclose(y, y_ref, atol=1e-5, rtol=0), name


def test_flux2_transformer_from_gguf(tmp_path):
    """FLUX.2's transformer (the klein demo's, diffusers layout) from a Q8_0 GGUF, through load_flux2_models: the
    same output as its dequantised weights."""
    from engine.demo.flux2 import _write_transformer
    from engine.flux2.loading import load_flux2_models
    from safetensors.torch import load_file
    (tmp_path / "bf16").mkdir()
    _write_transformer(tmp_path / "bf16")
    path = writers.write_gguf(load_file(str(tmp_path / "bf16/diffusion_pytorch_model.safetensors")),
                              tmp_path / "klein-Q8_0.gguf", "Q8_0")
    dit = load_flux2_models([str(path)], torch_dtype=torch.float32)["dit"]
    assert "FLUX.2 transformer" in dit.flux_studio_description and "GGUF: Q8_0" in dit.flux_studio_description
    assert sum(hasattr(getattr(m, "weight", None), "quant_type") for m in dit.modules()) >= 10
    ref = load_flux2_models([str(_save(_reference_bfl(path, "gguf"), tmp_path / "dequantised.safetensors"))],
                            torch_dtype=torch.float32)["dit"]
    g = torch.Generator().manual_seed(0)
    lat, text = torch.randn(1, 16, dit.config.in_channels, generator=g), torch.randn(1, 6, 96, generator=g)
    kw = dict(hidden_states=lat, encoder_hidden_states=text, timestep=torch.tensor([0.7]), guidance=None,
              img_ids=torch.cartesian_prod(torch.zeros(1), torch.arange(4.), torch.arange(4.), torch.zeros(1)),
              txt_ids=torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(6.)),
              return_dict=False)
    with torch.no_grad():
        y, y_ref = dit(**kw)[0], ref(**kw)[0]
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=0), (y - y_ref).abs().max()


def test_a_gguf_file_read_as_safetensors_is_named(files):
    from engine.loading.files import read_header
    with pytest.raises(ModelFileError) as e:
        read_header(files[1]["Q8_0"][0])
    assert "a GGUF file" in str(e.value)


def test_same_model_as_diffusers_gguf_loader(demo_dir, tmp_path):
    """diffusers' own GGUF path (``from_single_file`` + ``GGUFQuantizationConfig``) on a diffusers-layout Q8_0 file:
    the same quantized layers, each weight equal to ours rounded to float16 (diffusers dequantises with float16 block
    scales; we keep float32), and the same output within that rounding."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
    from engine.loading.files import read_state_dict
    sd = {k: v.clone() for k, v in read_state_dict(demo_dir / "transformer").items()}
    path = writers.write_gguf(sd, tmp_path / "diffusers-layout-Q8_0.gguf", "Q8_0")
    theirs = FluxTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(demo_dir / "transformer"), torch_dtype=torch.float32)
    ours = _load(path)
    assert "diffusers layout" in ours.flux_studio_description
    layers = [n for n, m in theirs.named_modules() if hasattr(getattr(m, "weight", None), "quant_type")]
    assert len(layers) >= 20
    for name in layers:
        w_theirs = dequantize_gguf_tensor(theirs.get_submodule(name).weight)
        assert torch.equal(w_theirs, dequantize_module_weight(ours.get_submodule(name)).half()), name
    y, y_theirs = _run(ours), _run(theirs)
    assert (y - y_theirs).abs().max() < 2e-3 * y.abs().max()
