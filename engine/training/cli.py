"""``train.py`` / ``python -m engine.training``: the seed's training command line.

Runs as is (one process) or under ``accelerate launch`` (several GPUs: DDP, or DeepSpeed ZeRO from an accelerate
config such as the seed's ``accelerate_config_zero2offload.yaml``): one run folder (the main process makes it and
tells the others its name), one set of outputs. ``--resume RUN_DIR`` continues a stopped or killed run from its last
saved state with the arguments it was started with; ``accelerate_command`` is the command line that starts (or
resumes) a prepared run folder on several processes, which is how the studio starts a run on several GPUs.

As the seed's, the run folder gets ``training_args.json``: the parsed command line (``vars(args)``), written by the
main process only.
"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys
from typing import Optional, Sequence

from ..errors import EngineError
from . import checkpoints as ck
from .args import TrainConfig, build_parser, parse_args

TRAINING_ARGS_FILE = "training_args.json"


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_progress(event: dict) -> None:
    kind = event.get("event")
    if kind == "step":
        total = event["total_steps"]
        every = max(1, total // 100)
        if event["step"] % every == 0 or event["step"] == total:
            print(f"step {event['step']}/{total}  loss {event['loss']:.4f} (avg {event['loss_avg']:.4f})  "
                  f"{event['sec_per_step']:.2f} s/step  ETA {_fmt_time(event['eta_s'])}", flush=True)
    elif kind == "checkpoint":
        print(f"saved {event['path']}", flush=True)
    elif kind == "sample":
        print(f"samples: {', '.join(event['paths'])}", flush=True)
    elif kind == "end":
        print(f"{event['status']} at step {event.get('step')}; final: {event.get('final')}"
              + (f"; in the LoRA library as {event['published']}" if event.get("published") else ""), flush=True)


def _process_state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    # The same CPU choice the Accelerator will make (it reads ACCELERATE_USE_CPU; a bare PartialState does not).
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _shared_run_dir(config: TrainConfig, args: dict) -> pathlib.Path:
    """The main process makes the run folder (and its training_args.json); under accelerate launch the others learn
    its name from it."""
    from accelerate.utils import broadcast_object_list

    from .api import prepare_run
    state = _process_state()
    box = [None]
    if state.is_main_process:
        run_dir = prepare_run(config)
        write_training_args(run_dir, args)
        box = [str(run_dir)]
    if state.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return pathlib.Path(box[0])


def command_line_args(argv) -> dict:
    """``vars(args)`` of the parsed command line, as the seed's ``save_training_args`` writes it."""
    return vars(build_parser().parse_args(shlex.split(argv) if isinstance(argv, str) else argv))


def seed_args(config: TrainConfig) -> dict:
    """The parsed command line a run started without one (the studio's Train tab) would have had: every flag's
    default, overlaid with the run's configuration."""
    args = command_line_args([])
    args.update(config.to_json())
    return args


def write_training_args(run_dir, args: dict) -> pathlib.Path:
    """``<run>/training_args.json`` exactly as the seed writes it (indent 4, ensure_ascii False, default=str)."""
    path = pathlib.Path(run_dir) / TRAINING_ARGS_FILE
    with open(path, "w", encoding="utf-8") as f:
        json.dump(args, f, indent=4, ensure_ascii=False, default=str)
    return path


def accelerate_command(run_dir, num_processes: int, config_file: Optional[str] = None, cpu: bool = False,
                       main_process_port: Optional[int] = None, python: Optional[str] = None
                       ) -> tuple[list[str], dict]:
    """``(command, environment additions)`` that train (or resume) the prepared run folder ``run_dir`` on
    ``num_processes`` processes, one per GPU: ``python -m accelerate.commands.launch --multi_gpu --num_processes N
    -m engine.training --resume RUN_DIR`` (torchrun underneath). ``config_file``: an accelerate config (the seed's
    DeepSpeed ZeRO-2 one, say; ``num_processes`` overrides its count). ``cpu``: CPU processes over gloo (tests, a
    machine without GPUs): accelerate's own ``--cpu`` starts several processes only through mpirun, so the processes
    are started as for GPUs and told ``ACCELERATE_USE_CPU``. Run it from the repository root (``engine`` must be
    importable); events.jsonl in the run folder follows it."""
    n = int(num_processes)
    if n < 1:
        raise EngineError(f"num_processes {n}: at least 1 process is needed.")
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    cmd += ["--num_processes", str(n), "--num_machines", "1"]
    if n > 1 and not config_file:
        cmd += ["--multi_gpu"]
    if not config_file:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if main_process_port:
        cmd += ["--main_process_port", str(int(main_process_port))]
    env = {"ACCELERATE_USE_CPU": "true"} if cpu else {}
    return cmd + ["-m", "engine.training", "--resume", str(run_dir)], env


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config, resume, notes = parse_args(argv)
    for note in notes:
        print(note)
    from .runner import Trainer
    try:
        if resume:
            data = ck.read_run(resume)
            if not data.get("config"):
                print(f"--resume {resume}: not a training run folder (no run.json).", file=sys.stderr)
                return 2
            config, run_dir = TrainConfig.from_json(data["config"]), pathlib.Path(resume)
            if not (run_dir / TRAINING_ARGS_FILE).is_file() and _process_state().is_main_process:
                write_training_args(run_dir, seed_args(config))   # a run prepared without a command line
        else:
            run_dir = _shared_run_dir(config, command_line_args(argv if argv is not None else sys.argv[1:]))
        print(f"Run folder: {run_dir}", flush=True)
        result = Trainer(config, run_dir, on_progress=console_progress, log=lambda m: print(m, flush=True)).run()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted; resume with --resume from the last saved state.", file=sys.stderr)
        return 130
    return 0 if result.get("status") in ("finished", "stopped") else 1
