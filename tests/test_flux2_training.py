"""FLUX.2 LoRA training (issue 16, item 4): DiffSynth-Studio's FLUX.2 train.py flags on the random-weight klein 4B
demo, on the CPU.

- the seed's FLUX.2 LoRA scripts (klein 4B / 9B / base, the edit variants, [dev]'s split runs) parse; its klein 4B
  and base 4B commands run as written (data, epochs and output changed; the base one in bf16 with its transformer in
  fp8, as on a GPU -- and FLUX.1's fp8 + bf16 case, which the same fix in engine.training.model covers)
- the run's family is read from the model files; the seed's FLUX.2 target names resolve onto the transformer
- the objective's schedule is the seed's FLUX.2 training schedule (mu 0.8, bf16 timestep lookup, bell weights)
- a LoRA overfits two images (the fixed-noise loss falls by the factor measured below); its file has exactly the
  seed's keys (<module>.lora_A.default.weight / lora_B.default.weight, no alpha) holding the trained matrices, and
  the engine's FLUX.2 LoRA reader (engine.lora) attaches it to a fresh transformer with the trained model's loss
- a stopped run resumes at its saved step to the same weights as an uninterrupted run
- an edit LoRA (--extra_inputs edit_image) feeds the references' tokens at t = 10, 20 and they change the loss
- the studio's Train service offers the FLUX.2 demo, trains on it and publishes the LoRA into the library
"""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from engine.errors import EngineError
from engine.training import checkpoints as ck
from engine.training import flux2 as f2
from engine.training.api import resume_training
from engine.training.args import TrainConfig, parse_args
from engine.training.data import TrainingDataset
from engine.training.runner import Trainer

pytestmark = pytest.mark.filterwarnings("ignore")

MIRROR = pathlib.Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")
KLEIN, BASE = "black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B"

# The seed's own commands (examples/flux2/model_training/lora/FLUX.2-klein-4B.sh and -base-4B.sh; the edit one is
# the commented block of the klein 4B script), verbatim.
SEED_KLEIN_4B = """accelerate launch examples/flux2/model_training/train.py \
  --dataset_base_path data/diffsynth_example_dataset/flux2/FLUX.2-klein-4B \
  --dataset_metadata_path data/diffsynth_example_dataset/flux2/FLUX.2-klein-4B/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,black-forest-labs/FLUX.2-klein-4B:transformer/*.safetensors,black-forest-labs/FLUX.2-klein-4B:vae/diffusion_pytorch_model.safetensors" \
  --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.2-klein-4B_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj,single_transformer_blocks.0.attn.to_out,single_transformer_blocks.1.attn.to_out,single_transformer_blocks.2.attn.to_out,single_transformer_blocks.3.attn.to_out,single_transformer_blocks.4.attn.to_out,single_transformer_blocks.5.attn.to_out,single_transformer_blocks.6.attn.to_out,single_transformer_blocks.7.attn.to_out,single_transformer_blocks.8.attn.to_out,single_transformer_blocks.9.attn.to_out,single_transformer_blocks.10.attn.to_out,single_transformer_blocks.11.attn.to_out,single_transformer_blocks.12.attn.to_out,single_transformer_blocks.13.attn.to_out,single_transformer_blocks.14.attn.to_out,single_transformer_blocks.15.attn.to_out,single_transformer_blocks.16.attn.to_out,single_transformer_blocks.17.attn.to_out,single_transformer_blocks.18.attn.to_out,single_transformer_blocks.19.attn.to_out" \
  --lora_rank 32 \
  --use_gradient_checkpointing"""
SEED_KLEIN_4B_EDIT = """accelerate launch examples/flux2/model_training/train.py \
  --dataset_base_path data/diffsynth_example_dataset/qwen_image/Qwen-Image-Edit-2511 \
  --dataset_metadata_path data/diffsynth_example_dataset/qwen_image/Qwen-Image-Edit-2511/metadata.json \
  --data_file_keys "image,edit_image" \
  --extra_inputs "edit_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,black-forest-labs/FLUX.2-klein-4B:transformer/*.safetensors,black-forest-labs/FLUX.2-klein-4B:vae/diffusion_pytorch_model.safetensors" \
  --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.2-klein-4B_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj,single_transformer_blocks.0.attn.to_out,single_transformer_blocks.1.attn.to_out,single_transformer_blocks.2.attn.to_out,single_transformer_blocks.3.attn.to_out,single_transformer_blocks.4.attn.to_out,single_transformer_blocks.5.attn.to_out,single_transformer_blocks.6.attn.to_out,single_transformer_blocks.7.attn.to_out,single_transformer_blocks.8.attn.to_out,single_transformer_blocks.9.attn.to_out,single_transformer_blocks.10.attn.to_out,single_transformer_blocks.11.attn.to_out,single_transformer_blocks.12.attn.to_out,single_transformer_blocks.13.attn.to_out,single_transformer_blocks.14.attn.to_out,single_transformer_blocks.15.attn.to_out,single_transformer_blocks.16.attn.to_out,single_transformer_blocks.17.attn.to_out,single_transformer_blocks.18.attn.to_out,single_transformer_blocks.19.attn.to_out" \
  --lora_rank 32 \
  --use_gradient_checkpointing"""
