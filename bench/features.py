"""What each shipped feature costs: modelport with every feature on (access log, request ids,
request metrics, the API token checked), with each one off alone, and with all of them off, at
64 connections on the native JSON door. One server per variant, all started at once and driven
in turn for several short rounds (the order rotating), compared by their medians: on these
machines a single run moves by ~10%, more than a feature costs.

    .venv/bin/python bench/features.py --models tiny,mlp --rounds 7 --duration 3
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness import Row, Server, prepare, run_wrk

JSON_ENV = {"CONTENT_TYPE": "application/json"}
EVERY_FEATURE_ON = "every feature on"
VARIANTS: tuple[tuple[str, dict[str, str], bool], ...] = (
    (EVERY_FEATURE_ON, {}, True),
    ("access log off", {"MODELPORT_ACCESS_LOG": "false"}, True),
    ("request ids off", {"MODELPORT_REQUEST_IDS": "false"}, True),
    ("request metrics off", {"MODELPORT_REQUEST_METRICS": "false"}, True),
    ("API token not checked", {}, False),
    (
        "every feature off",
        {
            "MODELPORT_ACCESS_LOG": "false",
            "MODELPORT_REQUEST_IDS": "false",
            "MODELPORT_REQUEST_METRICS": "false",
        },
        False,
    ),
)
"""Each variant: its name, its settings, and whether the API token is set (and sent)."""


@dataclass
class Variant:
    """One variant's server and what was measured of it."""

    name: str
    server: Server
    port: int
    token: str | None
    runs: list[Row]


def start(directory: Path, workers: int) -> list[Variant]:
    """A server for each variant, on its own port and store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPORT_")}
    variants = []
    for index, (name, settings, checked) in enumerate(VARIANTS):
        port = 21000 + 10 * index + secrets.randbelow(10)
        token = secrets.token_hex(32) if checked else None
        server_env = env | settings | {"MODELPORT_STORE_DIR": str(directory / f"store-{index}")}
        server_env |= {"MODELPORT_GRPC_PORT": "0"} | (
            {"MODELPORT_API_TOKEN": token} if token else {}
        )
        launch = [sys.executable, "-m", "app", "--port", str(port), "--workers", str(workers)]
        server = Server(
            name,
            [*launch, "--config", str(directory / "bench.toml")],
            server_env,
            f"http://127.0.0.1:{port}/health/ready",
        )
        variants.append(Variant(name, server, port, token, []))
    return variants


def measure(
    variants: list[Variant], body: Path, model: str, concurrency: int, rounds: int, seconds: int
) -> None:
    """``rounds`` runs of each variant, the order rotated every round."""
    for round_ in range(rounds):
        turn = round_ % len(variants)
        for variant in variants[turn:] + variants[:turn]:
            url = f"http://127.0.0.1:{variant.port}/v1/models/{model}/predict"
            wrk_env = JSON_ENV | ({"TOKEN": variant.token} if variant.token else {})
            variant.runs.append(run_wrk(variant.server, url, body, concurrency, seconds, wrk_env))


def render(by_model: dict[str, list[Variant]], concurrency: int, rounds: int, seconds: int) -> str:
    """Each variant's median req/s and server CPU per request, and what it gains over every
    feature on (a feature's cost, for the rows that switch one off)."""
    lines = [
        f"Native JSON door, {concurrency} connections, medians of {rounds} rotating runs of "
        f"{seconds} s per variant.\n",
        "| model | variant | req/s | server CPU us / request | req/s / every feature on | errors |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for model, variants in by_model.items():
        medians = {v.name: statistics.median(r.rps for r in v.runs) for v in variants}
        for variant in variants:
            cpu = statistics.median(1e6 * r.cpu_cores / r.rps for r in variant.runs if r.rps)
            errors = sum(r.errors for r in variant.runs)
            gain = medians[variant.name] / medians[EVERY_FEATURE_ON]
            lines.append(
                f"| {model} | {variant.name} | {medians[variant.name]:,.0f} | {cpu:.0f} "
                f"| {gain:.3f} | {errors} |"
            )
    return "\n".join(lines)


def run(
    directory: Path,
    models: list[str],
    workers: int,
    concurrency: int = 64,
    rounds: int = 7,
    seconds: int = 3,
) -> str:
    """Measure every variant on ``models`` (weights and bodies prepared in ``directory`` by
    :func:`harness.prepare`); the report's table."""
    variants = start(directory, workers)
    try:
        by_model = {}
        for model in models:
            for variant in variants:
                variant.runs = []
            body = directory / f"{model}.json"
            measure(variants, body, model, concurrency, rounds, seconds)
            by_model[model] = [Variant(v.name, v.server, v.port, v.token, v.runs) for v in variants]
        return render(by_model, concurrency, rounds, seconds)
    finally:
        for variant in variants:
            variant.server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,mlp")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=int, default=3, help="seconds per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp))
        report = run(
            Path(tmp),
            args.models.split(","),
            args.workers,
            args.concurrency,
            args.rounds,
            args.duration,
        )
    print(report)


if __name__ == "__main__":
    main()
