"""Training on several processes (the seed's ``accelerate launch train.py ...``), on the CPU: 2 processes over gloo.

- one run folder, one set of outputs, one training_args.json, one end event, whatever the number of processes
- 2 processes x 2 accumulated steps give the same LoRA as 1 process x 4 (same effective batch): each sample's
  timestep and noise are keyed by its place in the epoch's order, not by (step, rank), so both draw the same; the
  rank-0 losses equal the single process's at the same samples, bit for bit, and the weights agree to float rounding:
  DDP averages the processes' accumulated gradients, one process adds the quarters in data order -- the same sum in
  another order (2 processes x 1 step against 1 x 2 is even bit for bit: only exact halvings differ)
- a 2-process run resumed from a state saved mid-accumulation (each process's own partial gradients are kept),
  through the studio's Resume (TrainingJobs -> engine.training.api -> ``accelerate_command``, on 2 CPU processes
  allowed by ``ACCELERATE_USE_CPU``), ends with the uninterrupted run's weights, bit for bit
- the studio starts a run on N GPUs (``gpus``) under ``accelerate launch``, records N for Resume, refuses more GPUs
  than the machine has naming how many it has, and kill() ends the launcher's workers too

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
import time
import types

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


def studio(models_dir):
    """The Train tab's service on a stand-in engine: the part of the engine it uses to resume a run."""
    from studio.training import TrainingJobs
    engine = types.SimpleNamespace(models_dir=models_dir, device="cpu", wait_until_idle=lambda timeout: True,
                                   release_models=lambda: None)
    return TrainingJobs(engine, mode="thread")      # several processes run as child processes whatever the mode


def test_two_process_run_resumes_exactly_from_the_studio(two_process_run, tmp_path, monkeypatch):
    """The run resumed from its step-3 state (mid-accumulation) by the studio's Resume, which relaunches it on the 2
    processes its state was saved by, ends with the same weights."""
    config, _argv, out, _ = two_process_run
    copy = tmp_path / "models" / "train" / "resumed"
    shutil.copytree(out, copy)
    for step, path in ck.state_files(copy):
        if step > 3:
            path.unlink()
    (copy / "step-4.safetensors").unlink()
    assert isinstance(ck.load_state(ck.latest_state(copy))["grads"], list)   # one partial gradient per process
    ck.write_run(copy, status="interrupted", step=3, outputs=[str(copy / f"step-{n}.safetensors") for n in (1, 2, 3)])
    (copy / ck.LOSS_FILE).write_text("\n".join((copy / ck.LOSS_FILE).read_text().split()[:3]) + "\n")
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    jobs = studio(tmp_path / "models")
    with pytest.raises(Exception, match="'resumed' trained on 2 GPUs and this machine has no CUDA GPU"):
        jobs.resume("resumed")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")       # the hidden switch: CPU processes count as GPUs
    assert jobs.gpu_count() >= 2
    resumed = jobs.resume("resumed")
    assert resumed["step"] == 3 and resumed["total"] == 4
    handle = jobs._handle
    cmd = handle.process.args
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-1] == str(copy)
    handle.wait(timeout=180)
    p = jobs.poll()
    log = (copy / "process.log").read_text()
    assert p["status"] == "finished" and p["step"] == 4, log[-3000:]
    assert "Resuming from" in log and ck.read_run(copy)["status"] == "finished"
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
        resume_training(copy, num_processes=1).wait(timeout=120)
    # Left to itself, a resume uses the count the state was saved by: several processes, so not in a thread.
    with pytest.raises(Exception, match="'one' trains on 2 processes: start it with mode='process'"):
        resume_training(copy)


FAKE_LAUNCHER = """#!/bin/sh
sleep 60 &
echo $! > "$WORKER_PID"
wait
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")    # killed, not yet reaped by its new parent
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_run_on_several_gpus_is_started_under_accelerate_and_killed_whole(demo_args, folder_data, tmp_path):  # noqa: F811
    """start_training(num_processes=2) starts ``accelerate launch --multi_gpu --num_processes 2`` (here a stand-in
    launcher that starts one worker), records the count for Resume, and kill() ends the launcher's worker too."""
    from engine.training.api import run_processes, start_training
    fake = tmp_path / "launcher"
    fake.write_text(FAKE_LAUNCHER)
    fake.chmod(0o755)
    config = lora_config(folder_data, demo_args, tmp_path / "runs")
    with pytest.raises(Exception, match="on 2 processes: start it with mode='process'"):
        start_training(config, num_processes=2)
    pid_file = tmp_path / "worker.pid"
    handle = start_training(config, mode="process", num_processes=2, python=str(fake),
                            env={"WORKER_PID": str(pid_file)})
    cmd = handle.process.args
    assert cmd[:3] == [str(fake), "-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[-3:] == ["engine.training", "--resume",
                                                                         str(handle.run_dir)]
    assert ck.read_run(handle.run_dir)["processes"] == 2 and run_processes(handle.run_dir) == 2
    end = time.monotonic() + 10
    while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < end:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    assert not gone(worker)
    handle.kill()
    with pytest.raises(RuntimeError, match="ended with exit code"):
        handle.wait(timeout=10)
    end = time.monotonic() + 5
    while not gone(worker) and time.monotonic() < end:
        time.sleep(0.05)
    assert gone(worker) and handle.process.poll() is not None and handle.events[-1]["status"] == "interrupted"


def test_the_studio_form_chooses_the_gpus(monkeypatch, tmp_path):
    """``gpus``: 1 or empty is one process; more than the machine has is refused naming how many it has; the shown
    command is the seed's ``accelerate launch`` one."""
    from engine.training.args import TrainConfig
    from studio.training.commands import command_line
    from studio.training.process import check_gpus
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert [check_gpus(v, 0) for v in (None, "", 1, 1.0)] == [1, 1, 1, 1] and check_gpus(2.0, 4) == 2
    for value, available, message in [(2, 0, "needs 2 of them and this machine has no CUDA GPU.*set GPUs to 1"),
                                      (3, 2, "needs 3 of them and this machine has 2 GPUs: set GPUs to 2 or fewer"),
                                      ("two", 2, "'two' is not a number"), (0, 2, "at least 1 GPU")]:
        with pytest.raises(Exception, match=message):
            check_gpus(value, available)
    jobs = studio(tmp_path / "models")
    assert jobs.gpu_count() == 0
    with pytest.raises(Exception, match="has no CUDA GPU"):
        jobs.start({"gpus": 2})           # refused before anything is read or written
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert jobs.gpu_count() == max(2, os.cpu_count())
    config = TrainConfig(dataset_base_path="data", lora_rank=8)
    assert command_line(config, 2).startswith("accelerate launch --multi_gpu --num_processes 2 train.py \\\n")
    assert command_line(config).startswith("python train.py \\\n")
