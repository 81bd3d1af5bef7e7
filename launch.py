#!/usr/bin/env python
"""FLUX Studio: python launch.py [--models-dir DIR] [--vram-limit GB] [--ram-limit GB] [--device cuda|cpu|...] [--demo]
[--share] [--auth user:pass] [--port 7860] [--host 127.0.0.1] [--allow-dir DIR] [--allowed-hosts HOST,...]

Serves the studio on http://127.0.0.1:7860 by default. Starting it contacts no outside host (no analytics,
no web fonts); only --share opens a public tunnel.
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="FLUX Studio: a local web studio for the FLUX.1 image models.",
        epilog="Example: python launch.py --models-dir ./models --vram-limit 12. "
               "Without real weights, --demo runs a tiny random-weight model (images are noise).",
    )
    parser.add_argument("--models-dir", metavar="DIR", default=None,
                        help="models folder, laid out as <DIR>/<model_id>/<file> "
                             "(default: $DIFFSYNTH_MODEL_BASE_PATH or ./models)")
    parser.add_argument("--outputs-dir", metavar="DIR", default=None,
                        help="where images are saved (default: ./outputs)")
    parser.add_argument("--vram-limit", metavar="GB", type=float, default=None,
                        help="GPU memory the engine may use, in GB; it offloads to fit (default: all free memory)")
    parser.add_argument("--ram-limit", metavar="GB", type=float, default=None,
                        help="system RAM the models may use, in GB; the memory plan keeps weights in fp8 or reads "
                             "them from their files to fit (default: what the machine has free)")
    parser.add_argument("--device", metavar="DEVICE", default=None,
                        help="torch device: cuda, cuda:1, mps, cpu ... (default: the best one present)")
    parser.add_argument("--demo", action="store_true",
                        help="use the random-weight demo model (no download; images are noise)")
    parser.add_argument("--share", action="store_true",
                        help="also serve through a public gradio.live link (the only option that goes online)")
    parser.add_argument("--auth", metavar="USER:PASS", default=None,
                        help="require a login; several as user1:pass1,user2:pass2")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}; 0.0.0.0 for the local network)")
    parser.add_argument("--allow-dir", metavar="DIR", action="append", default=[],
                        help="a folder whose files requests may name, beside the models and outputs folders and "
                             "uploads (repeatable)")
    parser.add_argument("--allowed-hosts", metavar="HOST[,HOST]", default=None,
                        help="host names the studio answers to beside localhost, the listening address and the "
                             "--share link (for a reverse proxy or a LAN name)")
    return parser


def parse_auth(text: str | None) -> list[tuple[str, str]] | None:
    """"user:pass[,user2:pass2]" -> [(user, pass), ...]; ValueError with a clear message otherwise."""
    if text is None:
        return None
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(
                f"--auth expects USER:PASSWORD (several separated by commas), got {item.strip()!r}. "
                "Example: --auth alice:s3cret"
            )
        pairs.append((user.strip(), password))
    return pairs


def port_problem(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None when it can."""
    import socket  # noqa: PLC0415

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"unknown host ({exc})"
    family, socktype, proto, _, address = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        parser.error(str(exc))
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    if args.vram_limit is not None and args.vram_limit <= 0:
        parser.error(f"--vram-limit must be a positive number of GB, got {args.vram_limit}")
    if args.ram_limit is not None and args.ram_limit <= 0:
        parser.error(f"--ram-limit must be a positive number of GB, got {args.ram_limit}")
    for folder in args.allow_dir:
        if not os.path.isdir(os.path.expanduser(folder)):
            parser.error(f"--allow-dir {folder}: no such folder. Name an existing folder whose files the studio may "
                         f"read.")
    allowed_hosts = [h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()]

    problem = port_problem(args.host, args.port)
    if problem:  # say so now, before minutes of model loading
        print(f"FLUX Studio could not listen on {args.host}:{args.port}: {problem}\n"
              f"Is another program using port {args.port}? Choose another with --port.", file=sys.stderr)
        return 1

    # Before gradio or huggingface_hub are imported: no analytics, no telemetry.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

    from engine.errors import EngineError  # noqa: PLC0415
    from studio import configure_engine  # noqa: PLC0415 - after the argument checks

    try:
        engine = configure_engine(models_dir=args.models_dir, device=args.device, vram_limit=args.vram_limit,
                                  demo=args.demo, outputs_dir=args.outputs_dir, allow_dirs=args.allow_dir,
                                  defer_demo=True)     # the page first: the demo's files are written after it
    except EngineError as exc:
        print(f"FLUX Studio could not start: {exc}", file=sys.stderr)
        return 1
    engine.models.ram_limit = args.ram_limit     # None: the memory plan fits what the machine has free

    from app.studio import launch_studio  # noqa: PLC0415

    try:
        demo = launch_studio(engine, host=args.host, port=args.port, share=args.share, auth=auth,
                             allowed_hosts=allowed_hosts, prevent_thread_lock=True, quiet=True)
    except OSError as exc:
        print(f"FLUX Studio could not listen on {args.host}:{args.port}: {exc}\n"
              f"Is another program using port {args.port}? Choose another with --port.", file=sys.stderr)
        return 1

    # What exists now (torch, gradio, the studio's UI: most of the process's objects) lives until the studio stops:
    # out of the collector's way, so the full passes that follow loading a model walk only what came after.
    import gc  # noqa: PLC0415
    gc.collect()
    gc.freeze()
    url = demo.local_url or f"http://{args.host}:{args.port}/"
    print(f"FLUX Studio is running at {url}")
    if getattr(demo, "share_url", None):
        print(f"Public link (--share): {demo.share_url}")
    if engine.demo_only:
        print(f"Only the random-weight demo model is present: images are noise. "
              f"Put real weights in {getattr(engine, 'models_dir', 'models')} (see README).")
    print("Press Ctrl+C to stop.")
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
