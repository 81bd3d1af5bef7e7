"""Training (engine/training, train.py) on the tiny random-weight demo model, on the CPU.

- the seed's example command lines (lora/ and full/ scripts of DiffSynth-Studio's FLUX training) parse, and the
  seed's FLUX.1-dev and Kontext LoRA commands run as written (only the data, epochs and output changed)
- DiffSynth's --lora_target_modules names map onto diffusers' layers; the objective's schedule and weights
- datasets: metadata CSV / JSON with extra inputs, the folder form (.txt captions), broken images, sizes
- a LoRA overfits a 2-image dataset: the fixed-noise loss falls by the factor measured below
- a stopped run (injected stop) and a killed run (a real subprocess killed) resume to the same weights as an
  uninterrupted run, bit for bit
- the saved LoRA round-trips: this engine's reader (kohya and native files) gives the trained matrices' products,
  diffusers' load_lora_weights on a FluxPipeline gives them too, pipe.load_lora attaches it, the library lists it
- fp8 storage of the frozen base with a fused preset LoRA; full training writes weights the loader reads back
"""
import json
import os
import pathlib
import shlex
import subprocess
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.errors import EngineError
from engine.training import checkpoints as ck
from engine.training.api import list_runs, resume_training, start_training
from engine.training.args import TrainConfig, parse_args
from engine.training.data import TrainingDataset, epoch_order, target_size, with_trigger
from engine.training.lora_targets import DIFFSYNTH_FLUX_TARGETS, resolve_targets
from engine.training.objective import TrainingSchedule, fixed_loss
from engine.training.runner import Trainer
from tests.helpers import official_models_dir

pytestmark = pytest.mark.filterwarnings("ignore")

MIRROR = pathlib.Path("/work/.mirror/modelscope+DiffSynth-Studio/repo")

# The seed's own example commands (examples/flux/model_training/{lora,full}/*.sh), verbatim.
SEED_LORA_DEV = """accelerate launch examples/flux/model_training/train.py \
  --dataset_base_path data/diffsynth_example_dataset/flux/FLUX.1-dev \
  --dataset_metadata_path data/diffsynth_example_dataset/flux/FLUX.1-dev/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/*.safetensors,black-forest-labs/FLUX.1-dev:ae.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.1-dev_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,norm1_a.linear,norm1_b.linear,to_qkv_mlp" \
  --lora_rank 32 \
  --align_to_opensource_format \
  --use_gradient_checkpointing"""
SEED_LORA_KONTEXT = """accelerate launch examples/flux/model_training/train.py \
  --dataset_base_path data/diffsynth_example_dataset/flux/FLUX.1-Kontext-dev \
  --dataset_metadata_path data/diffsynth_example_dataset/flux/FLUX.1-Kontext-dev/metadata.csv \
  --data_file_keys "image,kontext_images" \
  --max_pixels 1048576 \
  --dataset_repeat 400 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.1-Kontext-dev:flux1-kontext-dev.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/*.safetensors,black-forest-labs/FLUX.1-dev:ae.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.1-Kontext-dev_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,norm1_a.linear,norm1_b.linear,to_qkv_mlp" \
  --lora_rank 32 \
  --align_to_opensource_format \
  --extra_inputs "kontext_images" \
  --use_gradient_checkpointing"""
SEED_FULL_DEV = """accelerate launch --config_file examples/flux/model_training/full/accelerate_config.yaml examples/flux/model_training/train.py \
  --dataset_base_path data/diffsynth_example_dataset/flux/FLUX.1-dev \
  --dataset_metadata_path data/diffsynth_example_dataset/flux/FLUX.1-dev/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 400 \
  --model_id_with_origin_paths "black-forest-labs/FLUX.1-dev:flux1-dev.safetensors,black-forest-labs/FLUX.1-dev:text_encoder/model.safetensors,black-forest-labs/FLUX.1-dev:text_encoder_2/*.safetensors,black-forest-labs/FLUX.1-dev:ae.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 1 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/FLUX.1-dev_full" \
  --trainable_models "dit" \
  --use_gradient_checkpointing"""


