#!/usr/bin/env python
"""FLUX Studio: python launch.py [--models-dir DIR] [--vram-limit GB] [--ram-limit GB] [--device cuda|cpu|...] [--demo]
[--share] [--auth user:pass] [--port 7860] [--host 127.0.0.1] [--allow-dir DIR] [--allowed-hosts HOST,...] [--mcp]
[--max-pixels N] [--max-steps N] [--max-batch N] [--serve ray [--ray-address ADDR] [--replicas N] ...]

Serves the studio on http://127.0.0.1:7860 by default ($GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT where set, as on
a Hugging Face Space: this file is the Space's app). Starting it contacts no outside host (no analytics, no web
fonts); only --share opens a public tunnel.
"""
from __future__ import annotations

import argparse
import os
import signal
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
    parser.add_argument("--port", type=int, default=None,
                        help=f"port (default: $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    parser.add_argument("--host", default=None,
                        help=f"address to listen on (default: $GRADIO_SERVER_NAME, else {DEFAULT_HOST}; 0.0.0.0 for "
                             f"the local network)")
    parser.add_argument("--allow-dir", metavar="DIR", action="append", default=[],
                        help="a folder whose files requests may name, beside the models and outputs folders and "
                             "uploads (repeatable)")
    parser.add_argument("--allowed-hosts", metavar="HOST[,HOST]", default=None,
                        help="host names the studio answers to beside localhost, the listening address and the "
                             "--share link (for a reverse proxy or a LAN name)")
    parser.add_argument("--mcp", action="store_true",
                        help="also serve the generate_image / edit_image / list_models tools to MCP clients at "
                             "<studio address>/gradio_api/mcp/ (streamable HTTP)")
    # Shared use (a --share link, --auth, a Space): caps on one job (on a Space: FLUX_STUDIO_MAX_PIXELS etc.).
    parser.add_argument("--max-pixels", metavar="N", type=int, default=None,
                        help="largest image one job may make, in pixels (1048576 = 1024x1024); default: no limit, "
                             "or $FLUX_STUDIO_MAX_PIXELS")
    parser.add_argument("--max-steps", metavar="N", type=int, default=None,
                        help="most denoising steps one job may ask for (default: no limit, or $FLUX_STUDIO_MAX_STEPS)")
    parser.add_argument("--max-batch", metavar="N", type=int, default=None,
                        help="most images one job may make (default: no limit, or $FLUX_STUDIO_MAX_BATCH)")
    # Serving on several GPUs or machines (pip install -r requirements-serve.txt): the jobs on Ray Serve replicas.
    parser.add_argument("--serve", choices=["ray"], default=None,
                        help="run the jobs on replicas of a Ray Serve deployment, one per GPU of this machine or of "
                             "a Ray cluster; this process serves the page, queue and outputs (needs "
                             "requirements-serve.txt)")
    parser.add_argument("--ray-address", metavar="ADDR", default=None,
                        help="with --serve ray: the Ray cluster to join, auto (the one this machine joined with ray "
                             "start) or HOST:PORT (default: start Ray on this machine only)")
    parser.add_argument("--replicas", metavar="N", type=int, default=None,
                        help="with --serve ray: how many replicas (default: one per GPU Ray sees, 1 without GPUs)")
    parser.add_argument("--min-replicas", metavar="N", type=int, default=None,
                        help="with --serve ray: autoscale, keeping at least N replicas (0: none while idle)")
    parser.add_argument("--max-replicas", metavar="N", type=int, default=None,
                        help="with --serve ray: autoscale, starting at most N replicas")
    return parser


