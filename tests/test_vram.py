"""The VRAM planner and its placements, on the CPU.

- The planner on the full-size FLUX.1-dev set, sizes from the checkpoint manifests (no weights, no memory): budgets
  4..80 GB, monotone, within budget, all resident at 80 GB, fp8/streaming at 8 GB; manifest sizes equal the sizes of
  the real module classes built on the meta device; the same for FLUX.1-Redux's two components beside FLUX.1-dev.
- The seed's per-file VRAM fields, mapped as DiffSynth-Studio defines them.
- fp8 storage with bf16 computation against full precision on the demo-size model (bounds below).
- Offloaded and streamed runs give the same image as the resident run. There is no GPU here: the plumbing runs with
  the CPU as both the compute and the offload device (diffusers' group offloading accepts onload_device=cpu; the
  hooks, the block groups and the residency bookkeeping are real, the copies are no-ops).
- The engine's memory plan, changing the limit without a restart (fp8 -> bf16 re-reads the file), and
  out-of-memory recovery (an injected torch.cuda.OutOfMemoryError).
"""
import glob
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from engine.memory import place as P
from engine import memory as vram
from engine.errors import EngineError

BUDGETS = (4, 6, 8, 12, 16, 24, 40, 80)
FP8 = torch.float8_e4m3fn
ROLES = ("dit", "vae", "text_encoder_1", "text_encoder_2")

# fp8 bounds (demo-size model, measured 0.013 / 0.05 / 0.54 levels): see test_fp8_storage_against_full_precision.
FP8_DIT_REL_BOUND = 0.05       # ||v_fp8 - v_bf16|| / ||v_bf16|| of one transformer call
FP8_T5_REL_BOUND = 0.10        # same for the T5 hidden states (the demo T5 is 32 wide: rounding averages out less)
FP8_PIXEL_MEAN_BOUND = 2.0     # mean |difference| of the 8-bit images (4 steps, 64x64), fp8 vs bf16 weights


def manifest_paths(root):
    d = root / "FLUX.1-dev"
    return {"dit": d / "flux1-dev.safetensors.json", "vae": d / "ae.safetensors.json",
            "text_encoder_1": d / "text_encoder" / "model.safetensors.json",
            "text_encoder_2": d / "text_encoder_2" / "model.safetensors.json"}


pytestmark = pytest.mark.usefixtures("reference_rates")   # fixed rates: tests/conftest.py


@pytest.fixture(scope="module")
def dev_sizes(manifests_dir):
    return vram.sizes_from_manifests(manifest_paths(manifests_dir))


def rank(entry):
    return vram.COSTS[entry.role][entry.option]


# ------------------------------------------------------------------------------------------------------ planner
def test_manifest_sizes(dev_sizes):
    dit, t5 = dev_sizes["dit"], dev_sizes["text_encoder_2"]
    assert dit.params == 11_901_408_320 and len(dit.blocks) == 19 + 38 and dit.file_dtype == "bfloat16"
    assert t5.params == 4_762_310_656 and len(t5.blocks) == 24
    assert dev_sizes["vae"].file_dtype == "float32" and dev_sizes["vae"].dims["channels"] == 128
    # fp8 halves the transformer (the blocks' linears; embedders, norms and the final layer stay bf16)
    assert 0.50 < dit.nbytes(vram.FP8, "bfloat16") / dit.nbytes("bfloat16", "bfloat16") < 0.51
    assert 0.49 < t5.nbytes(vram.FP8, "bfloat16") / t5.nbytes("bfloat16", "bfloat16") < 0.51