SEED_KLEIN_BASE_4B = """accelerate launch examples/flux2/model_training/train.py \
  --dataset_base_path data/diffsynth_example_dataset/flux2/FLUX.2-klein-base-4B \
  --dataset_metadata_path data/diffsynth_example_dataset/flux2/FLUX.2-klein-base-4B/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.2-klein-4B:text_encoder/*.safetensors,black-forest-labs/FLUX.2-klein-base-4B:transformer/*.safetensors,black-forest-labs/FLUX.2-klein-4B:vae/diffusion_pytorch_model.safetensors" \
  --tokenizer_path "black-forest-labs/FLUX.2-klein-4B:tokenizer/" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.2-klein-base-4B_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,linear_in,linear_out,to_qkv_mlp_proj,single_transformer_blocks.0.attn.to_out,single_transformer_blocks.1.attn.to_out,single_transformer_blocks.2.attn.to_out,single_transformer_blocks.3.attn.to_out,single_transformer_blocks.4.attn.to_out,single_transformer_blocks.5.attn.to_out,single_transformer_blocks.6.attn.to_out,single_transformer_blocks.7.attn.to_out,single_transformer_blocks.8.attn.to_out,single_transformer_blocks.9.attn.to_out,single_transformer_blocks.10.attn.to_out,single_transformer_blocks.11.attn.to_out,single_transformer_blocks.12.attn.to_out,single_transformer_blocks.13.attn.to_out,single_transformer_blocks.14.attn.to_out,single_transformer_blocks.15.attn.to_out,single_transformer_blocks.16.attn.to_out,single_transformer_blocks.17.attn.to_out,single_transformer_blocks.18.attn.to_out,single_transformer_blocks.19.attn.to_out" \
  --lora_rank 32 \
  --use_gradient_checkpointing"""


def script_argv(command: str) -> list:
    argv = shlex.split(command.replace("\\\n", " "))
    return argv[next(i for i, a in enumerate(argv) if a.endswith("train.py")) + 1:]


def with_args(argv: list, **changes) -> list:
    """The command line with some flags' values replaced (or added; None removes the flag)."""
    out = list(argv)
    for name, value in changes.items():
        flag = f"--{name}"
        if flag in out:
            i = out.index(flag)
            if value is None:
                del out[i: i + 2]
            else:
                out[i + 1] = str(value)
        elif value is not None:
            out += [flag, str(value)]
    return out