def serve_problem(args) -> str | None:
    """What is wrong with the --serve flags, or None."""
    given = [flag for flag, value in (("--ray-address", args.ray_address), ("--replicas", args.replicas),
                                      ("--min-replicas", args.min_replicas), ("--max-replicas", args.max_replicas))
             if value is not None]
    if args.serve is None:
        return f"{', '.join(given)}: only with --serve ray (add it, or leave them out)" if given else None
    for flag, value, least in (("--replicas", args.replicas, 1), ("--min-replicas", args.min_replicas, 0),
                               ("--max-replicas", args.max_replicas, 1)):
        if value is not None and value < least:
            return f"{flag} must be {least} or more, got {value}"
    if None not in (args.min_replicas, args.max_replicas) and args.min_replicas > args.max_replicas:
        return f"--min-replicas ({args.min_replicas}) is more than --max-replicas ({args.max_replicas})"
    import importlib.util  # noqa: PLC0415
    if importlib.util.find_spec("ray") is None:
        return "--serve ray needs Ray Serve: pip install -r requirements-serve.txt"
    return None


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


def check_args(parser: argparse.ArgumentParser, args) -> list[tuple[str, str]] | None:
    """The parsed flags checked (``parser.error`` names any problem); where to listen filled in from the environment.
    Returns the --auth pairs."""
    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        parser.error(str(exc))
    # Where to listen: the flags, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (a Space sets them), else the defaults.
    from studio import space  # noqa: PLC0415 - plain Python: the Space's settings (studio/space.py)
    try:
        env_host, env_port = space.server_defaults(os.environ, DEFAULT_HOST, DEFAULT_PORT)
    except ValueError as exc:
        parser.error(str(exc))
    args.host = env_host if args.host is None else args.host
    args.port = env_port if args.port is None else args.port
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535, got {args.port}")
    for flag, value in (("--vram-limit", args.vram_limit), ("--ram-limit", args.ram_limit)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be a positive number of GB, got {value:g}")
    for flag, value in (("--max-pixels", args.max_pixels), ("--max-steps", args.max_steps),
                        ("--max-batch", args.max_batch)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a whole number from 1 up, got {value}")
    for folder in args.allow_dir:
        if not os.path.isdir(os.path.expanduser(folder)):
            parser.error(f"--allow-dir {folder}: no such folder. Name an existing folder whose files the studio may "
                         f"read.")
    if args.mcp and auth:
        parser.error("--mcp cannot be used with --auth: Gradio's MCP server runs the tools through the studio "
                     "without logging in, so every call would fail. Serve MCP from a studio without a login.")
    if serve_problem(args):
        parser.error(serve_problem(args))
    return auth


def space_settings(args, allowed_hosts: list[str]) -> bool:
    """On a Hugging Face Space (SPACE_ID): models from the Hub cache, its page's host name answered, no tunnel; on
    ZeroGPU ``spaces`` imported before torch (it patches it). Returns whether this is a ZeroGPU Space."""
    from studio import space  # noqa: PLC0415
    if not space.on_space():
        return False
    if args.models_dir is None:
        args.models_dir = str(space.space_models_dir())
    allowed_hosts += space.space_host_names()
    if args.share:
        print("--share is ignored on a Space: the Space serves the page.", file=sys.stderr)
        args.share = False
    if not space.zero_gpu():
        return False
    from studio.zerogpu import import_spaces  # noqa: PLC0415
    import_spaces()
    return True


def start_engine(parser: argparse.ArgumentParser, args, auth, zero_gpu: bool):
    """The studio's engine: shared or not (--share, --auth or a Space: each person their own outputs, the limits
    on one job), its jobs on Ray Serve replicas (--serve ray) or through spaces.GPU (ZeroGPU, the default model
    loaded now: packed at launch onto each lent GPU). An EngineError says why it could not start."""
    from studio import configure_engine  # noqa: PLC0415 - after the argument checks
    from studio.sharing import Sharing  # noqa: PLC0415
    from engine.errors import EngineError  # noqa: PLC0415
    try:
        sharing = Sharing.for_launch(share=args.share, auth=auth is not None, space_id=os.environ.get("SPACE_ID"),
                                     max_pixels=args.max_pixels, max_steps=args.max_steps,
                                     max_batch=args.max_batch, env=os.environ)
    except EngineError as exc:
        parser.error(str(exc))
    engine = configure_engine(models_dir=args.models_dir, device=args.device, vram_limit=args.vram_limit,
                              demo=args.demo, outputs_dir=args.outputs_dir, allow_dirs=args.allow_dir,
                              defer_demo=True,     # the page first: the demo's files are written after it
                              sharing=sharing)
    engine.models.ram_limit = args.ram_limit     # None: the memory plan fits what the machine has free
    if args.serve == "ray":     # the jobs on Ray Serve replicas (studio/serving); this process serves the page
        from studio.serving import start_ray_serving  # noqa: PLC0415
        executor = start_ray_serving(engine, address=args.ray_address, replicas=args.replicas,
                                     min_replicas=args.min_replicas, max_replicas=args.max_replicas)
        print(executor.describe())
    if zero_gpu:
        from studio import zerogpu  # noqa: PLC0415
        zerogpu.install(engine)
        print(f"ZeroGPU: loading {zerogpu.preload(engine)} before serving the page")
    return engine


def studio_tabs() -> list[str]:
    """The page's tabs: the Train tab says why training is off where it is (a Space, unless its owner turned it on)."""
    from app.studio import TABS  # noqa: PLC0415
    from studio import space  # noqa: PLC0415
    if space.training_enabled():
        return list(TABS)
    from tabs.train_off import instead_of_train  # noqa: PLC0415
    return instead_of_train(TABS)


def say_started(demo, engine, args) -> None:
    url = demo.local_url or f"http://{args.host}:{args.port}/"
    print(f"FLUX Studio is running at {url}")
    if getattr(demo, "share_url", None):
        print(f"Public link (--share): {demo.share_url}")
    sharing = engine.sharing
    if sharing.shared:
        print(f"Shared ({sharing.reason}): each person sees only their own images. {sharing.describe()}".rstrip())
    if args.mcp:
        from app.mcp_tools import mcp_url  # noqa: PLC0415
        print(f"MCP server (--mcp; tools generate_image, edit_image, list_models): {mcp_url(demo)}")
    if engine.demo_only:
        print(f"Only the random-weight demo model is present: images are noise. "
              f"Put real weights in {getattr(engine, 'models_dir', 'models')} (see README).")
    print("Press Ctrl+C to stop.")


def stop_on_sigterm(signum, frame):
    """SIGTERM as Ctrl+C: the page closes and what runs at exit runs (Ray Serve's replicas and agents stop)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    auth = check_args(parser, args)
    allowed_hosts = [h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()]
    problem = port_problem(args.host, args.port)
    if problem:  # say so now, before minutes of model loading
        print(f"FLUX Studio could not listen on {args.host}:{args.port}: {problem}\n"
              f"Is another program using port {args.port}? Choose another with --port.", file=sys.stderr)
        return 1

    # Before gradio or huggingface_hub are imported: no analytics, no telemetry.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    zero_gpu = space_settings(args, allowed_hosts)

    from engine.errors import EngineError  # noqa: PLC0415
    try:
        engine = start_engine(parser, args, auth, zero_gpu)
    except EngineError as exc:
        print(f"FLUX Studio could not start: {exc}", file=sys.stderr)
        return 1

    from app.studio import launch_studio  # noqa: PLC0415

    try:
        demo = launch_studio(engine, host=args.host, port=args.port, share=args.share, auth=auth,
                             allowed_hosts=allowed_hosts, prevent_thread_lock=True, quiet=True, mcp=args.mcp,
                             tabs=studio_tabs())
    except OSError as exc:
        print(f"FLUX Studio could not listen on {args.host}:{args.port}: {exc}\n"
              f"Is another program using port {args.port}? Choose another with --port.", file=sys.stderr)
        return 1

    # What exists now (torch, gradio, the studio's UI: most of the process's objects) lives until the studio stops:
    # out of the collector's way, so the full passes that follow loading a model walk only what came after.
    import gc  # noqa: PLC0415
    gc.collect()
    gc.freeze()
    say_started(demo, engine, args)
    signal.signal(signal.SIGTERM, stop_on_sigterm)   # a service manager's stop: the same clean exit as Ctrl+C
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
