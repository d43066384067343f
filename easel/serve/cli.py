"""`easel serve`: run the HTTP server (native API, and the A1111 / OpenAI / UI routes when present)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from easel.serve.settings import MEMORY_FRACTION, Settings

log = logging.getLogger("easel.serve")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `easel serve` on the CLI's sub-parsers."""
    d = Settings()
    p = subparsers.add_parser("serve", help="run the HTTP API server (and web UI when installed)")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host}: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    p.add_argument("--model", "-m", help="default model: path, name from `easel models` (default: built-in)")
    p.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"], help="compute dtype (default fp32)")
    p.add_argument("--device", default=d.device, help="torch device (default cpu)")
    p.add_argument("--api-auth", help="require HTTP basic auth: user:password (several: comma-separated)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' (or ?token=TOKEN)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"jobs waiting at most (default {d.max_queue})")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help=f"width x height at most (default {d.max_pixels})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"steps at most (default {d.max_steps})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"batch_size x n_iter at most (default {d.max_batch})")
    p.add_argument("--max-input-pixels", type=int, default=None,
                   help="pixels of each input image at most, read from its header before decoding "
                        "(default: 4 x --max-pixels)")
    p.add_argument("--max-memory", type=float, default=None,
                   help="estimated peak memory of one request at most, in GiB; over it is a 413 naming the limit "
                        f"(default: {MEMORY_FRACTION:.0%} of the memory available at start)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"request body size at most, in MiB (default {d.max_body_bytes / 2**20:g})")
    p.add_argument("--cors-origin", action="append", default=[], dest="cors_origins",
                   help="allow browser requests from this origin (repeatable; '*' for any); default: CORS off")
    p.add_argument("--output-dir", help="folder for images that API clients ask to save (default: ./outputs)")
    p.add_argument("--train-root", help="allow training jobs (POST /api/v1/train, the web UI's Train tab) on the "
                                        "dataset folders under this folder (default: training is off)")
    p.add_argument("--max-train-steps", type=int, default=d.max_train_steps,
                   help=f"steps of one training job at most (default {d.max_train_steps})")
    p.set_defaults(func=cmd_serve)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed `easel serve` flags (checked: errors name the flag)."""
    d = Settings()
    for flag in ("port", "max_queue", "max_pixels", "max_steps", "max_batch", "max_body_mb", "max_input_pixels",
                 "max_memory", "max_train_steps"):
        if getattr(args, flag, None) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive (got {getattr(args, flag)})")
    s = Settings(host=args.host, port=args.port, model=args.model, dtype=args.dtype, device=args.device,
                 max_queue=args.max_queue, max_pixels=args.max_pixels, max_steps=args.max_steps,
                 max_batch=args.max_batch, max_body_bytes=int(args.max_body_mb * 2**20), api_auth=args.api_auth,
                 max_input_pixels=getattr(args, "max_input_pixels", None),
                 max_memory_bytes=int(args.max_memory * 2**30) if getattr(args, "max_memory", None) else None,
                 token=args.token, cors_origins=list(args.cors_origins), output_dir=args.output_dir,
                 train_root=getattr(args, "train_root", None),
                 max_train_steps=getattr(args, "max_train_steps", None) or d.max_train_steps)
    if s.train_root and not Path(s.train_root).expanduser().is_dir():
        raise ValueError(f"--train-root {s.train_root}: no such folder (give the folder whose sub-folders hold the "
                         "datasets)")
    s.credentials()  # raises on a malformed --api-auth before the server starts
    return s


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """easel serve: build the app and run uvicorn until interrupted."""
    from easel.serve.logs import setup_json_logging
    settings = settings_from_args(args)
    setup_json_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    serve(settings)
    return 0


def serve(settings: Settings) -> None:
    """Run the server in this thread (blocks); warns when it listens beyond this machine."""
    import uvicorn

    from easel.serve.app import create_app
    if not is_loopback(settings.host):
        protected = bool(settings.api_auth or settings.token)
        log.warning("listening on a non-loopback address: other machines can reach this server"
                    + ("" if protected else "; anyone who can reach it can use it (add --api-auth or --token)"),
                    extra={"event": "exposed", "host": settings.host, "auth": protected})
    app = create_app(settings)
    log.info("serving", extra={"event": "serving", "url": f"http://{settings.host}:{settings.port}",
                               "docs": f"http://{settings.host}:{settings.port}/docs", "model": settings.model})
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m easel.serve.cli [flags]`: the same as `easel serve [flags]`."""
    parser = argparse.ArgumentParser(prog="easel")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