def photo(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """The FLUX.2 demo written once, and linked under the real repositories' names (klein 4B, klein base 4B) in a
    models folder that is DIFFSYNTH_MODEL_BASE_PATH while this module runs (so the seed's model ids resolve)."""
    from engine.demo.flux2 import write_flux2_demo
    models = tmp_path_factory.mktemp("flux2-train-models")
    demo = write_flux2_demo(models)
    for repo in (KLEIN, BASE):
        shutil.copytree(demo, models / repo, copy_function=os.link)
    old = {k: os.environ.get(k) for k in ("DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_SKIP_DOWNLOAD")}
    os.environ.update(DIFFSYNTH_MODEL_BASE_PATH=str(models), DIFFSYNTH_SKIP_DOWNLOAD="true")
    yield demo
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2-data")
    for i in range(2):
        photo(i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo number {i}")
    return root


def demo_config(klein, data, out, **kw) -> TrainConfig:
    """A LoRA run on the demo's folders named directly (--model_paths, as the seed's JSON list)."""
    paths = [str(klein / "transformer"), str(klein / "vae"), str(klein / "text_encoder")]
    base = dict(dataset_base_path=str(data), model_paths=json.dumps(paths), tokenizer_path=str(klein / "tokenizer"),
                lora_base_model="dit", lora_target_modules=f2.diffsynth_targets(2), lora_rank=4, learning_rate=1e-3,
                num_epochs=2, output_path=str(out))
    base.update(kw)
    return TrainConfig(**base)


def state_tensors(run_dir) -> dict:
    return ck.load_state(ck.latest_state(run_dir))["trainable"]


def run_to_end(config, run_dir=None, stop_at=None):
    run_dir = run_dir or ck.new_run_dir(config.output_path)
    stop = threading.Event()

    def progress(event):
        if stop_at is not None and event["event"] == "step" and event["step"] == stop_at:
            stop.set()

    return Trainer(config, run_dir, on_progress=progress, stop_event=stop, log=lambda m: None).run(), run_dir


# ---------------------------------------------------------------------------------------------- arguments
def test_seed_flux2_commands_parse():
    config, resume, notes = parse_args(script_argv(SEED_KLEIN_4B) + ["--initialize_model_on_cpu"])
    assert resume is None and config.tokenizer_path == f"{KLEIN}:tokenizer/"
    assert config.model_id_with_origin_paths.split(",") == [f"{KLEIN}:text_encoder/*.safetensors",
                                                            f"{KLEIN}:transformer/*.safetensors",
                                                            f"{KLEIN}:vae/diffusion_pytorch_model.safetensors"]
    assert config.lora_target_modules == f2.diffsynth_targets(20) and config.lora_rank == 32
    assert config.lora_base_model == "dit" and config.remove_prefix_in_ckpt == "pipe.dit."
    assert config.use_gradient_checkpointing and not config.align_to_opensource_format
    assert (config.dataset_repeat, config.num_epochs, config.learning_rate) == (50, 5, 1e-4)
    assert any("--initialize_model_on_cpu is accepted" in n for n in notes)
    config, _, _ = parse_args(script_argv(SEED_KLEIN_4B_EDIT))
    assert config.extra_input_names() == ["edit_image"] and config.data_keys() == ["image", "edit_image"]
    assert config.edit_image_auto_resize and config.dataset_metadata_path.endswith("metadata.json")
    config, _, _ = parse_args(script_argv(SEED_KLEIN_BASE_4B))
    assert f"{BASE}:transformer/*.safetensors" in config.model_id_with_origin_paths
    assert not parse_args(["--no_edit_image_auto_resize"])[0].edit_image_auto_resize
    if MIRROR.is_dir():   # every FLUX.2 LoRA script of the reference (edit blocks uncommented) and its full runs
        names = subprocess.run(["git", "-C", str(MIRROR), "ls-tree", "-r", "HEAD", "--name-only"],
                               capture_output=True, text=True).stdout.split()
        scripts = [n for n in names if n.startswith(("examples/flux2/model_training/lora/",
                                                     "examples/flux2/model_training/full/FLUX.2",
                                                     "examples/flux2/model_training/special/split_training/FLUX.2"))
                   and n.endswith(".sh")]
        assert len(scripts) >= 10
        parsed = 0
        for name in scripts:
            text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:{name}"], capture_output=True,
                                  text=True).stdout
            text = "\n".join(line[2:] if line.startswith("# ") else line for line in text.splitlines())
            for line in text.replace("\\\n", " ").splitlines():
                if "model_training/train.py" in line:
                    parse_args(script_argv(line))
                    parsed += 1
        assert parsed >= 16


def test_the_family_comes_from_the_files(klein, demo_dir, folder_data, tmp_path):
    from engine.training.families import FLUX1, FLUX2, family_of
    assert family_of(demo_config(klein, folder_data, tmp_path)) is FLUX2
    flux1 = TrainConfig(model_paths=json.dumps([str(demo_dir / "flux1-dev.safetensors"),
                                                str(demo_dir / "ae.safetensors")]))
    assert family_of(flux1) is FLUX1
    # What a FLUX.2 run cannot take is refused by name before anything loads.
    for change, message in [({"extra_inputs": "kontext_images"}, "training FLUX.2 with these inputs"),
                            ({"align_to_opensource_format": True}, "FLUX.2 LoRAs are written in DiffSynth-Studio's keys")]:
        with pytest.raises(EngineError, match=message):
            run_to_end(demo_config(klein, folder_data, tmp_path / "refused", **change))


def test_target_names_resolve_on_the_flux2_transformer(klein):
    from engine.flux2.loading import load_flux2_models
    dit = load_flux2_models([klein / "transformer"], torch_dtype=torch.float32)["dit"]
    per_double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                  "ff_context.linear_out"]
    expected = {f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_double}
    expected |= {f"single_transformer_blocks.{i}.attn.{n}" for i in range(2) for n in ("to_qkv_mlp_proj", "to_out")}
    targets, report = f2.resolve_targets(dit, f2.diffsynth_targets(2))
    assert set(targets) == expected
    # The klein 4B script's list (20 single blocks) on this 2-block model: the missing blocks are passed over.
    targets, report = f2.resolve_targets(dit, f2.diffsynth_targets(20))
    assert set(targets) == expected and "18 names of blocks this transformer does not have" in report[-1]
    with pytest.raises(EngineError, match="q, k, v, o, ffn.0, ffn.2 match no linear layer of the FLUX.2"):
        f2.resolve_targets(dit, TrainConfig().lora_target_modules)   # the seed's generic default (Wan's names)
    with pytest.raises(EngineError, match="a_to_qkv match no linear layer"):
        f2.resolve_targets(dit, "a_to_qkv,to_q")                     # FLUX.1's DiffSynth names are not FLUX.2's
    auto = f2.resolve_targets(dit, "")[0]                            # the seed's automatic choice: every block linear
    assert set(auto) == expected | {f"single_transformer_blocks.{i}.attn.to_out" for i in range(2)}


