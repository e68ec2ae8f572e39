"""Running the station: uvicorn in this process, in the foreground (the
``serve`` command) or on a thread (tests and benchmarks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from controller.station.app import LOOPBACK, Tokens, create_app

__all__ = ["make_server", "running_station"]


def make_server(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8750,
    token: str | None = None,
    tokens: Tokens | None = None,
) -> uvicorn.Server:
    """A uvicorn server of the station over `root` (`token`: one shared token;
    `tokens`: shared and / or per-reviewer tokens)."""
    tokens = tokens or Tokens(shared=token)
    if host not in LOOPBACK and not tokens:
        raise ValueError(f"serving on {host} needs a token (--token-file)")
    config = uvicorn.Config(
        create_app(root, tokens=tokens, host=host),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # live pages hold their event streams open: do not wait for them
        timeout_graceful_shutdown=1,
        lifespan="off",
    )
    return uvicorn.Server(config)


@contextmanager
def running_station(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    tokens: Tokens | None = None,
) -> Iterator[str]:
    """The station on a thread; yields its base URL (port 0: a free port)."""
    server = make_server(root, host=host, port=port, token=token, tokens=tokens)
    thread = threading.Thread(target=server.run, name="ctcscan-station", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the station did not start")
        time.sleep(0.02)
    sock = server.servers[0].sockets[0]
    bound = sock.getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
