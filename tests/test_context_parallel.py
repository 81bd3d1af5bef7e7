"""One image on several GPUs (issue 21, item 6): diffusers' context parallelism on the engine's transformers
(``engine.parallel``), run here on CPUs over gloo.

Two processes with the environment torchrun gives (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) run
``engine.parallel.check``: tiny random FLUX.1, FLUX.2 and FLUX 3 transformers (float32) one forward plainly and then
split in two with Ulysses attention (diffusers' all-to-all over gloo, torch's SDPA), FLUX 3 also with token counts
that do not divide (diffusers' uneven mode), and a 2-step image from the FLUX.1 random-weight demo pipeline both ways.
Each must match the single-process result, and each rank's first attention layer must have seen half the tokens (so
the split really happened). The checks that need no process group (layouts, inputs, launch errors) run in-process.

Not testable here, and why: NCCL and GPU kernels (no GPU); ring attention, which needs an attention kernel that
returns the log-sum-exp (cuDNN's or flash, CUDA only; torch's SDPA backend refuses ``return_lse``); speed and memory
(``benchmarks/context_parallel.py`` on a multi-GPU machine). On such a machine,
``torchrun --nproc_per_node=2 -m engine.parallel.check`` runs the same comparison over NCCL.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import torch

from engine.parallel import ParallelError, check_layout, degrees, generate_image, torchrun_env
from engine.parallel.check import tiny, tiny_inputs
from engine.parallel.context import InputGuard

REPO = pathlib.Path(__file__).resolve().parent.parent
WORLD = 2
CASES = ("flux1 forward", "flux2 forward", "flux3 forward", "flux3 forward uneven", "flux1 2-step image")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The two ranks: one fresh interpreter imports torch and diffusers once, then forks rank 1 before any process group
# or thread pool exists (the imports are most of a rank's CPU time); each rank then joins the gloo group on its own,
# from the environment torchrun would give it.
LAUNCHER = """
import os, sys, traceback
import engine.parallel.check as check
import engine.pipeline
from diffusers import Flux2Transformer2DModel, Flux3Transformer2DModel, FluxTransformer2DModel


