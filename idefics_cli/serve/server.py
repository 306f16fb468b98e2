"""Running the server: socket, uvicorn, model loading and a graceful end.

Contract: `run_server(config, loader)` checks the config, binds the socket itself (`--port 0` picks a free one),
logs `listening on http://HOST:PORT`, then `ready (MODEL)` once `loader()` returned the engine (prefix cache
sized, scheduler started), and serves until SIGTERM/SIGINT: in-flight requests get `config.grace` seconds, then
their jobs are cancelled (answered 503 `shutting_down`, FLUSH_S to go out) and it returns 0. A model that fails to
load is raised as its `IdeficsError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading

from ..errors import IdeficsError
from .app import ServerState, build_app
from .config import ServeConfig, check

FLUSH_S = 10.0  # after the grace: for the cancelled jobs' rows to leave the loop and their answers to go out


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise IdeficsError("usage", f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                           "choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(config: ServeConfig, loader, log=None) -> int:
    import uvicorn

    check(config)
    log = log or (lambda line: print(f"idefics serve: {line}", file=sys.stderr, flush=True))
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def fatal() -> None:  # the model failed to load (run by the lifespan, so `server` is set)
        server.should_exit = True

    state = ServerState(loader=loader, log=log, on_fatal=fatal)

    class Server(uvicorn.Server):
        """A SIGTERM/SIGINT ends it with status 0 (not raised again afterwards); signals only in the main thread."""

        @contextlib.contextmanager
        def capture_signals(self):
            main = threading.current_thread() is threading.main_thread()
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM) if main}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                state.status = "stopping" if state.status == "ok" else state.status
                log("stopping: no new connections; finishing what is in flight")
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            """uvicorn's, with the jobs still running at the end of the grace cancelled (each then answered)."""
            timer = asyncio.get_running_loop().call_later(config.grace, shed)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    def shed() -> None:
        if state.scheduler is not None:
            state.scheduler.stop(cancel=True, timeout=0)

    app = build_app(config, state)
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                        timeout_graceful_shutdown=config.grace + FLUSH_S, server_header=False)
    server = Server(uv)
    log(f"listening on http://{shown}:{port} (loading the model…)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.error is not None:
        raise state.error
    log("stopped")
    return 0
