"""DiffSynth-Studio's LoRA Encoder (issue 19 item 1): the official file's keys, the encoder against the seed's math
written out here on small random weights, the tokens on the positive prompt only, the missing-layers message."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine import scheduler as sched
from engine.errors import EngineError
from engine.loading.files import DTYPES as DT
from engine.lora_encoder import load as le_load
from engine.lora_encoder import model as lem
from tests.helpers import no_bar, tiny_flux_modules

MANIFEST = "adapters/DiffSynth-Studio--LoRA-Encoder-FLUX.1-Dev/model.safetensors.json"
TEXT_WIDTH = 32          # the tiny transformer's T5 width = the encoder's token width
HIDDEN, FF = 64, 256     # the tiny transformer's width and MLP width (2 double + 2 single blocks)
RANK = 4
DIFFSYNTH_TO_DIFFUSERS = {**lem.DOUBLE_LAYERS, **lem.SINGLE_LAYERS}


def test_the_official_file_maps_one_to_one(manifests_dir):
    m = json.loads((manifests_dir / MANIFEST).read_text())
    sd = {k: torch.empty(v["shape"], dtype=DT[v["dtype"]], device="meta") for k, v in m["tensors"].items()}
    assert lem.is_lora_encoder(sd)
    cfg = lem.infer_config(sd)
    assert (cfg["double_blocks"], cfg["single_blocks"], len(cfg["widths"])) == (19, 38, 304)
    assert (cfg["tokens_per_layer"], cfg["width"], cfg["intermediate"], cfg["depth"], cfg["heads"]) == \
        (16, 4096, 8192, 1, 32)
    model = le_load.encoder_from_tensors(sd, device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: tuple(v["shape"]) for k, v in m["tensors"].items()}


# ------------------------------------------------------------------------------------------------ small weights

def dit_widths() -> dict:
    """(in, out) of each DiffSynth layer of the tiny transformer."""
    double = {"attn.a_to_qkv": (HIDDEN, 3 * HIDDEN), "attn.a_to_out": (HIDDEN, HIDDEN), "ff_a.0": (HIDDEN, FF),
              "ff_a.2": (FF, HIDDEN), "norm1_a.linear": (HIDDEN, 6 * HIDDEN)}
    double.update({k.replace("a_to", "b_to").replace("_a.", "_b."): v for k, v in double.items()})
    single = {"to_qkv_mlp": (HIDDEN, 3 * HIDDEN + FF), "proj_out": (HIDDEN + FF, HIDDEN),
              "norm.linear": (HIDDEN, 3 * HIDDEN)}
    out = {f"blocks.{i}.{k}": v for i in range(2) for k, v in double.items()}
    out.update({f"single_blocks.{i}.{k}": v for i in range(2) for k, v in single.items()})
    return out


@pytest.fixture(scope="module")
def encoder_sd():
    torch.manual_seed(1)
    model = lem.FluxLoRAEncoder(2, 2, dit_widths(), tokens_per_layer=4, width=TEXT_WIDTH, intermediate=64, heads=1)
    return {k: torch.randn(v.shape) * (0.3 if v.ndim > 1 else 1.0) for k, v in model.state_dict().items()}


def diffusers_lora(seed: int) -> dict:
    """A random rank-4 LoRA on every block linear of the tiny transformer, in diffusers/PEFT names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (din, dout) in dit_widths().items():
        kind = name.split(".", 2)[2]
        prefix = "transformer_blocks" if name.startswith("blocks") else "single_transformer_blocks"
        block = name.split(".")[1]
        targets = DIFFSYNTH_TO_DIFFUSERS[kind]
        widths = [HIDDEN] * 3 + [FF] if len(targets) == 4 else [HIDDEN] * 3 if len(targets) == 3 else [dout]
        for t, w in zip(targets, widths):
            out[f"transformer.{prefix}.{block}.{t}.lora_A.weight"] = torch.randn(RANK, din, generator=g)
            out[f"transformer.{prefix}.{block}.{t}.lora_B.weight"] = torch.randn(w, RANK, generator=g) * 0.1
    return out