def test_planner_budgets_full_size_dev(dev_sizes):
    plans = {b: vram.plan(dev_sizes, "cuda", b) for b in BUDGETS}
    rows = []
    for b, p in plans.items():
        assert p.fits, (b, p.notes)
        assert p.predicted_peak_vram_gb <= b, (b, p.predicted_peak_vram_gb)
        rows.append(f"{b:>3} GB: " + ", ".join(f"{r}={e.strategy}/{e.storage_dtype}" for r, e in p.entries.items())
                    + f"  peak {p.predicted_peak_vram_gb:.2f} GB, RAM {p.predicted_peak_ram_gb:.1f} GB")
    print("\n" + "\n".join(rows))
    # More budget never gives a slower plan: the planner minimises the predicted time over the plans that fit, and
    # every plan that fits a budget fits a larger one (tests/test_memory_time.py checks the time model itself).
    seconds = [plans[b].predicted_seconds for b in BUDGETS]
    assert seconds == sorted(seconds, reverse=True), seconds
    top = plans[80]
    assert all(e.strategy == "resident" and e.storage_dtype == "bfloat16" for e in top.entries.values())
    eight = plans[8].entries
    assert any(e.strategy in ("fp8", "fp8+offload", "stream") or vram.is_fp8(e.storage_dtype) for e in eight.values())
    assert eight["dit"].strategy == "stream"
    # every budget in between, too
    previous = None
    for tenth in range(35, 801, 5):
        p = vram.plan(dev_sizes, "cuda", tenth / 10)
        if p.fits:
            assert p.predicted_peak_vram_gb <= tenth / 10
        if previous is not None and previous.fits:
            assert p.predicted_seconds <= previous.predicted_seconds + 1e-3
        previous = p


def test_planner_describe_and_notes(dev_sizes):
    p = vram.plan(dev_sizes, "cuda", 8, width=1024, height=1024)
    rows = p.describe()
    assert [r["role"] for r in rows] == ["text_encoder_1", "text_encoder_2", "dit", "vae"]
    for r in rows:
        assert set(r) >= {"role", "label", "strategy", "storage_dtype", "compute_dtype", "vram_gb", "ram_gb"}
        assert r["strategy"] in ("resident", "offload", "fp8", "fp8+offload", "stream")
    d = p.as_dict()
    assert d["predicted_peak_vram_gb"] <= 8 and d["predicted_peak_ram_gb"] > 10 and d["notes"]
    assert any("streamed" in n for n in d["notes"])
    # a bigger image needs more room for activations
    big = vram.plan(dev_sizes, "cuda", None, width=2048, height=2048)
    assert big.predicted_peak_vram_gb > vram.plan(dev_sizes, "cuda", None).predicted_peak_vram_gb
    # nothing fits in 2 GB at 1024x1024: the smallest plan, flagged, with advice
    tiny = vram.plan(dev_sizes, "cuda", 2)
    assert not tiny.fits and "tiled" in " ".join(tiny.notes)


def test_planner_ram_budget(dev_sizes):
    free = vram.plan(dev_sizes, "cuda", 8)
    tight = vram.plan(dev_sizes, "cuda", 8, ram_limit_gb=12)
    assert free.predicted_peak_ram_gb > 12 >= tight.predicted_peak_ram_gb
    assert tight.fits and tight.predicted_peak_vram_gb <= 8
    # the transformer is streamed from its memory-mapped file (no RAM copy) or stored in fp8
    dit = tight.entries["dit"]
    assert dit.strategy == "stream" and (not dit.pinned or vram.is_fp8(dit.storage_dtype))


