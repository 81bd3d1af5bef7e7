"""FLUX.2 under VRAM limits: the engine's plans for full-size [klein] 4B, [klein] 9B and [dev], from the checkpoint
manifests (every tensor's shape; no weights, no GPU), as ``benchmarks/vram.py --dry-run`` prints FLUX.1-dev's.

For each model and limit one line a script can read, ``== plan for 12 GB: predicted peak VRAM 11.2 GB, RAM 13.9 GB,
9.8 s/image``, then each component's placement (resident, offload, fp8, fp8+offload, stream with its resident
blocks), storage, VRAM, RAM and predicted seconds. Each model is planned for its own default steps (klein 4, [dev]
50) and a new prompt per image; the rates are the planned-for device's, measured here at first use, or an
H100-class reference card's where it is not here (``engine.memory.cost``).

    python benchmarks/vram_flux2.py                                    # 4 8 12 16 24 32 48 80 GB and none
    python benchmarks/vram_flux2.py --models FLUX.2-dev --limits 8 24 --size 2048 --references 2
    python benchmarks/vram_flux2.py --ram-limit 32                     # RAM budget (default 16 GB; 'none')

``--references N`` plans room for N reference images of the output's size (multi-reference editing: their tokens
join the transformer's sequence). Measured runs on a GPU are ``benchmarks/vram.py``'s (FLUX.1-dev) for now.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ("FLUX.2-klein-4B", "FLUX.2-klein-9B", "FLUX.2-dev")
MANIFESTS = pathlib.Path(os.environ.get("FLUX_MANIFESTS", REPO.parent / "shared" / "checkpoint-manifests"))


def manifest_paths(name: str, root: pathlib.Path = MANIFESTS) -> dict:
    d = root / name
    return {"text_encoder": d / "text_encoder" / "model.safetensors.json",
            "dit": d / "transformer" / "diffusion_pytorch_model.safetensors.json",
            "vae": d / "vae" / "diffusion_pytorch_model.safetensors.json"}


def _gb_or_none(text: str):
    if str(text).lower() in ("none", "0", "unlimited"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--limits", nargs="+", type=_gb_or_none, default=[4, 8, 12, 16, 24, 32, 48, 80, None],
                   help="VRAM limits in GB, 'none' for no limit")
    p.add_argument("--size", type=int, default=1024, help="square output size in pixels")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: each model's own)")
    p.add_argument("--references", type=int, default=0, help="reference images of the output's size")
    p.add_argument("--ram-limit", "--ram", dest="ram_limit", type=_gb_or_none, default=16.0,
                   help="RAM budget in GB, 'none' for none (default 16)")
    return p.parse_args(argv)


def default_steps(name: str) -> int:
    from engine import registry
    try:
        return registry.get_variant(name).default_steps
    except Exception:  # noqa: BLE001 - a name the registry does not list
        return 28


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks.vram import print_plan
    from engine import memory
    tokens = 512 + args.references * (args.size // 16) ** 2
    ram = "none" if args.ram_limit is None else f"{args.ram_limit:g} GB"
    print(f"rates: {memory.cost.constants('cuda').as_dict()}")
    for name in args.models:
        sizes = memory.sizes_from_manifests(manifest_paths(name))
        steps = args.steps or default_steps(name)
        weights = ", ".join(f"{r} {memory.gb(s.nbytes('bfloat16', 'bfloat16')):.1f} GB" for r, s in sizes.items())
        print(f"\n{name} ({weights} in bf16), {args.size}x{args.size}, {steps} steps, {args.references} "
              f"reference(s), RAM limit {ram}:")
        for limit in args.limits:
            p = memory.plan(sizes, "cuda", limit, args.ram_limit, width=args.size, height=args.size,
                            t5_sequence_length=tokens, pipeline="flux2", steps=steps)
            print_plan(p, limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