def test_preset_lora_is_fused_into_the_base(klein, folder_data, tmp_path):
    """--preset_lora_path (differential LoRA training): a FLUX.2 LoRA (here diffusers' keys with an alpha of half the
    rank) is added into the transformer's weights before the trained LoRA goes on."""
    from safetensors.torch import save_file

    from engine.flux2.loading import load_flux2_models
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 64, generator=g), torch.randn(576, 2, generator=g)
    save_file({"transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_A.weight": A,
               "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_B.weight": B,
               "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.alpha": torch.tensor(1.0)},
              str(tmp_path / "preset.safetensors"))
    config = demo_config(klein, folder_data, tmp_path, preset_lora_path=str(tmp_path / "preset.safetensors"),
                         preset_lora_model="dit")
    pipe = f2.load_pipeline(config, "cpu", torch.float32, log=lambda m: None)
    base = load_flux2_models([klein / "transformer"], torch_dtype=torch.float32)["dit"]
    layer = "single_transformer_blocks.1.attn.to_qkv_mlp_proj"
    got = dict(pipe.dit.named_modules())[layer].weight
    assert torch.allclose(got, dict(base.named_modules())[layer].weight + 0.5 * B @ A, atol=1e-6)
    assert torch.equal(pipe.dit.transformer_blocks[0].attn.to_q.weight, base.transformer_blocks[0].attn.to_q.weight)


def test_schedule_is_the_seeds_flux2_training_schedule():
    s = f2.Flux2TrainingSchedule()
    # FlowMatchScheduler("FLUX.2").set_timesteps(1000, training=True), written out independently in float64.
    base = torch.linspace(1.0, 1 / 1000, 1000, dtype=torch.float64)
    mu = torch.tensor(0.8, dtype=torch.float64)
    assert torch.allclose(s.sigmas.double(), mu.exp() / (mu.exp() + (1 / base - 1)), atol=1e-6)
    w = s.weights
    assert abs(float(w.mean()) - 1.0) < 1e-4 and float(w.min()) == 0.0
    assert abs(float(s.timesteps[int(w.argmax())]) - 500) < 2
    assert all(s.lookup(i) == i for i in range(1000))               # float32: the drawn index itself
    b = f2.Flux2TrainingSchedule(torch.bfloat16)
    moved = 0
    for i in range(1000):                                          # bf16: the seed's nearest-timestep lookup
        j, t = b.lookup(i), b.timesteps[i].to(torch.bfloat16).float()
        assert abs(float(b.timesteps[j] - t)) == float((b.timesteps - t).abs().min())
        assert b.timesteps[j].to(torch.bfloat16) == b.timesteps[i].to(torch.bfloat16)   # the DiT sees the same t
        moved += j != i
    assert moved > 100
    draws = {s.sample(torch.Generator().manual_seed(k))[0] for k in range(200)}
    assert len(draws) > 150


# ---------------------------------------------------------------------------------------------- training
def seed_keys(targets) -> set:
    return {f"{m}.lora_{x}.default.weight" for m in targets for x in ("A", "B")}


