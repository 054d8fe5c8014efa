"""Startup time: from launching ``python -m app`` on the bundled models (modelport.toml) to the
service being ready, with one worker and with several. Ready: ``/health/ready`` answers 200 on
READY_IN_A_ROW fresh connections in a row (the kernel spreads new connections over the workers,
so that one worker ready while another still loads is not yet counted as ready).

    .venv/bin/python bench/startup.py                  # this checkout
    .venv/bin/python bench/startup.py --root OTHER     # another checkout, same interpreter
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
READY_IN_A_ROW = 8
LIMIT_S = 120.0


def _ready(url: str) -> bool:
    for _ in range(READY_IN_A_ROW):
        try:
            if httpx.get(url, timeout=2).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True


def seconds_to_ready(root: Path, workers: int) -> float:
    """One launch of the service in ``root`` with ``workers`` workers: seconds until ready."""
    port = 22000 + secrets.randbelow(1000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPORT_")}
    with tempfile.TemporaryDirectory() as store:
        env |= {"MODELPORT_STORE_DIR": store, "MODELPORT_GRPC_PORT": "0"}
        command = [sys.executable, "-m", "app", "--port", str(port), "--workers", str(workers)]
        started = time.monotonic()
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            url = f"http://127.0.0.1:{port}/health/ready"
            while not _ready(url):
                if process.poll() is not None or time.monotonic() - started > LIMIT_S:
                    raise SystemExit(f"the service in {root} did not become ready")
                time.sleep(0.05)
            return time.monotonic() - started
        finally:
            process.terminate()
            process.wait(30)


def run(root: Path = ROOT, workers: tuple[int, ...] = (1, 2), launches: int = 3) -> str:
    """The median seconds to ready over ``launches`` launches per worker count, as a table."""
    lines = [
        f"Bundled models (modelport.toml), median of {launches} launches.\n",
        "| workers | seconds to ready (median) | every launch |",
        "|--:|--:|---|",
    ]
    for count in workers:
        times = [seconds_to_ready(root, count) for _ in range(launches)]
        every = ", ".join(f"{t:.2f}" for t in times)
        lines.append(f"| {count} | {statistics.median(times):.2f} | {every} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to launch")
    parser.add_argument("--launches", type=int, default=3)
    args = parser.parse_args()
    print(run(args.root, launches=args.launches))


if __name__ == "__main__":
    main()