def test_manifest_sizes_equal_the_module_sizes(manifests_dir, dev_sizes):
    """The sizes read from the manifests are those of the modules the loader builds (on meta: no memory)."""
    import json

    from engine.loading import load as L
    meta = torch.device("meta")

    def meta_sd(path):
        tensors = json.loads(pathlib.Path(path).read_text())["tensors"]
        dt = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
        return {k: torch.empty(v["shape"], dtype=dt[v["dtype"]], device=meta) for k, v in tensors.items()}

    paths = manifest_paths(manifests_dir)
    sd = meta_sd(paths["dit"])
    cfg = L.infer_transformer_config(sd)
    modules = {"dit": L.assemble(lambda: L.build_transformer(cfg), L.convert_bfl_transformer(sd), torch.bfloat16, meta)}
    sd = meta_sd(paths["text_encoder_2"])
    cfg5 = L.infer_t5_config(sd, None)
    modules["text_encoder_2"] = L.assemble(lambda: L.build_t5(cfg5), L.convert_t5(sd), torch.bfloat16, meta)
    sd = meta_sd(paths["text_encoder_1"])
    cfg1 = L.infer_clip_config(sd, None)
    modules["text_encoder_1"] = L.assemble(lambda: L.build_clip(cfg1), L.convert_clip(sd), torch.bfloat16, meta)
    sd = meta_sd(paths["vae"])
    cfgv = L.infer_vae_config(sd)
    modules["vae"] = L.assemble(lambda: L.build_vae(cfgv), L.convert_bfl_vae(sd), torch.bfloat16, meta)
    for role, module in modules.items():
        got, want = vram.sizes_from_module(role, module), dev_sizes[role]
        assert (got.params, got.fp8_params, got.blocks, got.block_fp8) == \
               (want.params, want.fp8_params, want.blocks, want.block_fp8), role
        assert 0 < got.largest_layer <= want.largest_layer       # BFL's fused qkv+mlp is one layer, diffusers' four
        assert got.dims == want.dims


def redux_manifest_paths(root):
    d = root / "adapters" / "black-forest-labs--FLUX.1-Redux-dev"
    return {"flux_redux_image_encoder": d / "image_encoder" / "model.safetensors.json",
            "flux_redux_image_embedder": d / "image_embedder" / "diffusion_pytorch_model.safetensors.json"}


SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
              patch_size=14)


def test_planner_with_the_redux_manifests(manifests_dir, dev_sizes):
    """FLUX.1-Redux's SigLIP tower and embedder beside FLUX.1-dev: their labels, bf16 sizes from the manifests, small
    activations, their stage named in the peak note, and never a faster plan with them than without."""
    redux = vram.sizes_from_manifests(redux_manifest_paths(manifests_dir))
    enc, emb = redux["flux_redux_image_encoder"], redux["flux_redux_image_embedder"]
    assert enc.params == 428_225_600 and emb.params == 64_503_808
    assert len(enc.blocks) == 27 and dict(enc.dims) == {"tokens": 729, "hidden": 1152, "d_ff": 4304}
    assert dict(emb.dims) == {"d_in": 1152, "d_ff": 12288, "d_out": 4096}
    sizes = {**dev_sizes, **redux}
    p = vram.plan(sizes, "cuda", None)
    rows = {r["role"]: r for r in p.describe()}
    assert list(rows) == ["text_encoder_1", "text_encoder_2", "flux_redux_image_encoder", "flux_redux_image_embedder",
                          "dit", "vae"]
    assert rows["flux_redux_image_encoder"]["label"] == "SigLIP vision encoder (Redux)"
    assert rows["flux_redux_image_embedder"]["label"] == "Redux image embedder"
    assert rows["flux_redux_image_encoder"]["vram_gb"] == pytest.approx(428_225_600 * 2 / vram.GiB, abs=1e-5)
    assert rows["flux_redux_image_embedder"]["vram_gb"] == pytest.approx(64_503_808 * 2 / vram.GiB, abs=1e-5)
    for role in redux:      # tens of MB: one 384 px image's 729 tokens, far below the transformer's
        assert 10 * 2 ** 20 < p.entries[role].activation_bytes < p.entries["dit"].activation_bytes / 4, role
    alone = vram.plan({"flux_redux_image_encoder": enc}, "cuda", None)
    assert "during SigLIP image encoding" in " ".join(alone.notes)
    for b in BUDGETS:
        with_redux, without = vram.plan(sizes, "cuda", b), vram.plan(dev_sizes, "cuda", b)
        assert with_redux.fits and with_redux.predicted_peak_vram_gb <= b
        # Redux adds work and takes room: never faster; its two are small and run once per image prompt, so
        # they are resident or offloaded (never streamed or fp8)
        assert with_redux.predicted_seconds >= without.predicted_seconds - 1e-3, b
        assert {with_redux.entries[r].option for r in redux} <= {"R", "O"}, b