def test_lora_overfits_two_images_and_saves_the_seeds_keys(klein, folder_data, tmp_path):
    """The seed's FLUX.2 targets at rank 8 memorise 2 images: the loss at fixed sigmas 0.2..0.8 with fixed noise
    falls from 2.541 to 1.764 in 40 steps (factor 1.44 measured on this CPU). The file is the seed's: every trained
    layer's <module>.lora_A.default.weight [rank, in] / lora_B.default.weight [out, rank], nothing else."""
    config = demo_config(klein, folder_data, tmp_path / "runs", lora_rank=8, learning_rate=1e-2, num_epochs=20,
                         save_steps=20)
    run_dir = ck.new_run_dir(config.output_path)
    measured, events = {}, []
    trainer = Trainer(config, run_dir, log=lambda m: None)

    def progress(event):
        events.append(event)
        if event["event"] == "start":      # LoRA injected with zero up matrices: the base model's loss
            ds = TrainingDataset(config.dataset_base_path)
            measured["inputs"] = [trainer.encode(trainer.pipe, ds.load_record(i), "cpu") for i in range(2)]
            measured["before"] = f2.fixed_loss(trainer.dit, measured["inputs"], torch.float32)

    trainer.on_progress = progress
    result = trainer.run()
    after = f2.fixed_loss(trainer.dit, measured["inputs"], torch.float32)
    factor = measured["before"] / after
    assert trainer.family.name == "FLUX.2" and result["status"] == "finished" and result["step"] == 40
    assert factor > 1.3, f"loss {measured['before']:.4f} -> {after:.4f} (factor {factor:.3f})"
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 40 and all(np.isfinite(e["loss"]) for e in steps)
    outputs = [pathlib.Path(p).name for p in ck.read_run(run_dir)["outputs"]]
    assert outputs == ["step-20.safetensors", "step-40.safetensors"]

    from engine.training.export import peft_pairs
    targets = list(peft_pairs(trainer.dit))
    saved = load_file(result["final"])
    assert set(saved) == seed_keys(targets) and len(targets) == 28
    layers = dict(trainer.dit.named_modules())
    for m in targets:
        base = layers[m].base_layer
        assert saved[f"{m}.lora_A.default.weight"].shape == (8, base.in_features)
        assert saved[f"{m}.lora_B.default.weight"].shape == (base.out_features, 8)
    trained = state_tensors(run_dir)
    for m in targets:                  # the file holds the trained matrices themselves (alpha = rank: scale 1)
        assert torch.equal(saved[f"{m}.lora_A.default.weight"], trained[f"dit.{m}.lora_A.default.weight"])
        assert torch.equal(saved[f"{m}.lora_B.default.weight"], trained[f"dit.{m}.lora_B.default.weight"])
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)
    with safe_open(result["final"], "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["flux_studio_training"])
    assert meta["flux_studio_family"] == "FLUX.2" and info["family"] == "FLUX.2" and info["steps"] == 40
    assert info["base_model"]["dit"] == ["diffusion_pytorch_model.safetensors"]
    # The engine's FLUX.2 LoRA reader (engine.lora, as Generate and pipe.load_lora use it) reads the file as the seed's
    # format with the trained matrices, and attached to a freshly loaded transformer it gives the trained model's loss.
    from engine.flux2.loading import load_flux2_models
    from engine.lora import attach_lora, detach_loras, read_lora
    lf = read_lora(result["final"], family="FLUX.2")
    assert lf.format == "DiffSynth" and set(lf.targets) == set(targets)
    for m, (A, B, scale) in lf.targets.items():
        assert scale == 1.0 and torch.equal(A, saved[f"{m}.lora_A.default.weight"])
    fresh = load_flux2_models([klein / "transformer"], torch_dtype=torch.float32)["dit"]
    report = attach_lora(fresh, result["final"])
    assert report["bound"] == report["total"] == 28
    loaded = f2.fixed_loss(fresh, measured["inputs"], torch.float32)
    detach_loras(fresh)
    assert abs(loaded - after) < 1e-5 and abs(f2.fixed_loss(fresh, measured["inputs"], torch.float32)
                                              - measured["before"]) < 1e-5
    # The same LoRA starts a new run (--lora_checkpoint): the injected layers take the file's matrices.
    from engine.training.model import add_lora
    dit = load_flux2_models([klein / "transformer"], torch_dtype=torch.float32)["dit"]
    add_lora(dit, config, log=lambda m: None, resolve=f2.resolve_targets)
    assert f2.load_lora_weights(dit, result["final"], 8) == 28
    assert torch.equal(dict(dit.named_modules())[targets[0]].lora_B["default"].weight,
                       saved[f"{targets[0]}.lora_B.default.weight"])


def test_stopped_run_resumes_to_the_same_weights(klein, folder_data, tmp_path):
    config = demo_config(klein, folder_data, tmp_path / "runs", num_epochs=3, save_steps=2,
                         lora_target_modules="to_q,to_qkv_mlp_proj")
    whole, whole_dir = run_to_end(config)
    stopped, run_dir = run_to_end(config, stop_at=3)
    assert whole["status"] == "finished" and stopped["status"] == "stopped" and stopped["step"] == 3
    assert ck.run_summary(run_dir)["resumable"] and ck.state_files(run_dir)[-1][0] == 3
    resumed = resume_training(run_dir).wait(timeout=120)
    assert resumed["status"] == "finished" and resumed["step"] == 6
    a, b = state_tensors(whole_dir), state_tensors(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = load_file(whole["final"]), load_file(resumed["final"])
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert all(k.endswith(".default.weight") for k in fb)


def test_edit_lora_trains_with_the_references(klein, tmp_path):
    """The seed's klein 4B edit command (data, epochs, rank and output changed; references kept at their size):
    each record's edit_image (one, or a list of two) enters the transformer as tokens at t = 10, 20."""
    from engine.training.cli import main
    data = tmp_path / "edit"
    data.mkdir()
    for i in range(2):
        photo(i, (64, 48)).save(data / f"target{i}.png")
        photo(10 + i, (32, 32)).save(data / f"ref{i}.png")
    (data / "metadata.json").write_text(json.dumps([
        {"image": "target0.png", "prompt": "make it red", "edit_image": "ref0.png"},
        {"image": "target1.png", "prompt": "put them together", "edit_image": ["ref0.png", "ref1.png"]}]))
    seen, original = [], f2.encode

    def spy(pipe, item, config, device):
        inputs = original(pipe, item, config, device)
        seen.append(inputs)
        return inputs

    f2.encode = spy
    try:
        argv = with_args(script_argv(SEED_KLEIN_4B_EDIT), dataset_base_path=data,
                         dataset_metadata_path=data / "metadata.json", dataset_repeat=1, num_epochs=1, lora_rank=4,
                         output_path=tmp_path / "out") + ["--no_edit_image_auto_resize"]
        assert main(argv) == 0
    finally:
        f2.encode = original
    assert len(seen) == 2
    by_refs = {x.references.shape[1]: x for x in seen}
    assert sorted(by_refs) == [4, 8]                                # 32x32 references: 2x2 tokens each
    for n, x in by_refs.items():
        assert x.latents.shape == (1, 12, 128)                      # the 64x48 target keeps its size: 4x3 tokens
        t = x.img_ids[:, 0].tolist()
        assert t[:12] == [0] * 12 and t[12:] == [10] * 4 + ([20] * 4 if n == 8 else [])
    saved = load_file(tmp_path / "out" / "epoch-0.safetensors")
    assert saved and all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in saved)
    # The references reach the transformer: the same step's loss differs without them.
    from engine.flux2.loading import load_flux2_models
    dit = load_flux2_models([klein / "transformer"], torch_dtype=torch.float32)["dit"]
    x = by_refs[8]
    noise = torch.randn(x.latents.shape, generator=torch.Generator().manual_seed(0))
    with_refs = f2.flow_matching_loss(dit, x, 0.5, 1.0, noise, torch.float32)
    plain = f2.Flux2TrainingInputs(x.latents, x.prompt_emb, x.text_ids, x.img_ids[:12], 48, 64)
    assert abs(float(with_refs) - float(f2.flow_matching_loss(dit, plain, 0.5, 1.0, noise, torch.float32))) > 1e-4


def test_seed_klein_commands_run(klein, folder_data, tmp_path, capsys):
    """The seed's klein 4B LoRA command runs as written (data, epochs, rank, output changed): its model ids resolve
    to the files under the real repositories' names, the family is read from them, the targets of its 20-block
    list that this 2-block model has are trained. Its base 4B command with the transformer stored in fp8 too."""
    from engine.training.cli import main
    out = tmp_path / "train" / "FLUX.2-klein-4B_lora"
    argv = with_args(script_argv(SEED_KLEIN_4B), dataset_base_path=folder_data, dataset_metadata_path=None,
                     dataset_repeat=1, num_epochs=1, lora_rank=4, output_path=out, validate_prompt="a photo number 0",
                     validate_height=32, validate_width=32, validate_num_inference_steps=2)
    assert main(argv) == 0
    saved = load_file(out / "epoch-0.safetensors")
    assert {k.rsplit(".lora_", 1)[0] for k in saved} >= {"single_transformer_blocks.1.attn.to_out",
                                                        "transformer_blocks.1.ff_context.linear_out"}
    assert len(saved) == 2 * 28 and len(list((out / "samples").glob("*.png"))) == 1
    run = ck.read_run(out)
    assert run["status"] == "finished" and run["step"] == 2
    assert run["config"]["tokenizer_path"] == f"{KLEIN}:tokenizer/"
    # The seed's validate_lora/FLUX.2-klein-4B.py as a function: the klein files by id, the LoRA attached, samples.
    from engine import ModelConfig
    from engine.training.validate import validate_lora
    configs = [ModelConfig(model_id=KLEIN, origin_file_pattern=p) for p in
               ("text_encoder/*.safetensors", "transformer/*.safetensors", "vae/diffusion_pytorch_model.safetensors")]
    made = validate_lora(configs, out / "epoch-0.safetensors", ["a dog"], tmp_path / "validate", device="cpu",
                         torch_dtype=torch.float32, tokenizer_config=ModelConfig(model_id=KLEIN,
                                                                                 origin_file_pattern="tokenizer/"),
                         height=32, width=32, num_inference_steps=2, cfg_scale=4)
    assert [pathlib.Path(m).name for m in made] == ["epoch-0-0.png"] and Image.open(made[0]).size == (32, 32)

    # In bf16 (what a GPU run computes in) with float32 LoRA matrices over the fp8 base and gradient checkpointing.
    fp8 = f"{BASE}:transformer/*.safetensors"
    argv = with_args(script_argv(SEED_KLEIN_BASE_4B), dataset_base_path=folder_data, dataset_metadata_path=None,
                     dataset_repeat=1, num_epochs=1, lora_rank=4, output_path=tmp_path / "base", fp8_models=fp8,
                     torch_dtype="bfloat16")
    capsys.readouterr()
    assert main(argv) == 0
    assert "Stored in fp8: dit." in capsys.readouterr().out
    run = ck.read_run(tmp_path / "base")
    assert run["status"] == "finished" and np.isfinite(run["loss"])
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "base" / "epoch-0.safetensors").values())


