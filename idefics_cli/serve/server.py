"""Running the server: socket, uvicorn, model loading and a graceful end.

Contract: `serve(config, loader)` checks the config (config.check: no non-loopback host without a key), binds
the socket itself (so `--port 0` picks a free port and the address is known at once), prints
`idefics serve: listening on http://HOST:PORT` then, once the model is loaded (`loader()` returns an engine),
`idefics serve: ready (MODEL)` on stderr, and serves until SIGTERM or SIGINT. Then it stops accepting
connections, lets in-flight requests finish for up to `config.grace` seconds, cancels what is left, and
returns 0. A model that fails to load ends the server with that error (raised as `IdeficsError`).
The prefix cache is sized here (--cache-mb, else config.default_cache_bytes) and the scheduler started.
"""

from __future__ import annotations

import socket
import sys

from ..errors import IdeficsError
from .app import ServerState, build_app
from .config import ServeConfig, check, default_cache_bytes


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


def _server_class(uvicorn):
    """uvicorn's Server, but a SIGTERM/SIGINT ends it with status 0 instead of being raised again afterwards."""
    import contextlib
    import signal
    import threading

    class Server(uvicorn.Server):
        on_signal = None

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if not self.should_exit and self.on_signal is not None:
                self.on_signal()
            super().handle_exit(sig, frame)

    return Server


def run_server(config: ServeConfig, loader, log=None) -> int:
    import uvicorn

    check(config)
    log = log or (lambda line: print(f"idefics serve: {line}", file=sys.stderr, flush=True))
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    state = ServerState(loader=loader)
    server: uvicorn.Server | None = None

    def ready(state: ServerState) -> None:
        from .cache import PrefixCache
        from .scheduler import Scheduler

        engine = state.engine
        size = int(config.cache_mb * 2**20) if config.cache_mb is not None else default_cache_bytes(engine.device)
        state.cache = PrefixCache(size)
        state.scheduler = Scheduler(engine, state.cache, config.max_batch, config.max_queue,
                                    on_end=state.metrics.ended if state.metrics else None)
        state.scheduler.start()
        log(f"ready ({state.model_id}; batch {config.max_batch}, queue {config.max_queue}, "
            f"prefix cache {size / 2**20:.0f} MiB)")

    def fatal(state: ServerState) -> None:
        if server is not None:
            server.should_exit = True

    state.on_ready, state.on_fatal = ready, fatal
    app = build_app(config, state)
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                        timeout_graceful_shutdown=config.grace, server_header=False)
    server = _server_class(uvicorn)(uv)
    server.on_signal = lambda: (setattr(state, "status", "stopping") if state.status == "ok" else None,
                                log("stopping: no new connections; finishing what is in flight"))
    log(f"listening on http://{shown}:{port} (loading the model…)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.error is not None:
        raise state.error
    log("stopped")
    return 0