def test_a_role_the_table_does_not_know_gets_the_defaults(dev_sizes):
    """An adapter with no row in engine.roles: named by its slot, listed last, planned with the default options."""
    extra = vram.sizes_from_tensors("my_adapter", {"proj.weight": {"shape": [4096, 4096], "dtype": "BF16"},
                                                   "proj.bias": {"shape": [4096], "dtype": "BF16"}})
    assert extra.fp8_params == extra.params == 4096 * 4097
    sizes = {**dev_sizes, "my_adapter": extra}
    roomy = vram.plan(sizes, "cuda", 80)
    assert roomy.describe()[-1]["role"] == roomy.describe()[-1]["label"] == "my_adapter"
    assert roomy.entries["my_adapter"].strategy == "resident" and roomy.entries["my_adapter"].activation_bytes > 0
    for b in (6, 8, 12):
        assert vram.plan(sizes, "cuda", b).entries["my_adapter"].option in ("R", "O", "FO", "S"), b


def test_redux_manifest_sizes_equal_the_module_sizes(manifests_dir):
    """The Redux sizes read from the manifests are those of transformers' SiglipVisionModel (so400m) and diffusers'
    ReduxImageEncoder built on meta, with the same fp8 and block rules."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipVisionConfig, SiglipVisionModel

    want = vram.sizes_from_manifests(redux_manifest_paths(manifests_dir))
    with torch.device("meta"):
        modules = {"flux_redux_image_encoder": SiglipVisionModel(SiglipVisionConfig(**SO400M)),
                   "flux_redux_image_embedder": ReduxImageEncoder()}
    for role, module in modules.items():
        got = vram.sizes_from_module(role, module)
        assert (got.params, got.fp8_params, got.blocks, got.block_fp8, got.largest_layer, dict(got.dims)) == \
               (want[role].params, want[role].fp8_params, want[role].blocks, want[role].block_fp8,
                want[role].largest_layer, dict(want[role].dims)), role


def test_siglip_streamed_and_fp8_placements():
    """SigLIP's placing rules: streamed block by block (its encoder layers) gives the resident output; fp8 storage
    casts the encoder layers' Linears only (embeddings, norms and the pooling head stay)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=28, patch_size=14)
    model = SiglipVisionModel(cfg).eval()
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        resident = model(pixel_values=pixels).pooler_output
    role = "flux_redux_image_encoder"
    cpu = torch.device("cpu")
    P.apply(model, P.ComponentPlacement(cpu, torch.float32, cpu, torch.float32, "stream"), role)
    assert "group_offloading" in model.encoder.layers[0]._diffusers_hook.hooks
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).pooler_output, resident)
    P.apply(model, P.ComponentPlacement(cpu, torch.float32, cpu, FP8, "fp8"), role)
    assert model.encoder.layers[0].mlp.fc1.weight.dtype == FP8
    assert model.embeddings.patch_embedding.weight.dtype == torch.float32
    assert model.head.mlp.fc1.weight.dtype == torch.float32
    with torch.no_grad():
        out = model(pixel_values=pixels).pooler_output
    assert 0 < ((out - resident).norm() / resident.norm()).item() < 0.1


# ---------------------------------------------------------------------------------------------- the seed's fields
CUDA_OFFLOAD = dict(offload_dtype=torch.bfloat16, offload_device="cpu", onload_dtype=torch.bfloat16,
                    onload_device="cuda", preparing_dtype=torch.bfloat16, preparing_device="cuda",
                    computation_dtype=torch.bfloat16, computation_device="cuda")
