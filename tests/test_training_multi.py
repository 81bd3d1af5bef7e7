"""Training on several processes (the seed's ``accelerate launch train.py ...``), on the CPU: 2 processes over gloo.

- one run folder, one set of outputs, one training_args.json, one end event, whatever the number of processes
- 2 processes x 2 accumulated steps give the same LoRA as 1 process x 4 (same effective batch): each sample's
  timestep and noise are keyed by its place in the epoch's order, not by (step, rank), so both draw the same; the
  rank-0 losses equal the single process's at the same samples, bit for bit, and the weights agree to float rounding:
  DDP averages the processes' accumulated gradients, one process adds the quarters in data order -- the same sum in
  another order (2 processes x 1 step against 1 x 2 is even bit for bit: only exact halvings differ)
- a 2-process run resumed from a state saved mid-accumulation (each process's own partial gradients are kept),
  started by ``accelerate_command`` (the studio's way), ends with the uninterrupted run's weights, bit for bit

The comparison stops at 2 optimizer steps on purpose: the seed's ``ConstantLR`` (1/3 of the rate for its first 5
scheduler steps) is stepped by accelerate once per process per optimizer step, but once per optimizer step under
accumulation, so the 3rd to 5th optimizer steps run at the full rate on 2 processes and at 1/3 of it on 1 process
(from the 6th on both at the full rate) -- in the seed too.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from engine.training import checkpoints as ck
from engine.training.cli import accelerate_command, command_line_args
from engine.training.data import epoch_order, order_position
from engine.training.objective import sample_generator
from tests.test_training import demo_args, folder_data, lora_config, run_to_end, state_tensors  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd, extra_env=None, timeout=180):
    env = dict(os.environ, **ENV, **(extra_env or {}))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def flags(config) -> list:
    """The command line of ``config`` (the seed's flag names)."""
    out = []
    for name in ("dataset_base_path", "model_paths", "tokenizer_1_path", "tokenizer_2_path", "lora_base_model",
                 "lora_target_modules", "lora_rank", "learning_rate", "num_epochs", "output_path", "save_steps",
                 "keep_states", "gradient_accumulation_steps"):
        out += [f"--{name}", str(getattr(config, name))]
    return out


def losses(run_dir) -> list:
    return [float(line.split(",")[1]) for line in (run_dir / ck.LOSS_FILE).read_text().split()]


@pytest.fixture(scope="module")
def two_process_run(folder_data, demo_args, tmp_path_factory):  # noqa: F811
    """``accelerate launch --multi_gpu --num_processes 2 train.py ...`` on the CPU: 4 epochs of the 2 images (1 step
    an epoch), 2 accumulated steps per optimizer step, a state saved at every step."""
    out = tmp_path_factory.mktemp("multi") / "runs"
    config = lora_config(folder_data, demo_args, out, num_epochs=4, save_steps=1, keep_states=3,
                         gradient_accumulation_steps=2, lora_target_modules="a_to_qkv,to_qkv_mlp")
    argv = flags(config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "train.py"] + argv
    stdout = launch(cmd, {"ACCELERATE_USE_CPU": "true"})
    return config, argv, out, stdout


def test_sample_randomness_does_not_depend_on_the_process_count():
    """Each sample's place in the epoch's whole order is the same on 1 and on 2 processes (and so its draws)."""
    whole = epoch_order(6, 3, 1)
    for rank in range(2):
        share = epoch_order(6, 3, 1, rank=rank, world=2)
        for pos, item in enumerate(share):
            place = order_position(pos, rank, 2)
            assert whole[place] == item
            a, b = sample_generator(3, 1, place), sample_generator(3, 1, order_position(place))
            assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    draws = {float(torch.rand(1, generator=sample_generator(0, e, p))) for e in range(2) for p in range(3)}
    assert len(draws) == 6   # every (epoch, place) its own draw


def test_two_processes_make_one_run_like_one_process_with_accumulation(two_process_run, tmp_path):
    config, argv, out, stdout = two_process_run
    runs = [p for p in out.parent.iterdir() if p.is_dir()]
    assert runs == [out], runs                                  # one run folder for both processes
    run = ck.read_run(out)
    assert run["status"] == "finished" and run["step"] == 4     # 2 images per step: 1 step an epoch
    assert [os.path.basename(p) for p in run["outputs"]] == [f"step-{n}.safetensors" for n in (1, 2, 3, 4)]
    events, _ = ck.read_events(out)
    assert [e["event"] for e in events].count("end") == 1 and [e["event"] for e in events].count("start") == 1
    assert stdout.count("finished at step 4") == 1              # only the main process reports
    saved = (out / "training_args.json").read_text(encoding="utf-8")
    assert saved == json.dumps(command_line_args(argv), indent=4, ensure_ascii=False, default=str)

    single, single_dir = run_to_end(config.replace(output_path=str(tmp_path / "one"), gradient_accumulation_steps=4,
                                                   save_steps=None))
    assert single["status"] == "finished" and single["step"] == 8
    # rank 0 trains on place 0 of each epoch's order: the single process's steps 1, 3, 5, 7, same timestep and noise
    assert losses(out) == losses(single_dir)[0::2]
    a, b = state_tensors(out), state_tensors(single_dir)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 5e-4   # trained (B starts at 0)
    # the same sums in another order: ((g0 + g2) / 2 + (g1 + g3) / 2) / 2 against g0 / 4 + g1 / 4 + g2 / 4 + g3 / 4
    # (measured: 7.5e-9, on weights of 1e-3 to 0.1)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-7


def test_two_process_run_resumes_exactly(two_process_run, tmp_path):
    """The run resumed from its step-3 state (mid-accumulation) on 2 processes (``accelerate_command``) ends with
    the same weights."""
    config, _argv, out, _ = two_process_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    for step, path in ck.state_files(copy):
        if step > 3:
            path.unlink()
    (copy / "step-4.safetensors").unlink()
    assert isinstance(ck.load_state(ck.latest_state(copy))["grads"], list)   # one partial gradient per process
    ck.write_run(copy, status="interrupted", step=3, outputs=[str(copy / f"step-{n}.safetensors") for n in (1, 2, 3)])
    (copy / ck.LOSS_FILE).write_text("\n".join((copy / ck.LOSS_FILE).read_text().split()[:3]) + "\n")
    cmd, env = accelerate_command(copy, 2, cpu=True, main_process_port=free_port())
    assert "--multi_gpu" in cmd and cmd[-3:] == ["engine.training", "--resume", str(copy)]
    stdout = launch(cmd, env)
    assert "Resuming from" in stdout and ck.read_run(copy)["status"] == "finished"
    a, b = state_tensors(out), state_tensors(copy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(copy) == losses(out)


def test_deepspeed_zero2_config_and_its_command():
    """The ZeRO-2 accelerate config parses as accelerate reads it, leaves the accumulation to train.py's flag, and
    its launch command names it (DeepSpeed itself cannot run several processes on the CPU: see the report)."""
    from accelerate.commands.config.config_args import load_config_from_file
    path = os.path.join(REPO, "configs", "accelerate", "deepspeed_zero2.yaml")
    config = load_config_from_file(path)
    assert str(config.distributed_type) == "DistributedType.DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 2 and "gradient_accumulation_steps" not in config.deepspeed_config
    cmd, env = accelerate_command("/runs/a", 4, config_file=path)
    assert cmd[cmd.index("--config_file") + 1] == path and cmd[cmd.index("--num_processes") + 1] == "4"
    assert "--multi_gpu" not in cmd and env == {}
    with pytest.raises(Exception, match="at least 1 process"):
        accelerate_command("/runs/a", 0)


def test_a_two_process_state_is_not_resumed_by_one_process(two_process_run, tmp_path):
    """A step is one sample per process: a state saved by 2 processes resumed by 1 would train other samples."""
    from engine.training.api import resume_training
    _config, _argv, out, _ = two_process_run
    copy = tmp_path / "one"
    shutil.copytree(out, copy)
    with pytest.raises(Exception, match="saved by 2 training process.*--num_processes 2"):
        resume_training(copy).wait(timeout=120)
