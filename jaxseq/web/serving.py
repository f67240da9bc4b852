"""Serve a Starlette app with uvicorn on an address that the OS may pick (port 0), saying where."""

from __future__ import annotations

import signal
import socket
import sys
from typing import TextIO

import uvicorn
from starlette.applications import Starlette


def serve(app: Starlette, host: str, port: int, what: str, out: TextIO = sys.stdout) -> None:
    """Listen on ``host:port`` (port 0: one the OS picks), print ``"{what} serving on http://HOST:PORT"`` once
    the socket listens, and serve ``app`` until SIGINT or SIGTERM."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"can't listen on {host}:{port} ({error.strerror}): choose another --host or --port") from None
    # Listening before uvicorn starts: a request that comes while the app starts up waits instead of failing.
    sock.listen(128)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
    print(f"{what} serving on http://{shown}:{bound_port}", file=out, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    # uvicorn shuts down on SIGTERM, then raises it again for the handler it found: this one, so that a stop
    # asked for by SIGTERM ends the command normally (exit code 0), as it does for jaxseq-server.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