FP8_OFFLOAD = dict(CUDA_OFFLOAD, offload_dtype=FP8, onload_dtype=FP8, preparing_dtype=FP8)
DYNAMIC = dict(FP8_OFFLOAD, onload_device="cpu")                       # the seed's quick start
DISK = dict(DYNAMIC, offload_dtype="disk", offload_device="disk", onload_dtype="disk", onload_device="disk")


@pytest.mark.parametrize("fields, options", [
    ({}, ("R",)),                                         # no offload_dtype/offload_device: not managed
    ({"computation_dtype": torch.bfloat16}, ("R",)),
    (CUDA_OFFLOAD, ("O",)),                               # the docs' "CPU Offload"
    (FP8_OFFLOAD, ("FO",)),                               # "FP8 Quantization"
    (DYNAMIC, ("FO", "SF")),                              # "Dynamic VRAM Management": moved in if room, else streamed
    (dict(DYNAMIC, preparing_device="cpu"), ("SF",)),     # always computed from the RAM copy
    (DISK, ("SFM",)),                                     # "Disk Offload" (fp8 preparing dtype)
    (dict(DISK, preparing_dtype=torch.bfloat16), ("SM",)),
    (dict(FP8_OFFLOAD, offload_device="cuda", onload_device="cuda"), ("F",)),
])
def test_seed_fields_map_as_diffsynth_defines_them(fields, options):
    opts, device, dtype, _note = vram.options_from_fields(fields, "cuda:0", "bfloat16")
    assert opts == options and device == "cuda:0" and dtype == "bfloat16"


def test_seed_quick_start_fields_follow_the_budget(dev_sizes):
    fields = {r: DYNAMIC for r in ROLES}
    roomy = vram.plan(dev_sizes, "cuda", 23, fields=fields)
    small = vram.plan(dev_sizes, "cuda", 8, fields=fields)
    assert roomy.entries["dit"].strategy == "fp8+offload" and roomy.entries["dit"].source == "fields"
    assert small.entries["dit"].strategy == "stream" and small.entries["dit"].storage_dtype == vram.FP8
    assert small.predicted_peak_vram_gb <= 8
    # a component without fields is still the planner's
    mixed = vram.plan(dev_sizes, "cuda", 80, fields={"dit": CUDA_OFFLOAD})
    assert mixed.entries["dit"].strategy == "offload" and mixed.entries["text_encoder_2"].strategy == "resident"


# -------------------------------------------------------------------------------------------------- demo model
def demo_pipe(demo_dir, dtype=torch.float32, fields=None):
    from engine import FluxImagePipeline, ModelConfig
    fields = fields or {}
    d = pathlib.Path(demo_dir)
    configs = [ModelConfig(path=d / "flux1-dev.safetensors", **fields.get("dit", {})),
               ModelConfig(path=d / "ae.safetensors", **fields.get("vae", {})),
               ModelConfig(path=d / "text_encoder" / "model.safetensors", **fields.get("text_encoder_1", {})),
               ModelConfig(path=sorted(glob.glob(str(d / "text_encoder_2" / "*.safetensors"))),
                           **fields.get("text_encoder_2", {}))]
    return FluxImagePipeline.from_pretrained(torch_dtype=dtype, device="cpu", model_configs=configs,
                                             tokenizer_1_config=ModelConfig(path=d / "tokenizer"),
                                             tokenizer_2_config=ModelConfig(path=d / "tokenizer_2"))


RUN = dict(prompt="a lighthouse at dusk", seed=3, height=64, width=64, num_inference_steps=4,
           progress_bar_cmd=lambda it: it)


def image(pipe, **kw):
    return np.asarray(pipe(**{**RUN, **kw}), dtype=np.int16)


