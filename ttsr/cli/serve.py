"""``ttsr-serve``: a local web page (and HTTP API) to upscale images x4 with reference images.

ttsr-serve                                          # http://127.0.0.1:8000, the real model
ttsr-serve --model bicubic                          # the research-protocol model by default
ttsr-serve --port 8080 --checkpoint my.pt --max-memory 4GB
ttsr-serve --host 0.0.0.0 --max-upload-mb 10        # other machines too: there is no login!
curl -F lr=@photo.png -F ref=@other.jpg http://127.0.0.1:8000/api/upscale -o photo_x4.png
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys
from collections.abc import Callable
from contextlib import suppress
from functools import partial

from ttsr.checkpoints import TTSRWeights
from ttsr.cli import common
from ttsr.cli.common import positive_int
from ttsr.imaging import InputError
from ttsr.inference import Upscaler, shipped_model_names
from ttsr.memory import format_size

PROG = "ttsr-serve"


def port_number(text: str) -> int:
    """argparse type for ``--port`` (0: any free port)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return int(text)


def megabytes(text: str) -> float:
    """argparse type for ``--max-upload-mb``."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of megabytes, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ttsr.server.app import (
        DEFAULT_MAX_ALBUM,
        DEFAULT_MAX_QUEUE,
        DEFAULT_MAX_REFERENCES,
        DEFAULT_MAX_UPLOAD_MB,
    )

    parser = common.command_parser(
        PROG,
        "Serve a web page where you pick or drop a low-resolution image and "
        "reference images, and get the x4 result with a before/after slider, the attention and "
        "correspondence maps and a PNG download; POST /api/upscale does the same for programs "
        "(reference at /docs). Everything runs on this machine, assets included (no CDN).",
        __doc__,
        epilog="doc",
    )
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only); 0.0.0.0 opens it to "
        "the network, without any authentication",
    )
    server.add_argument(
        "--port", type=port_number, default=8000, help="port (default: 8000; 0: any free port)"
    )
    server.add_argument(
        "--max-upload-mb",
        type=megabytes,
        default=DEFAULT_MAX_UPLOAD_MB,
        metavar="MB",
        help=f"largest image file accepted, in MiB (default: {DEFAULT_MAX_UPLOAD_MB})",
    )
    server.add_argument(
        "--max-references",
        type=positive_int,
        default=DEFAULT_MAX_REFERENCES,
        metavar="N",
        help=f"most reference images per request (default: {DEFAULT_MAX_REFERENCES})",
    )
    server.add_argument(
        "--max-album",
        type=positive_int,
        default=DEFAULT_MAX_ALBUM,
        metavar="N",
        help="most album photos per request, for ttsr to choose the references from "
        f"(default: {DEFAULT_MAX_ALBUM})",
    )
    server.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help="requests that may wait while one is upscaled (one runs at a time); more are "
        f"refused with 429 (default: {DEFAULT_MAX_QUEUE})",
    )
    common.add_model_arguments(parser)
    return parser


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (so that a busy port is reported before serving)."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, protocol)
    except OSError as error:
        raise InputError(f"cannot listen on {host}: {error.strerror or error}") from error
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as error:
        listener.close()
        hint = "; choose another --port" if error.errno == errno.EADDRINUSE else ""
        reason = error.strerror or error
        raise InputError(f"cannot listen on {host}:{port}: {reason}{hint}") from error
    return listener


def is_loopback(listener: socket.socket) -> bool:
    return ipaddress.ip_address(listener.getsockname()[0]).is_loopback


def offered_models(
    args: argparse.Namespace, upscaler: Upscaler
) -> dict[str, Upscaler | Callable[[], Upscaler]]:
    """The models the page offers: ``upscaler`` first; with a shipped model, the other shipped
    models whose files are installed too (each loaded when first chosen)."""
    models: dict[str, Upscaler | Callable[[], Upscaler]] = {upscaler.model_name: upscaler}
    if args.checkpoint:
        return models
    for name in shipped_model_names():
        if name not in models and TTSRWeights.get(name).path.is_file():
            models[name] = partial(
                Upscaler.from_checkpoint,
                name,
                device=args.device,
                max_memory=args.max_memory,
                tile_size=args.tile,
                reference_alignment=args.align_ref,
                precision=args.precision,
            )
    return models


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import uvicorn

    from ttsr.server.app import LOOPBACK_NAMES, MB, ServerSettings, create_app

    if args.max_queue < 0:
        raise InputError(f"--max-queue must be 0 or more, got {args.max_queue}")
    upscaler = common.build_upscaler(args)  # the default model now: a missing file stops here
    models = offered_models(args, upscaler)
    listener = listening_socket(args.host, args.port)
    loopback = is_loopback(listener)
    settings = ServerSettings(
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_references=args.max_references,
        max_album=args.max_album,
        max_queue=args.max_queue,
        allowed_hosts=(*LOOPBACK_NAMES, args.host.lower()) if loopback else None,
    )
    app = create_app(models, settings=settings)
    address, port = listener.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    others = "; the page also offers " + ", ".join(list(models)[1:]) if len(models) > 1 else ""
    print(
        f"{PROG}: serving http://{shown}:{port}/ ({common.describe_model(upscaler)} on "
        f"{upscaler.device} in {upscaler.precision}{others}, memory budget "
        f"{format_size(upscaler.max_memory)} per "
        "image); press Ctrl+C to stop",
        file=sys.stderr,
    )
    if not loopback:
        print(
            f"{PROG}: warning: listening on {address}: anyone who can reach this machine can use "
            "it (there is no authentication)",
            file=sys.stderr,
        )
    config = uvicorn.Config(app, log_level="debug" if args.debug else "info")
    with suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl+C after its graceful shutdown
        uvicorn.Server(config).run(sockets=[listener])
    print(f"{PROG}: stopped", file=sys.stderr)
    return common.EXIT_OK


main = common.cli_main(PROG, build_parser, run)


if __name__ == "__main__":
    sys.exit(main())