def test_fp8_base_in_bf16_trains_flux1_too(demo_dir, folder_data, tmp_path):
    """The same case on FLUX.1 (the Train tab's VRAM presets store the base in fp8; a GPU computes in bf16): PEFT
    keeps casting the layers' bf16 inputs to the float32 LoRA matrices."""
    shards = [str(p) for p in sorted((demo_dir / "text_encoder_2").glob("*.safetensors"))]
    paths = [str(demo_dir / "flux1-dev.safetensors"), str(demo_dir / "ae.safetensors"),
             str(demo_dir / "text_encoder" / "model.safetensors"), shards]
    config = TrainConfig(dataset_base_path=str(folder_data), model_paths=json.dumps(paths), fp8_models=paths[0],
                         tokenizer_1_path=str(demo_dir / "tokenizer"), tokenizer_2_path=str(demo_dir / "tokenizer_2"),
                         lora_base_model="dit", lora_target_modules="a_to_qkv,to_qkv_mlp", lora_rank=4, num_epochs=1,
                         torch_dtype="bfloat16", use_gradient_checkpointing=True, output_path=str(tmp_path))
    result, _ = run_to_end(config)
    assert result["status"] == "finished" and np.isfinite(result["loss"])


# ------------------------------------------------------------------------------------------------ the studio
def test_the_train_service_trains_and_publishes_a_flux2_lora(klein, demo_dir, tmp_path_factory):
    """The Train tab's service offers the FLUX.2 demo (its files written when a run starts, if they are not yet),
    with the seed's FLUX.2 targets and the klein defaults; a run on it reports its steps and its LoRA goes into the
    LoRA library like a FLUX.1 run's."""
    import time

    from studio.engine import Engine
    from studio.training import models
    from studio.training.runs import TrainingJobs
    from tests.helpers import linked_models
    root = tmp_path_factory.mktemp("flux2-train-studio")
    engine = Engine(models_dir=linked_models(root / "models", demo_dir), demo=True, outputs_dir=root / "outputs",
                    allow_dirs=[tmp_path_factory.getbasetemp()])
    jobs = TrainingJobs(engine, mode="thread")
    name = "FLUX.2-klein-4B-random-demo"
    entry = next(b for b in jobs.base_models() if b["name"] == name)
    assert entry["available"] and entry["family"] == "FLUX.2" and entry.get("write_demo")   # not written yet
    written = []
    engine.catalogue.write_demo = lambda variant: written.append(variant.name) or shutil.copytree(
        klein, engine.models_dir / "FLUX-Studio" / klein.name, copy_function=os.link)
    up = tmp_path_factory.mktemp("flux2-uploads")
    files = [up / "a.png", up / "b.png"]
    for i, f in enumerate(files):
        photo(i, (80, 64)).save(f)
    ds = jobs.prepare_dataset(files, {"a.png": "a photo of sks dog", "b.png": "sks dog on grass"})
    form = {"base_model": name, "dataset": ds["folder"], "captions": ds["rows"], "steps": 4, "save_every": 2,
            "resolution": 64, "lora_rank": 4, "learning_rate": 1e-3, "sample_prompts": "a photo of sks dog",
            "sample_every": 2, "sample_size": 64, "run_name": "klein-dog"}
    config, _, total = jobs.build_config(form)
    assert written == [name] and total == 4
    assert config.lora_target_modules == f2.diffsynth_targets(2)          # the seed's list, for its 2 single blocks
    assert config.tokenizer_path.endswith("tokenizer") and config.validate_num_inference_steps == 4   # klein: 4
    assert config.validate_cfg_scale == 1.0 and config.extra_inputs is None
    # A metadata file with an edit_image column makes an edit LoRA run (the references as the seed's edit_image).
    pairs = tmp_path_factory.mktemp("flux2-pairs")
    for i in range(2):
        photo(i, (64, 48)).save(pairs / f"after{i}.png")
        photo(5 + i, (32, 32)).save(pairs / f"before{i}.png")
    (pairs / "metadata.csv").write_text("image,prompt,edit_image\nafter0.png,make it red,before0.png\n"
                                        "after1.png,make it blue,before1.png\n")
    edit, _, _ = jobs.build_config({**form, "dataset": None, "captions": None,
                                    "metadata": str(pairs / "metadata.csv")})
    assert (edit.extra_inputs, edit.data_file_keys) == ("edit_image", "image,edit_image")
    assert edit.validate_edit_images == [str(pairs / "before0.png")]   # the samples show the first pair's edit
    started = jobs.start({**form, "sample_steps": 2})
    assert "--tokenizer_path" in started["command"] and started["total"] == 4
    end = time.monotonic() + 120
    while jobs.poll()["active"] and time.monotonic() < end:
        time.sleep(0.2)
    p = jobs.poll()
    assert p["status"] == "finished", p["text"] + "\n" + "\n".join(p["log"][-10:])
    assert [x["step"] for x in p["loss"]] == [1, 2, 3, 4] and [s["step"] for s in p["samples"]] == [2, 4]
    assert p["lora_name"] == "trained/klein-dog.safetensors"
    assert "trained/klein-dog.safetensors" in [item["name"] for item in engine.loras()]
    published = load_file(p["published"])
    assert published and all(k.endswith(".default.weight") for k in published)
    assert [c["name"] for c in p["checkpoints"]] == ["step-2.safetensors", "step-4.safetensors"]
    assert models.ensure_files(engine, {"name": name}) == {"name": name}   # written: nothing more to do