def force(pipe, strategy, storage=None):
    """Place every component with ``strategy``, the CPU as compute and offload device."""
    pipe.residency.offload_all()
    pipe.residency.forget()
    for role in ROLES:
        place = P.ComponentPlacement(torch.device("cpu"), pipe.torch_dtype, torch.device("cpu"),
                                     storage or pipe.torch_dtype, strategy=strategy, role=role)
        pipe.placements[role] = place
        setattr(pipe, role, P.apply(getattr(pipe, role), place, role))
    pipe._prompt_encoder = None


def test_offloaded_and_streamed_runs_equal_the_resident_run(demo_dir):
    pipe = demo_pipe(demo_dir)
    assert {e.strategy for e in pipe.plan.entries.values()} == {"resident"}
    resident = image(pipe)
    force(pipe, "offload")
    pipe.prompt_cache.clear()          # run the text encoders again, to see them moved in for their stage
    assert np.array_equal(image(pipe), resident)
    # each component was moved in for its stage, and (no budget) the others went back, as the seed's pipeline does
    assert pipe.residency.moves[:5] == [("text_encoder_1", "in"), ("text_encoder_1", "out"),
                                        ("text_encoder_2", "in"), ("text_encoder_2", "out"), ("dit", "in")]
    assert ("dit", "out") in pipe.residency.moves and pipe.residency.onloaded() == ["vae"]
    force(pipe, "stream")
    hooks = pipe.dit.transformer_blocks[0]._diffusers_hook.hooks
    assert "group_offloading" in hooks                                      # diffusers' group offloading, per block
    assert hasattr(pipe.text_encoder_2.encoder.block[0], "_diffusers_hook")
    assert hasattr(pipe.text_encoder_1.encoder.layers[0], "_diffusers_hook")
    assert np.array_equal(image(pipe), resident)
    force(pipe, "resident")                                                 # hooks come off again
    assert "group_offloading" not in pipe.dit.transformer_blocks[0]._diffusers_hook.hooks
    assert np.array_equal(image(pipe), resident)
    # fp8: resident, offloaded and streamed fp8 give the same image as each other
    force(pipe, "fp8", FP8)
    fp8 = image(pipe)
    force(pipe, "fp8+offload", FP8)
    assert np.array_equal(image(pipe), fp8)
    force(pipe, "stream", FP8)
    assert np.array_equal(image(pipe), fp8)


def test_residency_evicts_only_when_the_budget_needs_it():
    r = P.Residency()
    mods = {n: torch.nn.Linear(2, 2) for n in "abc"}
    place = P.ComponentPlacement(torch.device("cpu"), torch.float32, torch.device("cpu"), torch.float32,
                                 strategy="offload", vram_bytes=40)
    r.configure(budget_bytes=100, fixed_bytes=10)
    r.onload("a", mods["a"], place)
    r.onload("b", mods["b"], place)          # 10 + 40 + 40 <= 100: both stay
    assert r.onloaded() == ["a", "b"]
    r.onload("a", mods["a"], place)          # a is used again: most recent
    r.onload("c", mods["c"], place)          # needs room: the least recently used (b) goes
    assert r.onloaded() == ["a", "c"] and ("b", "out") in r.moves


