"""FLUX.2 under VRAM limits: the engine's plans for full-size [klein] 4B, [klein] 9B and [dev], from the checkpoint
manifests (every tensor's shape; no weights, no GPU), as ``benchmarks/vram.py --dry-run`` prints FLUX.1-dev's.

For each model and limit: each component's strategy and storage (resident, offload, fp8, fp8+offload, stream), the
predicted peak VRAM (the largest stage, with the runtime reserve) and the RAM the weights take.

    python benchmarks/vram_flux2.py                                    # 8 12 16 24 32 48 80 GB, 1024x1024
    python benchmarks/vram_flux2.py --models FLUX.2-dev --limits 8 24 --size 2048 --references 2
    python benchmarks/vram_flux2.py --ram 32                           # with a RAM budget (memory-mapped streaming)

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--limits", nargs="+", type=float, default=[8, 12, 16, 24, 32, 48, 80])
    p.add_argument("--size", type=int, default=1024, help="square output size in pixels")
    p.add_argument("--references", type=int, default=0, help="reference images of the output's size")
    p.add_argument("--ram", type=float, default=None, help="RAM budget in GB (default: none)")
    return p.parse_args(argv)


def row(p) -> str:
    parts = [f"{r}={e.strategy}{' fp8' if 'float8' in e.storage_dtype else ''}" for r, e in p.entries.items()]
    flag = "" if p.fits else "  (does not fit)"
    return (f"{', '.join(parts):<72} peak {p.predicted_peak_vram_gb:5.2f} GB during {p.peak_stage:<12} "
            f"RAM {p.predicted_peak_ram_gb:5.1f} GB{flag}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine import memory
    tokens = 512 + args.references * (args.size // 16) ** 2
    for name in args.models:
        sizes = memory.sizes_from_manifests(manifest_paths(name))
        weights = ", ".join(f"{r} {memory.gb(s.nbytes('bfloat16', 'bfloat16')):.1f} GB" for r, s in sizes.items())
        print(f"{name} ({weights} in bf16), {args.size}x{args.size}, {args.references} reference(s):")
        for limit in args.limits:
            p = memory.plan(sizes, "cuda", limit, args.ram, width=args.size, height=args.size,
                            t5_sequence_length=tokens)
            print(f"  {limit:>5g} GB: {row(p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