def fused_as_the_seed(lora: dict) -> dict:
    """The seed's FluxLoRALoader result: DiffSynth names, q|k|v(|mlp) fused with A stacked, B block-diagonal."""
    out = {}
    for name in dit_widths():
        kind = name.split(".", 2)[2]
        prefix = "transformer_blocks" if name.startswith("blocks") else "single_transformer_blocks"
        parts = [f"transformer.{prefix}.{name.split('.')[1]}.{t}" for t in DIFFSYNTH_TO_DIFFUSERS[kind]]
        out[name + ".lora_A.weight"] = torch.cat([lora[p + ".lora_A.weight"] for p in parts])
        out[name + ".lora_B.weight"] = torch.block_diag(*[lora[p + ".lora_B.weight"] for p in parts])
    return out


KOHYA = {"norm1_a.linear": "img_mod_lin", "norm1_b.linear": "txt_mod_lin", "attn.a_to_qkv": "img_attn_qkv",
         "attn.b_to_qkv": "txt_attn_qkv", "attn.a_to_out": "img_attn_proj", "attn.b_to_out": "txt_attn_proj",
         "ff_a.0": "img_mlp_0", "ff_a.2": "img_mlp_2", "ff_b.0": "txt_mlp_0", "ff_b.2": "txt_mlp_2",
         "norm.linear": "modulation_lin", "to_qkv_mlp": "linear1", "proj_out": "linear2"}


def kohya_lora(seed: int, alpha: float = 2.0) -> tuple:
    """(a kohya file's tensors, what the seed's FluxLoRALoader makes of them): BFL names, fused q|k|v with one down
    matrix, an alpha per pair; the seed folds sqrt(alpha / rank) into both matrices."""
    g = torch.Generator().manual_seed(seed)
    kohya, seed_sd = {}, {}
    for name, (din, dout) in dit_widths().items():
        A, B = torch.randn(RANK, din, generator=g), torch.randn(dout, RANK, generator=g) * 0.1
        where, block, kind = name.split(".", 2)
        key = f"lora_unet_{'double' if where == 'blocks' else 'single'}_blocks_{block}_{KOHYA[kind]}"
        kohya.update({key + ".lora_down.weight": A, key + ".lora_up.weight": B, key + ".alpha": torch.tensor(alpha)})
        f = (alpha / RANK) ** 0.5
        seed_sd.update({name + ".lora_A.weight": A * f, name + ".lora_B.weight": B * f})
    return kohya, seed_sd