def script_argv(command: str) -> list:
    argv = shlex.split(command.replace("\\\n", " "))
    return argv[next(i for i, a in enumerate(argv) if a.endswith("train.py")) + 1:]


def with_args(argv: list, **changes) -> list:
    """The command line with some flags' values replaced (or added)."""
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


# ------------------------------------------------------------------------------------------------- fixtures
def photo(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)


def kontext_data(root: pathlib.Path, edit_size=(64, 48)) -> pathlib.Path:
    """A two-pair Kontext dataset (edited image, prompt, reference image) under ``root/kontext``: its metadata.csv."""
    data = root / "kontext"
    data.mkdir()
    for i in range(2):
        photo(i, edit_size).save(data / f"edit{i}.png")
        photo(10 + i, (32, 32)).save(data / f"src{i}.png")
    (data / "metadata.csv").write_text("image,prompt,kontext_images\nedit0.png,make it red,src0.png\n"
                                       "edit1.png,make it blue,src1.png\n")
    return data / "metadata.csv"


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(2):
        photo(i).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo number {i}")
    return root


@pytest.fixture(scope="module")
def demo_args(demo_dir):
    """TrainConfig fields naming the demo model's files directly (--model_paths, as the seed's JSON list)."""
    shards = [str(p) for p in sorted((demo_dir / "text_encoder_2").glob("*.safetensors"))]
    paths = [str(demo_dir / "flux1-dev.safetensors"), str(demo_dir / "ae.safetensors"),
             str(demo_dir / "text_encoder" / "model.safetensors"), shards]
    return dict(model_paths=json.dumps(paths), tokenizer_1_path=str(demo_dir / "tokenizer"),
                tokenizer_2_path=str(demo_dir / "tokenizer_2"))


@pytest.fixture(scope="module")
def official_models(demo_dir, tmp_path_factory):
    """The demo files under the real repositories' names, as DIFFSYNTH_MODEL_BASE_PATH for the seed's commands."""
    root = official_models_dir(tmp_path_factory.mktemp("models"), demo_dir,
                               variants=("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Kontext-dev"),
                               dit_names={"black-forest-labs/FLUX.1-Kontext-dev": "flux1-kontext-dev.safetensors"})
    old = {k: os.environ.get(k) for k in ("DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_SKIP_DOWNLOAD")}
    os.environ.update(DIFFSYNTH_MODEL_BASE_PATH=str(root), DIFFSYNTH_SKIP_DOWNLOAD="true")
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def lora_config(folder_data, demo_args, out, **kw) -> TrainConfig:
    base = dict(dataset_base_path=str(folder_data), lora_base_model="dit", lora_target_modules=DIFFSYNTH_FLUX_TARGETS,
                lora_rank=4, learning_rate=1e-3, num_epochs=2, output_path=str(out), **demo_args)
    base.update(kw)
    return TrainConfig(**base)


def state_tensors(run_dir) -> dict:
    return ck.load_state(ck.latest_state(run_dir))["trainable"]