def test_the_train_tab_offers_flux2_with_its_settings(page, shots):
    """In the browser: the Train tab's base models include the FLUX.2 demo; choosing it says how its LoRAs are saved
    and edit LoRAs are given, sets klein's 4 sample steps and FLUX.2's module names as the custom targets' hint."""
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-base input").click()
    choose_and_check_base(page, "FLUX.2 [klein] 4B random-weight demo", ("FLUX.2 format", "edit_image columns"), 4,
                          "to_qkv_mlp_proj")
    page.screenshot(path=str(shots / "flux2-train.png"), full_page=True)


def choose_and_check_base(page, label: str, note: tuple, sample_steps: int, hint: str) -> None:
    """Choose ``label`` in the Train tab's open base-model list: its note has the words ``note``, the sample steps
    become ``sample_steps``, the custom targets' hint names ``hint``."""
    page.locator("ul[role='listbox'] li", has_text=label).first.click()
    page.wait_for_function(f"document.querySelector('#train-base-note')?.innerText?.includes({note[0]!r})")
    assert all(words in page.locator("#train-base-note").inner_text() for words in note)
    page.wait_for_function("document.querySelector('#train-sample-steps input[type=\"number\"]')?.value === "
                           f"'{sample_steps}'")
    page.locator("#train-targets input").click()
    page.locator("ul[role='listbox'] li", has_text="Custom module names").click()
    box = page.locator("#train-custom-targets textarea, #train-custom-targets input").first
    box.wait_for(state="visible")
    assert hint in box.get_attribute("placeholder")


