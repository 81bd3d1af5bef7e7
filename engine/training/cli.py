"""``train.py`` / ``python -m engine.training``: the seed's training command line.

Runs as is (one process) or under ``accelerate launch`` (several GPUs: DDP, or DeepSpeed ZeRO from an accelerate
config such as the seed's ``accelerate_config_zero2offload.yaml``). ``--resume RUN_DIR`` continues a stopped or
killed run from its last saved state with the arguments it was started with.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Optional, Sequence

from ..errors import EngineError
from . import checkpoints as ck
from .args import TrainConfig, parse_args


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


def _shared_run_dir(config: TrainConfig) -> pathlib.Path:
    """The main process makes the run folder; under accelerate launch the others learn its name from it."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from .api import prepare_run
    # The same CPU choice the Accelerator will make (it reads ACCELERATE_USE_CPU; a bare PartialState does not).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    box = [str(prepare_run(config)) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return pathlib.Path(box[0])


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
        else:
            run_dir = _shared_run_dir(config)
        print(f"Run folder: {run_dir}", flush=True)
        result = Trainer(config, run_dir, on_progress=console_progress, log=lambda m: print(m, flush=True)).run()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted; resume with --resume from the last saved state.", file=sys.stderr)
        return 130
    return 0 if result.get("status") in ("finished", "stopped") else 1
