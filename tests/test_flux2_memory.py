"""FLUX.2's components in the memory planner (issue 16, item 5), on the CPU.

- Sizes from the checkpoint manifests (no weights): klein 4B (Qwen3-4B), klein 9B (Qwen3-8B) and [dev] (Mistral
  Small 3.x, 24B, and the 32B transformer) at full size; the text encoder counted as the loader builds it (decoder
  layers up to the deepest hidden state read, no lm_head, no vision tower); equal to the sizes of the modules the
  loader builds on the meta device; [dev]'s BFL single file sized as its diffusers folder.
- Plans at 8, 16 and 24 GB (and every budget 6..80 GB): what must be fp8, streamed or offloaded, the predicted peak
  within the limit, more budget never worse.
- On the klein demo: offloaded and streamed placements give the resident image exactly; fp8 storage (resident or
  streamed, same image) within a stated bound of it; ``from_pretrained(vram_limit=...)`` and the seed's VRAM fields
  place the components by the plan.
- The studio: FLUX.2 is planned (Models & memory shows strategies and predicted peaks), before and after loading.
"""
from __future__ import annotations

import gc
import json
import pathlib
import weakref

import numpy as np
import pytest
import torch

from engine import memory as vram
from engine.memory import place as P

FP8 = torch.float8_e4m3fn
FLUX2 = "FLUX.2-klein-4B-random-demo"
MODELS = ("FLUX.2-klein-4B", "FLUX.2-klein-9B", "FLUX.2-dev")
# fp8 bound on the demo (random weights, bf16 compute, 64x64, 2 steps; text encoder and transformer both fp8): mean
# |difference| of the 8-bit images against bf16 storage, measured 3.5 levels.
FP8_PIXEL_MEAN_BOUND = 6.0


def manifest_paths(root: pathlib.Path, name: str) -> dict:
    d = root / name
    return {"text_encoder": d / "text_encoder" / "model.safetensors.json",
            "dit": d / "transformer" / "diffusion_pytorch_model.safetensors.json",
            "vae": d / "vae" / "diffusion_pytorch_model.safetensors.json"}


pytestmark = pytest.mark.usefixtures("reference_rates")   # fixed rates: tests/conftest.py


@pytest.fixture(scope="module")
def sizes(manifests_dir):
    return {name: vram.sizes_from_manifests(manifest_paths(manifests_dir, name)) for name in MODELS}


def _tensors(path) -> dict:
    return json.loads(pathlib.Path(path).read_text())["tensors"]


def _count(tensors, keep=lambda k: True) -> int:
    return sum(int(np.prod(v["shape"])) for k, v in tensors.items() if keep(k))


# ---------------------------------------------------------------------------------------------------- sizes
def test_manifest_sizes_count_what_the_loader_builds(manifests_dir, sizes):
    """The text encoder as loaded: Qwen3 keeps decoder layers 0..27 of 36 (hidden states 9/18/27 read), Mistral
    0..30 of 40 (10/20/30); Qwen3-8B's lm_head and Mistral's lm_head, vision tower and projector are not loaded."""
    import re

    def upto(prefix, last):
        def keep(k):
            m = re.match(re.escape(prefix) + r"layers\.(\d+)\.", k)
            return k.startswith(prefix) and (m is None or int(m.group(1)) <= last)
        return keep

    for name, prefix, last, layers in (("FLUX.2-klein-4B", "model.", 27, 28), ("FLUX.2-klein-9B", "model.", 27, 28),
                                       ("FLUX.2-dev", "language_model.model.", 30, 31)):
        te = sizes[name]["text_encoder"]
        tensors = _tensors(manifest_paths(manifests_dir, name)["text_encoder"])
        assert te.params == _count(tensors, upto(prefix, last)) < _count(tensors), name
        assert len(te.blocks) == te.dims["layers"] == layers and te.file_dtype == "bfloat16", name
        # fp8: the decoder layers' Linears; the token embedding and the norms stay bf16
        emb = _count(tensors, lambda k: k.endswith("embed_tokens.weight"))
        assert te.params - emb - 1e-3 * te.params < te.fp8_params < te.params - emb, name
    assert sizes["FLUX.2-klein-4B"]["text_encoder"].dims == {"hidden": 2560, "d_ff": 9728, "heads": 32, "layers": 28}
    assert sizes["FLUX.2-klein-9B"]["text_encoder"].dims["hidden"] == 4096
    assert sizes["FLUX.2-dev"]["text_encoder"].dims == {"hidden": 5120, "d_ff": 32768, "heads": 32, "layers": 31}
    # the transformers: every tensor, blocks = double + single, width from the shapes
    for name, blocks, hidden, params in (("FLUX.2-klein-4B", 5 + 20, 3072, 3_875_544_576),
                                         ("FLUX.2-klein-9B", 8 + 24, 4096, 9_078_581_248),
                                         ("FLUX.2-dev", 8 + 48, 6144, 32_223_281_152)):
        dit = sizes[name]["dit"]
        assert (dit.params, len(dit.blocks), dit.dims["hidden"]) == (params, blocks, hidden), name
        # fp8 halves it: the blocks' Linears (the shared modulation, embedders and output stay bf16)
        assert 0.51 < dit.nbytes(vram.FP8, "bfloat16") / dit.nbytes("bfloat16", "bfloat16") < 0.53, name
    assert sizes["FLUX.2-dev"]["vae"].dims == {"channels": 128} and sizes["FLUX.2-dev"]["vae"].params == 84_046_372