# ---------------------------------------------------------------------------------------------- arguments
def test_seed_commands_parse():
    config, resume, _ = parse_args(script_argv(SEED_LORA_DEV))
    assert resume is None
    assert config.lora_base_model == "dit" and config.lora_rank == 32 and config.align_to_opensource_format
    assert config.lora_target_modules == DIFFSYNTH_FLUX_TARGETS and config.use_gradient_checkpointing
    assert config.dataset_repeat == 50 and config.max_pixels == 1048576 and config.learning_rate == 1e-4
    assert config.model_id_with_origin_paths.count(",") == 3 and config.remove_prefix_in_ckpt == "pipe.dit."
    assert config.height is None and config.width is None and config.save_steps is None   # dynamic size, per epoch
    config, _, _ = parse_args(script_argv(SEED_LORA_KONTEXT))
    assert config.extra_input_names() == ["kontext_images"] and config.data_keys() == ["image", "kontext_images"]
    config, _, _ = parse_args(script_argv(SEED_FULL_DEV))
    assert config.trainable() == ["dit"] and config.lora_base_model is None and config.learning_rate == 1e-5
    # Defaults are the seed's parsers'.
    d = TrainConfig()
    assert (d.learning_rate, d.num_epochs, d.weight_decay, d.lora_rank, d.max_pixels, d.data_file_keys,
            d.remove_prefix_in_ckpt, d.gradient_accumulation_steps) == (1e-4, 1, 0.01, 32, 1048576, "image,video",
                                                                        "pipe.dit.", 1)
    if MIRROR.is_dir():   # every FLUX training script of the reference, where its mirror is at hand
        names = subprocess.run(["git", "-C", str(MIRROR), "ls-tree", "-r", "HEAD", "--name-only"],
                               capture_output=True, text=True).stdout.split()
        scripts = [n for n in names if n.startswith("examples/flux/model_training/") and n.endswith(".sh")]
        assert len(scripts) >= 30
        for name in scripts:
            text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:{name}"], capture_output=True,
                                  text=True).stdout.replace("\\\n", " ")
            for line in text.splitlines():
                if "train.py" in line:
                    parse_args(script_argv(line))


def test_target_names_map_onto_diffusers_layers(demo_dir):
    from engine.loading import load_models
    dit = load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=torch.float32)["dit"]
    targets, report = resolve_targets(dit, DIFFSYNTH_FLUX_TARGETS)
    per_double = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                  "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2", "norm1.linear", "norm1_context.linear"}
    per_single = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"}
    expected = {f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_double}
    expected |= {f"single_transformer_blocks.{i}.{n}" for i in range(2) for n in per_single}
    assert set(targets) == expected            # every linear of every block, and nothing at the top level
    assert len(report) == 13
    # diffusers' own names work too; "proj_out" read as DiffSynth's means the single blocks only
    assert set(resolve_targets(dit, "to_q,add_k_proj")[0]) == {
        *(f"transformer_blocks.{i}.attn.to_q" for i in range(2)), *(f"single_transformer_blocks.{i}.attn.to_q"
                                                                   for i in range(2)),
        *(f"transformer_blocks.{i}.attn.add_k_proj" for i in range(2))}
    assert resolve_targets(dit, "final_proj_out,x_embedder")[0] == ["proj_out", "x_embedder"]
    with pytest.raises(EngineError, match="q, k, v, o, ffn.0, ffn.2 match no linear layer"):
        resolve_targets(dit, TrainConfig().lora_target_modules)   # the seed's generic default is Wan's names
    assert len(resolve_targets(dit, "")[0]) == 2 * 14 + 2 * 6     # the seed's automatic choice


def test_schedule_is_the_seeds():
    s = TrainingSchedule()
    # The seed's FLUX.1 schedule at 1000 steps, written out independently: shift 3 over linspace(1, 0.003/1.002).
    base = torch.linspace(1.0, 0.003 / 1.002, 1000, dtype=torch.float64)
    assert torch.allclose(s.sigmas.double(), 3 * base / (1 + 2 * base), atol=1e-6)
    w = s.weights
    assert abs(float(w.mean()) - 1.0) < 1e-4 and float(w.min()) == 0.0
    peak = float(s.timesteps[int(w.argmax())])
    assert abs(peak - 500) < 2                      # the bell's top at t = 500
    draws = {s.sample(torch.Generator().manual_seed(k))[0] for k in range(200)}
    assert len(draws) > 150 and min(draws) >= 0 and max(draws) < 1000