def test_fp8_storage_against_full_precision(demo_dir):
    """fp8 (e4m3) storage, bf16 computation, against the same weights in bf16 (and fp32 for scale).

    Bounds (the demo model: random weights, 64 wide transformer, 32 wide T5): one transformer call differs by at most
    5% (relative L2; measured 1.3%, while bf16 itself is ~17% from fp32 on these untrained weights), T5's hidden states
    by at most 10% (measured 5%), and a 4-step 64x64 image by at most 2 levels on average (measured 0.5)."""
    from engine.loading import load_models
    from engine import latents as lat
    from engine.pipeline import denoise_step

    def dit(dtype):
        return load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=dtype)["dit"]

    bf16, fp8 = dit(torch.bfloat16), dit(torch.bfloat16)
    P.apply(fp8, P.ComponentPlacement(torch.device("cpu"), torch.bfloat16, torch.device("cpu"), FP8, "fp8"), "dit")
    linear = fp8.transformer_blocks[0].norm1.linear                          # modulation linears are fp8 too
    assert linear.weight.dtype == FP8 and fp8.x_embedder.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = lat.pack(torch.randn(1, 16, 16, 16, generator=g)).bfloat16()
    emb, pooled = torch.randn(1, 64, 32, generator=g).bfloat16(), torch.randn(1, 64, generator=g).bfloat16()
    args = (x, torch.tensor([0.75], dtype=torch.bfloat16), torch.tensor([3.5]), pooled, emb, lat.text_ids(64),
            lat.image_ids(128, 128))
    with torch.no_grad():
        v_bf16 = denoise_step(bf16, *args).float()
        v_fp8 = denoise_step(fp8, *args).float()
    rel = ((v_fp8 - v_bf16).norm() / v_bf16.norm()).item()
    assert 0 < rel < FP8_DIT_REL_BOUND, rel
    assert linear.weight.dtype == FP8                                        # cast back after the call

    t5_files = sorted(glob.glob(str(demo_dir / "text_encoder_2" / "*.safetensors")))
    t5_bf16 = load_models(t5_files, torch_dtype=torch.bfloat16)["text_encoder_2"]
    t5_fp8 = load_models(t5_files, torch_dtype=torch.bfloat16)["text_encoder_2"]
    P.apply(t5_fp8, P.ComponentPlacement(torch.device("cpu"), torch.bfloat16, torch.device("cpu"), FP8, "fp8"),
            "text_encoder_2")
    assert t5_fp8.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == FP8
    ids = torch.randint(0, 500, (1, 32), generator=g)
    with torch.no_grad():
        h_bf16 = t5_bf16(ids).last_hidden_state.float()
        h_fp8 = t5_fp8(ids).last_hidden_state.float()
    rel_t5 = ((h_fp8 - h_bf16).norm() / h_bf16.norm()).item()
    assert 0 < rel_t5 < FP8_T5_REL_BOUND, rel_t5

    fp8_fields = dict(offload_dtype=FP8, offload_device="cpu", onload_dtype=FP8, onload_device="cpu",
                      preparing_dtype=FP8, preparing_device="cpu", computation_dtype=torch.bfloat16,
                      computation_device="cpu")
    full = image(demo_pipe(demo_dir, torch.bfloat16))
    stored = demo_pipe(demo_dir, torch.bfloat16, {"dit": fp8_fields, "text_encoder_2": fp8_fields})
    assert stored.plan.entries["dit"].strategy == "fp8" and stored.plan.entries["dit"].source == "fields"
    diff = np.abs(image(stored) - full)
    assert 0 < diff.mean() <= FP8_PIXEL_MEAN_BOUND, diff.mean()


# ------------------------------------------------------------------------------------------------------- engine
@pytest.fixture
def engine(demo_dir, tmp_path):
    from studio.engine import Engine
    return Engine(models_dir=demo_dir.parents[1], demo=True, outputs_dir=tmp_path / "outputs")


SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "prompt": "a red boat", "seed": 7}