def test_bfl_single_file_is_sized_as_the_diffusers_folder(manifests_dir, sizes):
    """[dev]'s and klein's BFL files (fused qkv, ``double_blocks``/``single_blocks``): same parameters, fp8 share and
    blocks as the diffusers transformer (manifests marked inferred: their key names are diffusers' converter's)."""
    for name, file in (("FLUX.2-dev", "flux2-dev.safetensors.json"),
                       ("FLUX.2-klein-4B", "flux-2-klein-4b.safetensors.json")):
        bfl = vram.sizes_from_manifests({"dit": manifests_dir / name / file})["dit"]
        want = sizes[name]["dit"]
        assert (bfl.params, bfl.fp8_params, bfl.blocks, bfl.block_fp8, dict(bfl.dims)) == \
               (want.params, want.fp8_params, want.blocks, want.block_fp8, dict(want.dims)), name


def _meta_modules(manifests_dir, name) -> dict:
    """The loader's modules for a FLUX.2 model, built on the meta device from the manifests' shapes."""
    from engine.flux2 import loading as L
    from engine.loading.load import assemble
    meta = torch.device("meta")
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "I64": torch.int64}
    sds = {role: {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device=meta) for k, v in _tensors(p).items()}
           for role, p in manifest_paths(manifests_dir, name).items()}
    cfg = L.infer_transformer_config(sds["dit"])
    out = {"dit": assemble(lambda: L.build_transformer(cfg), sds["dit"], torch.bfloat16, meta)}
    cfgv = L.infer_vae_config(sds["vae"])
    out["vae"] = assemble(lambda: L.build_vae(cfgv), sds["vae"], torch.bfloat16, meta)
    _role, fmt, _ = L.detect_flux2(sds["text_encoder"])
    infer, convert, build, layers = L.TEXT_ENCODERS[fmt]
    conf = infer(sds["text_encoder"], None)
    tensors, _unused = convert(sds["text_encoder"])
    model = assemble(lambda: build(conf, meta), tensors, torch.bfloat16, meta)
    L.trim_text_encoder(model, layers)
    out["text_encoder"] = model
    return out


@pytest.mark.parametrize("name", ["FLUX.2-klein-4B", "FLUX.2-dev"])
def test_manifest_sizes_equal_the_module_sizes(manifests_dir, sizes, name):
    """What the planner reads from the files is what the placement casts and streams on the loaded modules (built on
    meta: no memory): the same parameters, fp8 share, blocks, widths."""
    modules = _meta_modules(manifests_dir, name)
    for role, module in modules.items():
        got, want = vram.sizes_from_module(role, module), sizes[name][role]
        # the VAE's bn statistics are buffers: in the file, not among the module's parameters (257 numbers)
        buffers = sum(b.numel() for n, b in module.named_buffers() if n.startswith("bn.")) if role == "vae" else 0
        assert (got.params + buffers, got.fp8_params, got.blocks, got.block_fp8, got.largest_layer,
                dict(got.dims)) == (want.params, want.fp8_params, want.blocks, want.block_fp8, want.largest_layer,
                                    dict(want.dims)), role


# ---------------------------------------------------------------------------------------------------- plans
def _row(p) -> str:
    return ", ".join(f"{r}={e.strategy}/{e.storage_dtype.replace('float8_e4m3fn', 'fp8')}"
                     for r, e in p.entries.items()) + f"; peak {p.predicted_peak_vram_gb:.2f} GB"


