"""The launcher: ``python -m app [--host H] [--port P] [--config FILE] [--workers N]`` (which
``modelport serve`` runs)."""

from __future__ import annotations

import argparse
import os
import sys

from fastapi import FastAPI

from app.config import Settings, load_service_config, load_settings
from app.errors import ConfigError
from app.observability.logs import configure_logging
from app.runner import supervisor as server

OPENMP_SPIN = "1000"
"""``GOMP_SPINCOUNT`` of the processes this launches, unless the operator sets it: how long
(~10 us) torch's OpenMP threads spin waiting for the next parallel region before they sleep.
At libgomp's default (~3 ms) the second thread of a lone forward (app.serving.cores) kept
spinning after it, taking a core from the event loop and the client: mlp at concurrency 1 had a
p99 of 3-13 ms against 0.75-1.0 ms, on 2.0 server cores against 1.3, with the same p50."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve the models listed in the config file. Flags override MODELPORT_* env.",
    )
    parser.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--config", help="TOML file of served models")
    parser.add_argument("--workers", type=int, help="server processes (default 1)")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Check the settings and config, then serve them."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)  # read as torch loads, in this process
    flags = {name: value for name, value in vars(_parse_args(argv)).items() if value is not None}
    try:
        settings = load_settings(**flags)
        app = _checked_app(settings)  # fail fast with one line, before uvicorn starts
        configure_logging(settings.log_level, settings.log_format)
        return server.run(settings, app)
    except ConfigError as exc:  # from here, or from a worker
        print(f"modelport: config error: {exc.message}", file=sys.stderr)
        return 2


def _checked_app(settings: Settings) -> FastAPI | None:
    """The app, for a process that serves alone; with several workers, only the config file is
    read here: each worker checks the rest (classes, weights) as it makes its own app, and the
    supervisor keeps no torch (~230 MiB) for that check."""
    if settings.workers > 1:
        load_service_config(settings.config)
        return None
    from app.http.app import create_app  # imports torch
    from app.serving.allocator import tune_heap

    tune_heap()  # before any other thread of this process allocates
    return create_app(settings)


if __name__ == "__main__":
    raise SystemExit(main())