def test_engine_memory_plan_and_limit_without_restart(engine):
    before = engine.memory_plan()                        # nothing loaded: planned from the files' headers
    assert before["loaded"] is False and len(before["components"]) == 4 and before["vram_limit_gb"] is None
    assert before["device"] == "cpu"
    first = engine.generate(SMALL)[0]
    plan = engine.memory_plan()
    assert plan["loaded"] and {c["strategy"] for c in plan["components"]} == {"resident"}
    pipe = engine.pipeline(engine.default_variant())
    dit = pipe.dit
    # Plan for 64x64 images (the engine plans for 1024x1024 until a bigger image is asked for), and take the smallest
    # limit anything fits in (the same planner function, on the module sizes).
    pipe.plan_size = (64, 64)
    pipe.plan_steps = 28      # as many steps as the plan below assumes (fewer make fp8 the faster choice here)
    sizes = {r: vram.sizes_from_module(r, getattr(pipe, r)) for r in ROLES}
    limit = next(float(b) for b in np.round(np.arange(0.001, 0.1, 0.0005), 4)
                 if vram.plan(sizes, "cpu", float(b), compute_dtype="float32", width=64, height=64).fits)
    small = engine.set_vram_limit(limit)
    assert small["vram_limit_gb"] == limit and small["fits"] and small["predicted_peak_vram_gb"] <= limit
    assert small["resolution"] == "64x64"
    assert "offload" in {c["strategy"] for c in small["components"]}
    assert engine.pipeline(engine.default_variant()) is pipe and pipe.dit is dit          # re-placed, not reloaded
    offloaded = engine.generate(SMALL)[0]
    assert np.array_equal(np.asarray(Image.open(first["path"])), np.asarray(Image.open(offloaded["path"])))
    # An fp8 transformer (as a tight limit on a real GPU gives) asked back to full precision is re-read from its
    # file: the image is the first one again.
    P.apply(pipe.dit, P.ComponentPlacement(torch.device("cpu"), torch.float32, torch.device("cpu"), FP8, "fp8"), "dit")
    assert any(p.dtype == FP8 for p in pipe.dit.parameters())
    back = engine.set_vram_limit(None)
    assert {c["strategy"] for c in back["components"]} == {"resident"} and back["vram_limit_gb"] is None
    assert not any(p.dtype == FP8 for p in pipe.dit.parameters()) and pipe.dit is not dit
    again = engine.generate(SMALL)[0]
    assert np.array_equal(np.asarray(Image.open(first["path"])), np.asarray(Image.open(again["path"])))
    for bad in (-1, 0, "lots", float("nan")):
        with pytest.raises(EngineError, match="VRAM limit"):
            engine.set_vram_limit(bad)


def _oom_once(monkeypatch, times):
    import engine.pipeline as pipeline_mod
    real = pipeline_mod.denoise_step
    calls = {"oom": 0}

    def flaky(*args, **kwargs):
        if calls["oom"] < times:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "denoise_step", flaky)
    return calls


def test_out_of_memory_is_retried_with_a_tighter_plan(engine, monkeypatch):
    engine.generate(SMALL)
    before = engine.memory_plan()
    calls = _oom_once(monkeypatch, times=1)
    messages = []
    result = engine.generate(SMALL, progress=lambda d, t, m: messages.append(m))[0]
    assert calls["oom"] == 1 and pathlib.Path(result["path"]).exists()
    after = engine.memory_plan()
    assert after["predicted_peak_vram_gb"] < before["predicted_peak_vram_gb"]
    assert after["vram_limit_gb"] == pytest.approx(0.6 * before["predicted_peak_vram_gb"], rel=0.02)
    assert [c["strategy"] for c in after["components"]] != [c["strategy"] for c in before["components"]]
    note = result["notes"][0]
    assert "ran out of memory" in note and "re-planned" in note and "ran it again" in note
    assert any("retrying" in m for m in messages)


def test_out_of_memory_twice_gives_clear_advice_and_engine_stays_usable(engine, monkeypatch):
    engine.generate(SMALL)
    _oom_once(monkeypatch, times=2)
    with pytest.raises(EngineError) as err:
        engine.generate(SMALL)
    assert "Out of GPU memory twice" in str(err.value) and "--vram-limit" in str(err.value)
    monkeypatch.undo()
    assert pathlib.Path(engine.generate(SMALL)[0]["path"]).exists()
    assert engine.generate({**SMALL, "prompt": "boom"})[0]["seed"] == 7


def test_real_runtime_errors_are_not_treated_as_oom(engine, monkeypatch):
    import engine.pipeline as pipeline_mod

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(pipeline_mod, "denoise_step", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        engine.generate(SMALL)
    assert engine.vram_limit is None