def test_plans_at_8_16_24_gb(sizes):
    """Full-size plans at 1024x1024 (the fastest predicted, reference rates). klein 4B: all resident at 24 GB; at 16
    GB its 6 GB text encoder is kept in fp8 beside the resident transformer (offloading it would move 6 GB from
    pageable RAM at every prompt); at 8 GB the transformer is fp8 and the text encoder streamed. klein 9B: its 17 GB
    transformer resident at 24 GB (the 11 GB Qwen3-8B streamed), fp8 at 16 GB, streamed at 8 GB. [dev]: its 60 GB
    transformer is streamed at every one of these budgets and the 33 GB Mistral encoder streamed (in fp8 from pinned
    RAM: the same bytes per prompt as offloading it, at the pinned rate)."""
    plans = {(name, b): vram.plan(sizes[name], "cuda", b, pipeline="flux2") for name in MODELS for b in (8, 16, 24)}
    print("\n" + "\n".join(f"{name} {b:>2} GB: {_row(p)}" for (name, b), p in plans.items()))
    for (name, b), p in plans.items():
        assert p.fits and p.predicted_peak_vram_gb <= b, (name, b, p.notes)
        assert p.stage_peaks_gb["text_encoder"] <= b and p.peak_stage in ("text_encoder", "dit", "vae")

    def strategies(name, b):
        return {r: (e.strategy, "fp8" if vram.is_fp8(e.storage_dtype) else "bf16")
                for r, e in plans[name, b].entries.items()}

    assert strategies("FLUX.2-klein-4B", 24) == {r: ("resident", "bf16") for r in ("text_encoder", "dit", "vae")}
    assert strategies("FLUX.2-klein-4B", 16)["dit"] == ("resident", "bf16")
    assert strategies("FLUX.2-klein-4B", 16)["text_encoder"] == ("fp8", "fp8")
    assert strategies("FLUX.2-klein-4B", 8)["dit"] == ("fp8", "fp8")
    assert strategies("FLUX.2-klein-4B", 8)["text_encoder"][0] in ("fp8+offload", "stream")
    assert strategies("FLUX.2-klein-9B", 24)["dit"] == ("resident", "bf16")
    assert strategies("FLUX.2-klein-9B", 24)["text_encoder"][0] == "stream"
    assert strategies("FLUX.2-klein-9B", 16)["dit"] == ("fp8", "fp8")
    assert strategies("FLUX.2-klein-9B", 8)["dit"][0] == "stream"
    for b in (8, 16, 24):
        assert strategies("FLUX.2-dev", b)["dit"][0] == "stream"
    assert strategies("FLUX.2-dev", 24)["text_encoder"] == ("stream", "fp8")
    assert strategies("FLUX.2-dev", 8)["text_encoder"][0] == "stream"
    # the notes name the stage of the peak and what is streamed
    notes = " ".join(plans["FLUX.2-dev", 8].notes)
    assert "FLUX.2 transformer is streamed" in notes
    assert "FLUX.2 text encoder (Qwen3 / Mistral Small) is streamed" in notes


@pytest.mark.parametrize("name", MODELS)
def test_more_budget_never_gives_a_worse_plan(sizes, name):
    previous = None
    for tenth in range(80, 801, 20):
        p = vram.plan(sizes[name], "cuda", tenth / 10)
        assert p.fits and p.predicted_peak_vram_gb <= tenth / 10, (name, tenth)
        if previous is not None:       # the planner minimises the predicted time: more budget is never slower
            assert p.predicted_seconds <= previous.predicted_seconds + 1e-3, (name, tenth)
        previous = p
    top = vram.plan(sizes[name], "cuda", 200)
    assert all(e.strategy == "resident" and e.storage_dtype == "bfloat16" for e in top.entries.values())


def test_reference_tokens_need_room(sizes):
    """Reference images are tokens beside the output's (a 1024x1024 reference: 4096): more activations for the
    transformer, the text encoder still sized for its 512-token prompt."""
    plain = vram.plan(sizes["FLUX.2-klein-4B"], "cuda", None)
    edit = vram.plan(sizes["FLUX.2-klein-4B"], "cuda", None, t5_sequence_length=512 + 2 * 4096)
    assert edit.entries["dit"].activation_bytes > 2 * plain.entries["dit"].activation_bytes
    assert edit.entries["text_encoder"].activation_bytes == plain.entries["text_encoder"].activation_bytes
    assert 0.05 * vram.GiB < plain.entries["text_encoder"].activation_bytes < 0.5 * vram.GiB
    # what a call adds: each reference image's tokens, as the pipeline sizes it (the seed's resize to about 1 MP,
    # or the image's own size cropped to 16s)
    from PIL import Image

    from engine.flux2.pipeline import sequence_tokens
    refs = [Image.new("RGB", (512, 512)), Image.new("RGB", (520, 260))]
    assert sequence_tokens(1024, 1024) == 512
    assert sequence_tokens(1024, 1024, refs, edit_image_auto_resize=False) == 512 + 32 * 32 + 32 * 16
    assert sequence_tokens(1024, 1024, refs[0]) == 512 + 64 * 64


