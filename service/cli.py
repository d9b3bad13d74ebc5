"""The ``recalib`` console script: the core commands plus the service's.

    recalib demo                                   # the REST pipeline on a fresh service
    recalib demo --offline                         # the same recalibration in-process
    recalib recalibrate --model in.pt2 --data cal.npz --out out.pt2 [--report r.json]
    recalib export --model in.pt2 --out model.onnx --example data.npz
    recalib serve [--host 127.0.0.1] [--port 8000] [--grpc-port 8001] [--home DIR]

The core (``recalib.cli``, ``python -m recalib``) never imports the service; this module
builds on its parser (:func:`recalib.cli.build_parser`) and adds ``serve`` and the demo
through the REST API. ``python -m service`` runs the same command line.

Errors in the input end the program with exit code 2 and a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from recalib.cli import CliError, build_parser, demo_offline, run

__all__ = ["main"]

_DESCRIPTION = (
    "recalib: re-estimate the BatchNorm statistics of an exported model (.pt2 or .onnx) on "
    "unlabeled data from a new domain, export it to ONNX, or run the REST service. Errors in "
    "the input end the program with exit code 2 and a one-line reason on stderr."
)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.offline:
        return demo_offline(args)
    from .story import serve_with_story

    print("recalib demo: the whole pipeline through the REST API of a fresh service")
    try:
        serve_with_story(
            host=args.host,
            port=args.port,
            home=args.home,
            grpc_port=args.grpc_port,
            keep_running=not args.exit,
            out=print,
        )
    except RuntimeError as exc:
        raise CliError(str(exc)) from exc
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .main import PortInUse, serve

    try:
        serve(host=args.host, port=args.port, home=args.home, grpc_port=args.grpc_port)
    except ValidationError as exc:
        raise CliError(f"invalid service settings: {_settings_error(exc)}") from exc
    except PortInUse as exc:
        raise CliError(str(exc)) from exc
    return 0


def _settings_error(exc: Any) -> str:
    """A pydantic ``ValidationError`` in one line: ``field: reason; ...``."""
    parts = []
    for err in exc.errors():
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err.get("loc", ()))
        got = f" (got {err['input']!r})" if loc and "input" in err else ""
        parts.append(f"{loc}: {msg}{got}" if loc else msg)
    return "; ".join(parts).replace("\n", " ")


def _add_service_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--exit", action="store_true", help="stop the service after the story")
    demo.add_argument("--host", default=None, help="service host (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=None, help="service port (default 8000)")
    demo.add_argument(
        "--grpc-port", type=int, default=None, help="gRPC port (default: RECALIB_GRPC_PORT or 8001)"
    )
    demo.add_argument(
        "--home", default=None, help="service state directory (default: RECALIB_HOME or ./.recalib)"
    )
    demo.set_defaults(func=_cmd_demo)


def _parser() -> argparse.ArgumentParser:
    parser, sub = build_parser(description=_DESCRIPTION)
    _add_service_demo(sub.choices["demo"])
    serve = sub.add_parser(
        "serve",
        help="run the service (REST and v2 gRPC)",
        description="Run the service (REST on --port, v2 gRPC on --grpc-port) until "
        "interrupted. Settings come from the RECALIB_* environment; the options override "
        "host, ports and home.",
        formatter_class=parser.formatter_class,
    )
    serve.add_argument(
        "--host", default=None, help="interface to bind (default: RECALIB_HOST or 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, default=None, help="REST port (default: RECALIB_PORT or 8000)"
    )
    serve.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="v2 gRPC port (default: RECALIB_GRPC_PORT or 8001; RECALIB_GRPC=false: off)",
    )
    serve.add_argument(
        "--home", default=None, help="state directory (default: RECALIB_HOME or ./.recalib)"
    )
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``recalib`` console script: parse ``argv`` and run the command (exit code)."""
    return run(_parser().parse_args(argv))
