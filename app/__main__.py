"""The launcher: ``python -m app [--host H] [--port P] [--config FILE] [--workers N]`` (which
``modelport serve`` runs)."""

from __future__ import annotations

import argparse
import sys

from app.errors import ConfigError
from app.http.app import create_app, load_settings
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
        app = create_app(settings)  # fail fast with one line, before uvicorn starts
    except ConfigError as exc:
        print(f"modelport: config error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return server.run(settings, app)


if __name__ == "__main__":
    raise SystemExit(main())