# ---------------------------------------------------------------------------------------------------- demo
@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    from engine.demo.flux2 import write_flux2_demo
    models = tmp_path_factory.mktemp("flux2-memory")
    write_flux2_demo(models)
    return models


def demo_pipe(models, **kw):
    from engine import Flux2ImagePipeline
    from engine.flux2.variants import model_configs
    return Flux2ImagePipeline.from_pretrained(torch_dtype=torch.bfloat16, device="cpu", models_dir=models,
                                              **model_configs(FLUX2, **kw.pop("fields", {})), **kw)


RUN = dict(prompt="a lighthouse at dusk", seed=3, height=64, width=64, num_inference_steps=2,
           progress_bar_cmd=lambda it: it)


def image(pipe) -> np.ndarray:
    return np.asarray(pipe(**RUN), dtype=np.int16)


def force(pipe, strategy, storage=None):
    """Every component placed with ``strategy`` (the VAE offloaded when it is fp8 or streamed: it has neither), the
    CPU as compute and offload device: the hooks and the residency are real, the copies no-ops."""
    pipe.residency.offload_all()
    pipe.residency.forget()
    for role in ("text_encoder", "dit", "vae"):
        vae = role == "vae" and strategy not in ("resident", "offload")
        place = P.ComponentPlacement(torch.device("cpu"), torch.bfloat16, torch.device("cpu"),
                                     torch.bfloat16 if vae or storage is None else storage,
                                     strategy="offload" if vae else strategy, role=role)
        pipe.placements[role] = place
        setattr(pipe, role, P.apply(getattr(pipe, role), place, role))
    pipe._prompt_encoder = None        # its prompt cache: encode again
    getattr(pipe, "prompt_cache", {}).clear()    # and the encodings kept across jobs (engine.acceleration)


def test_offloaded_streamed_and_fp8_runs_against_the_resident_run(demo_models):
    pipe = demo_pipe(demo_models)
    assert set(pipe.plan.strategies().values()) == {"resident"} and pipe.plan.predicted_peak_vram_gb > 0
    resident = image(pipe)
    force(pipe, "offload")
    assert np.array_equal(image(pipe), resident)
    # each component moved in for its stage; with no budget the others went back
    assert pipe.residency.moves[:4] == [("text_encoder", "in"), ("text_encoder", "out"), ("dit", "in"),
                                        ("dit", "out")]
    force(pipe, "stream")
    assert "group_offloading" in pipe.dit.transformer_blocks[0]._diffusers_hook.hooks
    assert "group_offloading" in pipe.dit.single_transformer_blocks[0]._diffusers_hook.hooks
    assert "group_offloading" in pipe.text_encoder.layers[0]._diffusers_hook.hooks       # Qwen3's decoder layers
    assert np.array_equal(image(pipe), resident)
    force(pipe, "resident")
    assert "group_offloading" not in pipe.text_encoder.layers[0]._diffusers_hook.hooks
    assert np.array_equal(image(pipe), resident)
    force(pipe, "fp8", FP8)
    assert pipe.dit.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight.dtype == FP8
    assert pipe.dit.x_embedder.weight.dtype == torch.bfloat16                         # outside the blocks: bf16
    assert pipe.dit.double_stream_modulation_img.linear.weight.dtype == torch.bfloat16
    assert pipe.text_encoder.layers[0].mlp.down_proj.weight.dtype == FP8
    assert pipe.text_encoder.embed_tokens.weight.dtype == torch.bfloat16
    fp8 = image(pipe)
    diff = np.abs(fp8 - resident)
    assert 0 < diff.mean() <= FP8_PIXEL_MEAN_BOUND, diff.mean()
    force(pipe, "stream", FP8)
    assert np.array_equal(image(pipe), fp8)


