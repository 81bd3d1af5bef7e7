"""The process group of a ``torchrun`` launch: one process per GPU, NCCL between GPUs, gloo on CPUs.

``torchrun --nproc_per_node=N ...`` starts N copies of a script and tells each who it is through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). ``init_group()`` reads them, picks the
backend (``nccl`` where CUDA is available, ``gloo`` otherwise), binds each process to GPU ``LOCAL_RANK`` and joins the
default process group; ``close_group()`` leaves it. ``Ranks`` says who this process is.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from ..errors import EngineError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "torchrun --nproc_per_node=<GPUs> -m engine.parallel.generate --ulysses <GPUs> ..."


class ParallelError(EngineError, ValueError):
    """Context parallelism cannot run as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class Ranks:
    """Who this process is in the group: ``rank`` of ``world_size``, ``local_rank`` on its machine, the backend and
    the device it computes on."""
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and saves."""
        return self.rank == 0


def torchrun_env(environ: Optional[Mapping[str, str]] = None) -> dict:
    """{RANK, WORLD_SIZE, LOCAL_RANK: int; MASTER_ADDR, MASTER_PORT: str} from torchrun's environment, or
    ParallelError naming what is missing and how to launch."""
    environ = os.environ if environ is None else environ
    missing = [name for name in TORCHRUN_VARIABLES if not environ.get(name)]
    if missing:
        raise ParallelError(f"Not started by torchrun ({', '.join(missing)} not set). Launch one process per GPU: "
                            f"{LAUNCH_HINT}")
    try:
        out = {name: int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    except ValueError:
        raise ParallelError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (got "
                            f"{[environ[n] for n in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')]}).") from None
    if not 0 <= out["RANK"] < out["WORLD_SIZE"]:
        raise ParallelError(f"RANK {out['RANK']} is outside WORLD_SIZE {out['WORLD_SIZE']}.")
    out.update(MASTER_ADDR=environ["MASTER_ADDR"], MASTER_PORT=environ["MASTER_PORT"])
    return out


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _device_for(backend: str, local_rank: int) -> str:
    if backend != "nccl":
        return "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ParallelError(f"Process {local_rank} on this machine has no GPU of its own: {count} visible. Start at "
                            f"most {count} processes per machine (torchrun --nproc_per_node={count}).")
    return f"cuda:{local_rank}"


def current() -> Ranks:
    """This process in the group already joined (``init_group``, or a process group set up by the caller)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(f"No process group: call engine.parallel.init_group() first, in every process started "
                            f"by torchrun ({LAUNCH_HINT}).")
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = _device_for("nccl" if "nccl" in backend else backend, local_rank)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def init_group(backend: Optional[str] = None, timeout_minutes: float = 30.0) -> Ranks:
    """Join the default process group from torchrun's environment (once; a second call returns the same group).
    ``backend``: None picks ``nccl`` with CUDA, else ``gloo``."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not dist.is_available():
        raise ParallelError("This torch build has no torch.distributed; install a build with it (the official "
                            "wheels have it).")
    env = torchrun_env()
    backend = backend or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise ParallelError("The nccl backend needs CUDA GPUs; this machine has none. Use backend='gloo'.")
    device = _device_for(backend, env["LOCAL_RANK"])
    kwargs = {}
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(backend, rank=env["RANK"], world_size=env["WORLD_SIZE"],
                            timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return Ranks(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], backend, device)


def close_group() -> None:
    """Leave the process group (nothing if none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shared_seed(seed: Optional[int]) -> int:
    """The same seed in every process: ``seed`` itself, or (None) rank 0's random draw sent to all, so every rank
    draws the same noise."""
    import random
    if seed is not None:
        return int(seed)
    drawn = torch.tensor([random.randrange(2 ** 31)], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if "nccl" in str(dist.get_backend()):
            drawn = drawn.to(f"cuda:{torch.cuda.current_device()}")
        dist.broadcast(drawn, src=0)
    return int(drawn.item())