def seed_encoder(sd: dict, lora: dict, heads: int = 1) -> torch.Tensor:
    """DiffSynth-Studio's FluxLoRAEncoder.forward, written out on the official-key state dict."""
    F = torch.nn.functional
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    embs = []
    for name in dit_widths():                 # the seed's pattern order: per block, its layers in table order
        kind, key = name.split(".", 2)[2].replace(".", "___"), name.replace(".", "___")
        x = sd[f"embedder.model_dict.{key}.x"] @ lora[name + ".lora_A.weight"].T @ lora[name + ".lora_B.weight"].T
        embs.append(lin(ln(x, f"embedder.model_dict.{key}.layer_norm"), f"embedder.proj_dict.{kind}"))
    h = torch.cat([sd["special_embeds"]] + embs, dim=1)
    b, n, w = h.shape
    r = h
    y = ln(h, "encoders.0.layer_norm1")
    q, k, v = (lin(y, f"encoders.0.attn.to_{c}").view(b, n, heads, w // heads).transpose(1, 2) for c in "qkv")
    att = torch.softmax(q @ k.transpose(-1, -2) / (w // heads) ** 0.5, dim=-1) @ v
    h = r + lin(att.transpose(1, 2).reshape(b, n, w), "encoders.0.attn.to_out")
    y = lin(ln(h, "encoders.0.layer_norm2"), "encoders.0.fc1")
    h = h + lin(y * torch.sigmoid(1.702 * y), "encoders.0.fc2")
    return lin(ln(h[:, :1], "final_layer_norm"), "final_linear")


@pytest.fixture(scope="module")
def files(encoder_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_encoder")
    save_file(encoder_sd, str(d / "model.safetensors"))
    save_file(diffusers_lora(2), str(d / "a.safetensors"))
    # the second LoRA in DiffSynth's own fused names (the format DiffSynth's trainer writes)
    save_file(fused_as_the_seed(diffusers_lora(3)), str(d / "b.safetensors"))
    save_file(kohya_lora(5)[0], str(d / "c.safetensors"))
    return d


@pytest.fixture(scope="module")
def pipe(files, demo_tokenizers):
    from engine import FluxImagePipeline, ModelConfig
    p = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                          model_configs=[ModelConfig(path=str(files / "model.safetensors"))])
    assert "lora_encoder" in p.installed_models()
    p.set_models(dict(tiny_flux_modules(demo_tokenizers, text_width=TEXT_WIDTH)))
    p.tokenizer_1, p.tokenizer_2 = demo_tokenizers
    return p


def prepare(pipe, **args):
    from engine.conditions.base import ConditionContext
    from engine.conditions.lora_encoder import LoRAEncoderCondition
    ctx = ConditionContext(pipe, 64, 64, torch.device("cpu"), torch.float32, sched.flux_sigmas(2), None)
    return LoRAEncoderCondition.prepare(ctx, {**LoRAEncoderCondition.call_args, **args})


def test_tokens_equal_the_seed_math_for_several_loras_scaled(pipe, files, encoder_sd):
    from engine import ModelConfig
    with torch.no_grad():
        ref_a = seed_encoder(encoder_sd, fused_as_the_seed(diffusers_lora(2)))
        ref_b = seed_encoder(encoder_sd, fused_as_the_seed(diffusers_lora(3)))
    one = prepare(pipe, lora_encoder_inputs=str(files / "a.safetensors")).tokens
    assert one.shape == (1, 1, TEXT_WIDTH) and (one - ref_a).abs().max() < 1e-4
    both = prepare(pipe, lora_encoder_inputs=[str(files / "a.safetensors"),
                                              ModelConfig(path=str(files / "b.safetensors"))],
                   lora_encoder_scale=0.5).tokens
    assert both.shape == (1, 2, TEXT_WIDTH)
    assert (both - 0.5 * torch.cat([ref_a, ref_b], dim=1)).abs().max() < 1e-4
    assert not torch.allclose(ref_a, ref_b, atol=1e-3)
    kohya = prepare(pipe, lora_encoder_inputs=str(files / "c.safetensors")).tokens          # kohya, alpha 2
    with torch.no_grad():
        assert (kohya - seed_encoder(encoder_sd, kohya_lora(5)[1])).abs().max() < 1e-4
    # (the LayerNorm after each layer hides a common factor, so the alpha / rank scale is checked where it is used)
    from engine.lora_encoder.encode import layer_pieces, read
    pieces = layer_pieces(read(str(files / "c.safetensors"))[0], pipe.lora_encoder.specs, "c")
    assert {p[2] for v in pieces.values() for p in v if not isinstance(p, int)} == {0.5}


def test_the_positive_prompt_gains_the_tokens_and_the_negative_does_not(pipe, files):
    from engine.conditions.base import Text
    c = prepare(pipe, lora_encoder_inputs=[str(files / "a.safetensors"), str(files / "b.safetensors")])
    text = Text(torch.randn(1, 7, TEXT_WIDTH), torch.randn(1, 64), torch.zeros(7, 3))
    pos, neg = c.prompt_text(text, 0, False), c.prompt_text(text, 0, True)
    assert neg is text
    assert torch.equal(pos.embeds[:, :7], text.embeds) and torch.equal(pos.embeds[:, 7:], c.tokens)
    assert pos.pooled is text.pooled and pos.ids.shape == (9, 3) and not pos.ids.any()
    # through pipe(...): the transformer's positive pass reads 2 more text tokens, the CFG negative pass does not
    seen = []
    hook = pipe.dit.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["encoder_hidden_states"].clone(), kw["txt_ids"].clone())), with_kwargs=True)
    try:
        pipe(prompt="a car", negative_prompt="blur", cfg_scale=2.0, height=64, width=64, num_inference_steps=1,
             seed=0, t5_sequence_length=16, progress_bar_cmd=no_bar,
             lora_encoder_inputs=[str(files / "a.safetensors"), str(files / "b.safetensors")])
    finally:
        hook.remove()
    (pos_e, pos_ids), (neg_e, neg_ids) = seen
    assert pos_e.shape[1] == 18 and neg_e.shape[1] == 16 and pos_ids.shape == (18, 3) and not pos_ids.any()
    assert torch.allclose(pos_e[:, 16:], c.tokens) and not torch.allclose(pos_e[:, :16], neg_e)


def test_a_lora_missing_layers_is_named(pipe, files, tmp_path):
    lora = {k: v for k, v in diffusers_lora(4).items()
            if ".ff." not in k and "single_transformer_blocks.1.norm.linear" not in k}
    save_file(lora, str(tmp_path / "attn_only.safetensors"))
    with pytest.raises(EngineError) as e:
        prepare(pipe, lora_encoder_inputs=str(tmp_path / "attn_only.safetensors"))
    msg = str(e.value)
    assert "all 26 transformer layers" in msg and "none on 5 of them" in msg
    assert "ff_a.0 of double blocks 0, 1" in msg and "norm.linear of single blocks 1" in msg
    assert "attn_only.safetensors" in msg and "ff_b" not in msg.split("ff_a.2")[0].split("ff_a.0")[0]
    # a single block's MLP part alone may be absent (the seed fills zeros): no error
    lora = {k: v for k, v in diffusers_lora(4).items() if ".proj_mlp." not in k}
    save_file(lora, str(tmp_path / "no_mlp.safetensors"))
    assert prepare(pipe, lora_encoder_inputs=str(tmp_path / "no_mlp.safetensors")).tokens.shape == (1, 1, TEXT_WIDTH)


def test_without_the_encoder_the_model_config_to_add_is_named(demo_tokenizers, files):
    from engine import FluxImagePipeline
    p = FluxImagePipeline(device="cpu", torch_dtype=torch.float32)
    with pytest.raises(EngineError, match='DiffSynth-Studio/LoRA-Encoder-FLUX.1-Dev", origin_file_pattern='):
        prepare(p, lora_encoder_inputs=str(files / "a.safetensors"))
    with pytest.raises(EngineError, match="lora_encoder_scale"):
        prepare(p, lora_encoder_inputs=str(files / "a.safetensors"), lora_encoder_scale="strong")


def test_the_demo_encoder_loads_and_encodes_demo_sized_loras(tmp_path):
    from engine.demo.lora_encoder import FILE, layer_widths, write_lora_encoder_demo
    from engine.lora_encoder.encode import layer_pieces, read
    assert layer_widths() == dit_widths()            # the FLUX.1 demo transformer's layers
    folder = write_lora_encoder_demo(tmp_path)
    assert le_load.claims(folder / FILE) == "lora_encoder"
    enc = le_load.load_encoder(folder / FILE, torch_dtype=torch.float32)
    assert len(enc.specs) == 26 and "26 layers" in enc.flux_studio_description
    with torch.no_grad():
        out = enc(layer_pieces(read(diffusers_lora(2))[0], enc.specs, "x"))
    assert out.shape == (1, 1, TEXT_WIDTH) and torch.isfinite(out).all()


def test_a_lora_for_other_widths_is_refused(pipe, tmp_path):
    lora = {k: v[:, :32].contiguous() if k.endswith("lora_A.weight") else v for k, v in diffusers_lora(6).items()}
    save_file(lora, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(EngineError, match="other widths than the encoder's .64 in"):
        prepare(pipe, lora_encoder_inputs=str(tmp_path / "narrow.safetensors"))
