"""The launcher: ``python -m app [--host H] [--port P] [--config FILE] [--workers N]`` (which
``modelport serve`` runs)."""

from __future__ import annotations

import argparse
import sys

from fastapi import FastAPI

from app.config import Settings, load_service_config, load_settings
from app.errors import ConfigError
from app.observability.logs import configure_logging
from app.runner import supervisor as server


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

    return create_app(settings)


if __name__ == "__main__":
    raise SystemExit(main())