def test_try_it_chooses_a_generate_model_of_the_loras_family():
    """"Try it in Generate" with a FLUX.2 LoRA while Generate shows a FLUX.1 model: the Train tab's base model when it
    is FLUX.2, else the first FLUX.2 model on offer, with that model's steps, guidance and CFG (a base model samples
    with CFG); a LoRA of the model's own family (or of none) changes nothing."""
    from app.train_views import model_for_lora
    infos = {"FLUX.1-dev": {"family": "FLUX.1", "available": True},
             "klein": {"family": "FLUX.2", "available": True, "default_steps": 4, "default_cfg": 1.0},
             "klein-base": {"family": "FLUX.2", "available": True, "default_steps": 50, "default_cfg": 4.0,
                            "default_guidance": 0.0}}
    model, steps, guidance, cfg = model_for_lora({"family": "FLUX.2"}, "FLUX.1-dev", "klein-base", infos)
    assert (model["value"], steps["value"], guidance["value"], cfg["value"]) == ("klein-base", 50, 0.0, 4.0)
    assert model_for_lora({"family": "FLUX.2"}, "FLUX.1-dev", "FLUX.1-dev", infos)[0].get("value") == "klein"
    for value, current in (({"family": "FLUX.2"}, "klein"), ({"family": None}, "FLUX.1-dev"), (None, "klein")):
        assert all("value" not in u for u in model_for_lora(value, current, "FLUX.1-dev", infos))
