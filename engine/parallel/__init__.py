"""One image on several GPUs: diffusers' context parallelism (Ulysses / ring attention) on the engine's FLUX.1,
FLUX.2 and FLUX 3 pipelines under ``torchrun``.

    torchrun --nproc_per_node=4 -m engine.parallel.generate --model FLUX.1-dev --prompt "a fox" --ulysses 4

or from a script started by torchrun (every process runs the same lines)::

    from engine.parallel import init_group, generate_image
    ranks = init_group()                                    # nccl on CUDA (GPU = LOCAL_RANK), gloo on CPU
    pipe = FluxImagePipeline.from_pretrained(device=ranks.device, model_configs=[...])
    pipe.enable_context_parallel(ulysses_degree=ranks.world_size)
    image = generate_image(pipe, prompt="a fox", seed=0)    # the same call on every rank
    if ranks.is_main:
        image.save("fox.png")

- ``group``: the process group from torchrun's environment (``init_group``, ``close_group``, ``Ranks``,
  ``shared_seed``);
- ``plans``: how each family's transformer inputs are cut and its output gathered (diffusers' plan format);
- ``context``: the checks and ``enable_context_parallel`` (what it refuses and why is in its doc);
- ``runner``: ``generate_image``, the same call on every rank;
- ``generate``: the command line.

Why diffusers' and not xDiT (``xfuser``): diffusers' hooks go on the engine's own transformer objects, so the
engine's pipelines, loaders, LoRAs and schedules stay as they are, FLUX.2 and FLUX 3 included, with no new
dependency; xDiT runs its own wrappers of diffusers' pipelines (FLUX.1 among them, not the engine's loops) and is
CUDA-only.
"""
from .context import ContextParallel, check_layout, degrees, enable_context_parallel
from .group import ParallelError, Ranks, close_group, current, init_group, shared_seed, torchrun_env
from .runner import generate_image

__all__ = ["ContextParallel", "ParallelError", "Ranks", "check_layout", "close_group", "current", "degrees",
           "enable_context_parallel", "generate_image", "init_group", "shared_seed", "torchrun_env"]