# ----------------------------------------------------------------------------------------------------- data
def test_folder_dataset(tmp_path):
    for i, size in enumerate([(100, 60), (40, 40), (2000, 1000)]):
        photo(i, size).save(tmp_path / f"p{i}.jpg")
    (tmp_path / "p0.txt").write_text("first caption")
    (tmp_path / "p1.txt").write_text("second")
    (tmp_path / "notes.txt").write_text("a .txt is never an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    sub = tmp_path / "sub"
    sub.mkdir()
    photo(5).save(sub / "deep.webp")
    (sub / "deep.txt").write_text("in a sub-folder")
    logs = []
    ds = TrainingDataset(tmp_path, repeat=3, max_pixels=64 * 64, log=logs.append)
    assert ds.num_records == 4 and len(ds) == 12
    assert any("broken.png" in m for m in logs) and ds.skipped and "broken.png" in ds.skipped[0]
    assert any("empty prompt" in m and "p2.jpg" in m for m in logs)
    items = [ds[i] for i in range(4)]
    assert [it["prompt"] for it in items] == ["first caption", "second", "", "in a sub-folder"]
    for it in items:
        w, h = it["image"].size
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64
    assert items[0]["image"].size == target_size(100, 60, None, None, 64 * 64) == (80, 48)
    assert items[1]["image"].size == (32, 32)                 # small images are not enlarged, only floored to 16
    # Captions are read when a run builds its dataset: an edited caption is used by the next run.
    (tmp_path / "p0.txt").write_text("edited")
    assert TrainingDataset(tmp_path, max_pixels=64 * 64, log=logs.append)[0]["prompt"] == "edited"
    fixed = TrainingDataset(tmp_path, height=70, width=100, log=logs.append)
    assert fixed[0]["image"].size == (112, 80)                 # fixed size, rounded up to multiples of 16
    with pytest.raises(EngineError, match="No dataset"):
        TrainingDataset("", log=logs.append)


def test_trigger_word_goes_before_every_caption(tmp_path):
    for i in range(3):
        photo(i).save(tmp_path / f"p{i}.png")
    (tmp_path / "p0.txt").write_text("a dog on grass")
    (tmp_path / "p1.txt").write_text("sks dog asleep")      # already starts with it: left as is
    ds = TrainingDataset(tmp_path, max_pixels=64 * 64, log=lambda m: None, trigger_word=" sks ")
    assert [ds[i]["prompt"] for i in range(3)] == ["sks, a dog on grass", "sks dog asleep", "sks"]
    assert (tmp_path / "p0.txt").read_text() == "a dog on grass"          # the caption files are not changed
    assert "starting with 'sks'" in ds.describe()
    assert with_trigger("a cat", None) == with_trigger("a cat", "  ") == "a cat"
    # train.py takes it as --trigger_word (ours), and a run's config keeps it (a resume reads the same).
    config, _resume, _notes = parse_args(["--dataset_base_path", str(tmp_path), "--trigger_word", "ohwx person"])
    assert config.trigger_word == "ohwx person"
    assert TrainConfig.from_json(config.to_json()).trigger_word == "ohwx person"
    assert parse_args(["--dataset_base_path", "x"])[0].trigger_word is None


def test_qwen_folder_for_captions_is_the_seeds_layout(tmp_path):
    from engine.training.captions import find_qwen_folder
    folder = tmp_path / "Qwen" / "Qwen2.5-VL-7B-Instruct"
    folder.mkdir(parents=True)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert find_qwen_folder(tmp_path) is None                   # no config.json: not a usable folder
    (folder / "config.json").write_text("{}")
    assert find_qwen_folder(tmp_path) == folder


def test_metadata_datasets(tmp_path):
    for name in ("a", "b", "ref_a", "ref_b"):
        photo(len(name), (96, 64)).save(tmp_path / f"{name}.png")
    (tmp_path / "metadata.csv").write_text(
        "image,prompt,kontext_images\na.png,make it red,ref_a.png\nb.png,\"a prompt, with a comma\",ref_b.png\n"
        "missing.png,gone,ref_a.png\n")
    ds = TrainingDataset(tmp_path, tmp_path / "metadata.csv", data_file_keys=["image", "kontext_images"],
                         log=lambda m: None)
    assert ds.num_records == 2 and "missing.png" in ds.skipped[0]
    item = ds[1]
    assert item["prompt"] == "a prompt, with a comma"
    assert isinstance(item["kontext_images"], Image.Image) and item["image"].size == (96, 64)
    (tmp_path / "metadata.json").write_text(json.dumps([
        {"image": "a.png", "prompt": "two references", "kontext_images": ["ref_a.png", "ref_b.png"]}]))
    item = TrainingDataset(tmp_path, tmp_path / "metadata.json", data_file_keys=["image", "kontext_images"])[0]
    assert len(item["kontext_images"]) == 2 and item["prompt"] == "two references"
    # The data order: a seeded shuffle per epoch, dealt to processes in equal shares.
    assert epoch_order(5, 0, 0) == epoch_order(5, 0, 0) != epoch_order(5, 0, 1)
    shares = [epoch_order(5, 3, 0, rank=r, world=2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 3 and set(shares[0] + shares[1]) == set(range(5))


# ------------------------------------------------------------------------------------------------- training
def test_lora_overfits_two_images(folder_data, demo_args, tmp_path):
    """A rank-64 LoRA on the top-level input/output layers (DiffSynth names) memorises 2 images: the loss at fixed
    sigmas 0.2..0.8 with fixed noise falls from 1.097 to 0.723 in 80 steps (factor 1.52 measured on this CPU)."""
    config = lora_config(folder_data, demo_args, tmp_path / "runs", lora_target_modules=(
        "x_embedder,final_proj_out,final_norm_out.linear"), lora_rank=64, learning_rate=1e-2, num_epochs=40,
        save_steps=40)
    run_dir = ck.new_run_dir(config.output_path)
    measured, events = {}, []
    trainer = Trainer(config, run_dir, log=lambda m: None)

    def progress(event):
        events.append(event)
        if event["event"] == "start":      # LoRA injected with zero up matrices: the base model's loss
            ds = TrainingDataset(config.dataset_base_path)
            measured["inputs"] = [trainer.encode(trainer.pipe, ds.load_record(i), "cpu") for i in range(2)]
            measured["before"] = fixed_loss(trainer.dit, measured["inputs"], torch.float32)

    trainer.on_progress = progress
    result = trainer.run()
    after = fixed_loss(trainer.dit, measured["inputs"], torch.float32)
    factor = measured["before"] / after
    assert result["status"] == "finished" and result["step"] == 80
    assert factor > 1.4, f"loss {measured['before']:.4f} -> {after:.4f} (factor {factor:.3f})"
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 80 and {"loss", "loss_avg", "eta_s", "sec_per_step", "lr", "elapsed_s"} <= set(steps[0])
    assert steps[-1]["eta_s"] == 0
    assert [pathlib.Path(p).name for p in ck.read_run(run_dir)["outputs"]] == ["step-40.safetensors",
                                                                               "step-80.safetensors"]


def run_to_end(config, run_dir=None, stop_at=None):
    run_dir = run_dir or ck.new_run_dir(config.output_path)
    stop = threading.Event()

    def progress(event):
        if stop_at is not None and event["event"] == "step" and event["step"] == stop_at:
            stop.set()

    return Trainer(config, run_dir, on_progress=progress, stop_event=stop, log=lambda m: None).run(), run_dir


def test_stopped_run_resumes_to_the_same_weights(folder_data, demo_args, tmp_path):
    """With gradient accumulation 2 and a stop after step 3 (mid-accumulation: the gradients are saved too)."""
    config = lora_config(folder_data, demo_args, tmp_path / "runs", num_epochs=3, save_steps=2,
                         gradient_accumulation_steps=2, dataset_repeat=1)
    whole, whole_dir = run_to_end(config)
    # (loaded ahead by a DataLoader worker this time: the order must not depend on it)
    stopped, run_dir = run_to_end(config.replace(dataset_num_workers=1), stop_at=3)
    assert whole["status"] == "finished" and stopped["status"] == "stopped" and stopped["step"] == 3
    assert ck.run_summary(run_dir)["resumable"] and ck.state_files(run_dir)[-1][0] == 3
    resumed = resume_training(run_dir).wait(timeout=120)
    assert resumed["status"] == "finished" and resumed["step"] == 6
    a, b = state_tensors(whole_dir), state_tensors(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = load_file(whole["final"]), load_file(resumed["final"])
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert run_dir != whole_dir and run_dir.parent == whole_dir.parent   # each run its own folder


def test_killed_process_resumes_to_the_same_weights(folder_data, demo_args, tmp_path):
    """A real training subprocess is killed (SIGKILL) after a save; the run resumes from that save."""
    config = lora_config(folder_data, demo_args, tmp_path / "runs", num_epochs=20, save_steps=3,
                         lora_target_modules="a_to_qkv,to_qkv_mlp")
    killed = {}

    def progress(event):
        if event["event"] == "checkpoint" and event["step"] >= 6 and not killed:
            killed["at"] = event["step"]
            handle.kill()

    handle = start_training(config, on_progress=progress, mode="process",
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    with pytest.raises(RuntimeError, match="exit code"):
        handle.wait(timeout=240)
    summary = ck.run_summary(handle.run_dir)
    assert killed and summary["status"] == "interrupted" and summary["resumable"]
    assert summary["last_saved_step"] < 40
    resumed = resume_training(handle.run_dir).wait(timeout=240)
    assert resumed["status"] == "finished" and resumed["step"] == 40
    whole, whole_dir = run_to_end(config)
    a, b = state_tensors(whole_dir), state_tensors(handle.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ files and formats
def products(pairs: dict) -> dict:
    return {k: (B.float() * s) @ A.float() for k, (A, B, s) in pairs.items()}


def trained_products(run_dir) -> dict:
    """{layer: B @ A} from the run's saved state (the exact trained matrices)."""
    t = state_tensors(run_dir)
    out = {}
    for name, A in t.items():
        if ".lora_A." in name:
            layer = name[len("dit."):].split(".lora_A.")[0]
            out[layer] = t[name.replace(".lora_A.", ".lora_B.")].float() @ A.float()
    return out


def test_seed_lora_command_runs_and_round_trips(official_models, folder_data, tmp_path):
    """The seed's FLUX.1-dev LoRA command (data, epochs, rank and output changed) writes a kohya LoRA that this engine
    and diffusers read back as the trained matrices; the native format too; the studio's library takes it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from engine import FluxImagePipeline, ModelConfig
    from engine.lora import read_lora
    from engine.lora.library import list_loras
    from engine.training.cli import main
    out = tmp_path / "train" / "FLUX.1-dev_lora"
    argv = with_args(script_argv(SEED_LORA_DEV), dataset_base_path=folder_data, dataset_metadata_path=None,
                     dataset_repeat=1, num_epochs=1, lora_rank=4, output_path=out, learning_rate=1e-2,
                     publish_to=tmp_path / "models", validate_prompt="a photo number 0", validate_height=64,
                     validate_width=64, validate_num_inference_steps=2)
    assert main(argv) == 0
    assert (out / "epoch-0.safetensors").is_file() and len(list((out / "samples").glob("*.png"))) == 1
    expected = trained_products(out)
    kohya = read_lora(out / "epoch-0.safetensors")
    assert kohya.format == "kohya"
    assert any(k.endswith("img_attn_qkv.lora_down.weight") for k in load_file(out / "epoch-0.safetensors"))
    got = products(kohya.targets)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    with safe_open(str(out / "epoch-0.safetensors"), "pt") as f:
        info = json.loads(f.metadata()["flux_studio_training"])
    assert info["rank"] == 4 and info["steps"] == 2 and info["dataset_size"] == 2
    assert info["base_model"]["dit"] == ["flux1-dev.safetensors"]

    # diffusers reads the kohya file (its reader assumes FLUX.1's 3072 width for single-block linear1, so those
    # keys are left out for this 64-wide model) and the diffusers-format file of the same training, in full.
    pipe = FluxImagePipeline.from_pretrained(torch_dtype=torch.float32, device="cpu", model_configs=[
        ModelConfig(model_id="black-forest-labs/FLUX.1-dev", origin_file_pattern=p) for p in
        ("flux1-dev.safetensors", "ae.safetensors", "text_encoder/model.safetensors", "text_encoder_2/*.safetensors")])
    # The studio's library lists the published copy; pipe.load_lora attaches it to every trained layer.
    names = [x["name"] for x in list_loras(tmp_path / "models")]
    assert names == [f"trained/{out.name}.safetensors"]
    report = pipe.load_lora(pipe.dit, str(tmp_path / "models" / "loras" / names[0]), verbose=0)
    assert report["bound"] == len(expected) and report["format"] == "kohya"
    pipe.clear_lora(verbose=0)

    ref = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=pipe.vae, text_encoder=pipe.text_encoder_1,
                       tokenizer=pipe.tokenizer_1, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                       transformer=pipe.dit)

    def diffusers_products(path, adapter):
        ref.load_lora_weights(str(path), adapter_name=adapter)
        from peft.tuners.lora import LoraLayer
        out_ = {n: (m.lora_B[adapter].weight.float() * m.scaling[adapter]) @ m.lora_A[adapter].weight.float()
                for n, m in ref.transformer.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}
        ref.delete_adapters(adapter)
        return out_

    no_linear1 = {k: v for k, v in load_file(out / "epoch-0.safetensors").items() if "_linear1." not in k}
    save_file(no_linear1, str(tmp_path / "kohya_no_linear1.safetensors"))
    got = diffusers_products(tmp_path / "kohya_no_linear1.safetensors", "k")
    single_qkv = {k for k in expected if k.startswith("single_") and k.split(".")[-1] in ("to_q", "to_k", "to_v")
                  or k.endswith("proj_mlp")}
    assert got.keys() == expected.keys() - single_qkv
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in got)

    argv2 = with_args(argv, output_path=tmp_path / "train" / "diffusers_fmt", opensource_format="diffusers",
                      publish_to=None, validate_prompt=None)
    assert main(argv2) == 0
    dfile = tmp_path / "train" / "diffusers_fmt" / "epoch-0.safetensors"
    assert next(iter(load_file(dfile))).startswith("transformer.")
    got = diffusers_products(dfile, "d")
    assert got.keys() == expected.keys() and all(torch.allclose(got[k], expected[k], atol=1e-6) for k in got)

    # Without --align_to_opensource_format: this engine's (diffusers/PEFT) keys, the seed's prefix removed.
    argv3 = with_args(argv, output_path=tmp_path / "train" / "native", publish_to=None, validate_prompt=None)
    argv3.remove("--align_to_opensource_format")
    assert main(argv3) == 0
    native = tmp_path / "train" / "native" / "epoch-0.safetensors"
    assert next(iter(load_file(native))).startswith(("transformer_blocks.", "single_transformer_blocks."))
    lf = read_lora(native)
    assert lf.format == "diffusers/PEFT" and products(lf.targets).keys() == expected.keys()
    # Runs are listed, newest first, and never share a folder.
    runs = list_runs(tmp_path / "train")
    assert len(runs) == 3 and all(r["status"] == "finished" for r in runs)


def test_kontext_lora_training(official_models, tmp_path):
    """The seed's Kontext LoRA command: reference images from the metadata enter the transformer as extra tokens."""
    from engine.training.cli import main
    data = kontext_data(tmp_path).parent
    seen = []
    original = Trainer.encode

    def spy(self, pipe, item, device):
        inputs = original(self, pipe, item, device)
        seen.append((inputs.kontext.tokens.shape[1], inputs.latents.shape))
        return inputs

    Trainer.encode = spy
    try:
        argv = with_args(script_argv(SEED_LORA_KONTEXT), dataset_base_path=data,
                         dataset_metadata_path=data / "metadata.csv", dataset_repeat=1, num_epochs=1, lora_rank=4,
                         output_path=tmp_path / "out")
        assert main(argv) == 0
    finally:
        Trainer.encode = original
    assert [s[0] for s in seen] and all(n == 4 for n, _ in seen)           # 32x32 reference: 2x2 tokens
    assert all(shape[-2:] == (6, 8) for _, shape in seen)                   # 64x48 target keeps its size
    assert (tmp_path / "out" / "epoch-0.safetensors").is_file()


def test_fp8_base_with_preset_lora(folder_data, demo_args, demo_dir, tmp_path):
    """--preset_lora_path is fused into the base before --fp8_models stores it in fp8; a LoRA then trains on it."""
    from engine.loading import load_models
    from engine.training.model import load_pipeline
    g = torch.Generator().manual_seed(0)
    preset = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 64, generator=g) * 0.5,
              "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 2, generator=g) * 0.5,
              "single_transformer_blocks.1.proj_out.lora_A.weight": torch.randn(2, 320, generator=g) * 0.5,
              "single_transformer_blocks.1.proj_out.lora_B.weight": torch.randn(64, 2, generator=g) * 0.5}
    save_file(preset, str(tmp_path / "preset.safetensors"))
    fp8_entry = json.loads(demo_args["model_paths"])[0]
    config = lora_config(folder_data, demo_args, tmp_path / "runs", preset_lora_model="dit", fp8_models=fp8_entry,
                         preset_lora_path=str(tmp_path / "preset.safetensors"), num_epochs=1)
    base = load_models([demo_dir / "flux1-dev.safetensors"], torch_dtype=torch.float32)["dit"]
    pipe = load_pipeline(config, "cpu", torch.float32, log=lambda m: None)
    layer = pipe.dit.transformer_blocks[0].attn.to_q
    assert layer.weight.dtype == torch.float8_e4m3fn
    fused = base.transformer_blocks[0].attn.to_q.weight + preset["transformer_blocks.0.attn.to_q.lora_B.weight"] @ \
        preset["transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert torch.allclose(layer.weight.float(), fused.to(torch.float8_e4m3fn).float())
    assert not torch.allclose(layer.weight.float(), base.transformer_blocks[0].attn.to_q.weight.to(
        torch.float8_e4m3fn).float())
    result, run_dir = run_to_end(config)
    assert result["status"] == "finished" and np.isfinite(result["loss"])
    trained = state_tensors(run_dir)
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in trained.items())
    with pytest.raises(EngineError, match="fp8 storage is only for models whose weights are not updated"):
        run_to_end(config.replace(lora_base_model=None, trainable_models="dit", preset_lora_path=None))


def test_full_training_writes_loadable_weights(folder_data, demo_args, tmp_path):
    from engine.loading import load_models
    config = TrainConfig(dataset_base_path=str(folder_data), trainable_models="dit", learning_rate=1e-4, num_epochs=1,
                         output_path=str(tmp_path / "full"), use_gradient_checkpointing_offload=True, **demo_args)
    result, run_dir = run_to_end(config)
    assert result["status"] == "finished" and pathlib.Path(result["final"]).name == "epoch-0.safetensors"
    dit = load_models([result["final"]], torch_dtype=torch.float32)["dit"]
    trained = state_tensors(run_dir)
    params = dict(dit.named_parameters())
    assert len(trained) == len(params)
    assert all(torch.equal(params[k[len("dit."):]], v) for k, v in trained.items())
    base = load_models([pathlib.Path(json.loads(demo_args["model_paths"])[0])], torch_dtype=torch.float32)["dit"]
    assert not torch.equal(base.proj_out.weight, dit.proj_out.weight)