def rank_main(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        return check.main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


children = []
for rank in range(1, int(os.environ["WORLD_SIZE"])):
    pid = os.fork()
    if pid == 0:
        os._exit(rank_main(rank))
    children.append(pid)
code = rank_main(0)
for pid in children:
    code = code or os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
sys.exit(code)
"""


@pytest.fixture(scope="module")
def two_ranks(demo_dir, tmp_path_factory):
    """(exit code, stdout, stderr, [each rank's results]) of ``engine.parallel.check`` on two gloo ranks."""
    out = tmp_path_factory.mktemp("context_parallel") / "check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(WORLD),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    command = [sys.executable, "-c", LAUNCHER, "--models-dir", str(demo_dir.parent.parent), "--json", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)        # both ranks: a hung collective must not outlive the test
    results = [pathlib.Path(f"{out}.rank{r}") for r in range(WORLD)]
    return proc.returncode, stdout, stderr, [json.loads(r.read_text()) if r.exists() else None for r in results]


def test_both_ranks_match_the_single_process_result(two_ranks):
    code, stdout, stderr, ranks = two_ranks
    assert code == 0 and None not in ranks, f"a rank failed:\n{stdout}\n{stderr[-3000:]}"
    for rank, results in enumerate(ranks):
        assert [r["case"] for r in results] == list(CASES)
        for r in results:
            print(f"rank {rank} {r['case']}: max abs diff {r['max_abs_diff']:.3g} (output up to {r['scale']:.3g})")
            assert r["rank"] == rank and r["world_size"] == WORLD and r["backend"] == "gloo"
            assert r["scale"] > 0.1, "a zero output would match anything"
            assert r["max_abs_diff"] <= 1e-4, r
    assert stdout.count("context parallel check: 2 processes, gloo, cpu") == 1, "rank 0 prints, rank 1 does not"


def test_each_rank_computed_half_the_tokens(two_ranks):
    for results in two_ranks[3]:
        for r in results:
            assert r["tokens_parallel"] * WORLD == r["tokens_whole"], r


def test_the_two_step_image_is_the_same_image(two_ranks):
    image = two_ranks[3][0][-1]
    assert image["case"] == "flux1 2-step image" and image["shape"] == [1, 16, 8, 8]
    assert image["max_pixel_diff"] <= 1, image


# --------------------------------------------------------------------------------------------- no process group
@pytest.fixture(scope="module")
def flux1():
    return tiny("flux1").eval()


def test_layouts_refused_with_the_fix(flux1):
    check_layout(flux1, 4, 4, 1)                                         # 8 heads over 4 Ulysses ranks: fine
    check_layout(flux1, 4, 2, 2, attention="cudnn", device_type="cuda")
    cases = [((flux1, 3, 3, 1), "8 attention heads"),
             ((flux1, 4, 2, 1), "must equal the number of processes"),
             ((flux1, 1, 1, 1), "2 or more processes"),
             ((flux1, 2, 1, 2), "cuDNN's or flash"),                     # ring with torch's SDPA
             ((flux1, 2, 1, 2, False, "cudnn", "cpu"), "on cpu"),
             ((flux1, 2, 2, 1, False, "efficient"), "no context parallel support"),
             ((flux1, 4, 2, 2, True, "cudnn"), "not both"),
             ((torch.nn.Linear(2, 2), 2, 2, 1), "FLUX.1, FLUX.2 and FLUX 3")]
    for arguments, words in cases:
        with pytest.raises(ParallelError, match=words):
            check_layout(*arguments)
    check_layout(flux1, 3, 3, 1, uneven=True)                            # uneven heads: diffusers' ulysses_anything
    assert degrees(4) == (4, 1) and degrees(4, ring_degree=2) == (2, 2) and degrees(8, 2) == (2, 4)


def test_launch_outside_torchrun_says_how(monkeypatch, capsys):
    with pytest.raises(ParallelError, match=r"torchrun --nproc_per_node=<GPUs> -m engine.parallel.generate"):
        torchrun_env({"RANK": "0", "WORLD_SIZE": "2"})
    assert torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                         "MASTER_PORT": "1"})["LOCAL_RANK"] == 1
    from engine.parallel.generate import main
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--prompt", "a fox", "--model", "FLUX.1-dev-random-demo"]) == 2
    assert "Not started by torchrun" in capsys.readouterr().err


def test_inputs_the_split_cannot_take_are_refused(flux1):
    guard = InputGuard(flux1, WORLD, uneven=False)
    x = tiny_inputs("flux1", 16, 8, 0, torch.float32, "cpu")
    assert guard(flux1, (), x) is None
    bad = [({**x, **tiny_inputs("flux1", 15, 8, 0, torch.float32, "cpu")}, "15 tokens, which do not split evenly"),
           ({**x, "img_ids": x["img_ids"][None]}, "must be 2-D"),
           ({**x, "controlnet_block_samples": [x["hidden_states"]]}, "ControlNet"),
           ({**x, "joint_attention_kwargs": {"attention_mask": None}}, "EliGen")]
    for kwargs, words in bad:
        with pytest.raises(ParallelError, match=words):
            guard(flux1, (), kwargs)
    assert guard(flux1, (), {**x, "joint_attention_kwargs": {"scale": 0.5}}) is None     # a LoRA scale is fine
    with pytest.raises(ParallelError, match="'efficient', which cannot run this split"):
        InputGuard(flux1, WORLD, False, attention_now=lambda: "efficient")(flux1, (), x)
    uneven = InputGuard(flux1, WORLD, uneven=True)
    assert uneven(flux1, (), {**x, **tiny_inputs("flux1", 15, 7, 0, torch.float32, "cpu")}) is None


def test_inputs_left_out_reach_diffusers_as_none():
    flux3 = tiny("flux3")
    x = tiny_inputs("flux3", 16, 8, 4, torch.float32, "cpu")
    for name in ("image_cond_hidden_states", "image_cond_ids"):
        x.pop(name)
    _, kwargs = InputGuard(flux3, WORLD, uneven=False)(flux3, (), x)
    assert kwargs["image_cond_hidden_states"] is None and kwargs["image_cond_ids"] is None


def test_generate_image_needs_the_split_and_no_step_cache():
    class Pipe:
        def __call__(self, **call):
            return call
    with pytest.raises(ParallelError, match="enable_context_parallel"):
        generate_image(Pipe(), prompt="a fox")
    pipe = Pipe()
    pipe.context_parallel = object()
    for option in ("step_cache", "tea_cache_l1_thresh"):
        with pytest.raises(ParallelError, match=option):
            generate_image(pipe, prompt="a fox", **{option: 0.1})