def test_from_pretrained_places_by_the_plan(demo_models):
    """``vram_limit`` (here in MB: the demo is tiny, and on the CPU the budget counts as if it were VRAM) makes the
    planner store the text encoder in fp8 or stream it; the seed's VRAM fields pin a component's placement."""
    resident = image(demo_pipe(demo_models))
    tight = demo_pipe(demo_models, vram_limit=4 / 1024)
    tight.plan_size = (64, 64)
    tight.set_models({})                         # re-plan for this job's size
    te = tight.plan.entries["text_encoder"]
    assert te.option in ("F", "FO", "S", "SF") and te.option != "R", tight.plan.strategies()
    assert tight.plan.fits and 0 < tight.plan.predicted_peak_vram_gb <= 4 / 1024
    diff = np.abs(image(tight) - resident)
    assert diff.mean() <= FP8_PIXEL_MEAN_BOUND, diff.mean()
    fields = dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8, onload_device="cpu",
                  preparing_dtype=FP8, preparing_device="cpu", computation_dtype=torch.bfloat16,
                  computation_device="cpu")
    stored = demo_pipe(demo_models, fields=fields)
    assert all(e.source == "fields" and e.strategy == "fp8" for r, e in stored.plan.entries.items() if r != "vae")
    assert stored.text_encoder.layers[0].self_attn.q_proj.weight.dtype == FP8
    assert 0 < np.abs(image(stored) - resident).mean() <= FP8_PIXEL_MEAN_BOUND


# ---------------------------------------------------------------------------------------------------- studio
@pytest.fixture(scope="module")
def engine(demo_dir, tmp_path_factory):
    from studio.engine import Engine
    from tests.helpers import linked_models
    root = tmp_path_factory.mktemp("flux2-memory-studio")
    return Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs")


LIMIT = 8.25 / 1024       # GB: the fp32 demo's text encoder in fp8 or streamed at 64x64 (on the CPU, as if VRAM;
                          # the reference CPU rates, injected below)


def test_the_studio_plans_flux2(engine):
    """Models & memory for FLUX.2: strategies and predicted peaks from the loaded pipeline's plan, FLUX.2's labels; a
    new limit re-plans it without a restart (the text encoder goes fp8 or streamed) and a job runs under it; no limit
    again reads the fp8 component back from its file in full precision; switching to FLUX.1 frees the placed FLUX.2
    modules."""
    engine.generate({"variant": FLUX2, "prompt": "a red boat", "width": 64, "height": 64, "num_inference_steps": 1,
                     "seed": 1})
    plan = engine.memory_plan()
    assert plan["loaded"] and plan["variant"] == FLUX2 and plan["predicted_peak_vram_gb"] > 0
    rows = {c["role"]: c for c in plan["components"]}
    assert list(rows) == ["text_encoder", "dit", "vae"]
    assert rows["text_encoder"]["label"] == "FLUX.2 text encoder (Qwen3 / Mistral Small)"
    assert (rows["dit"]["label"], rows["vae"]["label"]) == ("FLUX.2 transformer", "FLUX.2 VAE (32 channels)")
    assert {c["strategy"] for c in rows.values()} == {"resident"}
    # before a model is loaded the tab shows its plan made from the files' headers (the text encoder as loaded)
    headers = engine.models._header_plan(FLUX2)
    assert not headers["loaded"] and headers["predicted_peak_vram_gb"] > 0
    assert [c["role"] for c in headers["components"]] == [c["role"] for c in plan["components"]]
    for got, want in zip(headers["components"], plan["components"]):     # the VAE's file adds its 257 bn statistics
        assert got["vram_gb"] == pytest.approx(want["vram_gb"], abs=1e-5), got["role"]
    engine._pipe.plan_size = (64, 64)          # planned for this job's size (the default makes room for 1024x1024)
    tight = engine.set_vram_limit(LIMIT)
    assert tight["vram_limit_gb"] == LIMIT and engine._pipe.plan.vram_limit_gb == LIMIT and tight["fits"]
    assert any("float8" in c["storage_dtype"] or c["strategy"] == "stream" for c in tight["components"])
    engine.generate({"variant": FLUX2, "prompt": "a blue boat", "width": 64, "height": 64, "num_inference_steps": 1,
                     "seed": 1})
    back = engine.set_vram_limit(None)
    assert {c["strategy"] for c in back["components"]} == {"resident"}
    # fp8 storage does not survive the way back: a component stored in fp8 is read again from its file
    assert not [c for c in back["components"] if "float8" in c["storage_dtype"]]
    assert engine._pipe.text_encoder.layers[0].mlp.up_proj.weight.dtype == torch.float32
    # switching to FLUX.1 frees FLUX.2's placed modules (fp8 hooks and all)
    engine.set_vram_limit(LIMIT)
    assert vram.is_fp8(engine._pipe.plan.entries["text_encoder"].storage_dtype)
    placed = [weakref.ref(m) for m in engine._pipe.installed_models().values()]
    engine.generate({"variant": "FLUX.1-dev-random-demo", "prompt": "a", "width": 64, "height": 64,
                     "num_inference_steps": 1, "seed": 1})
    gc.collect()
    assert not [r for r in placed if r() is not None], "a placed FLUX.2 module outlived the switch to FLUX.1"
    engine.set_vram_limit(None)
