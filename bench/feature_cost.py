"""What each shipped feature costs a request, in CPU microseconds, resolved finer than the
machine's noise: the server and a lean client share one process and one event loop (uvloop),
so that no scheduler, no second process and no load generator's share of the cores moves the
figure; a feature's cost is the difference in the process's CPU time per request between a
variant with it and one without (the client's share is the same in both). A variant runs in a
fresh process each round, the variants alternating, and each is read as its median.

Each variant is ``bench/features.py``'s (the access log, request ids, request metrics, the API
token checked), plus a second "every feature on" as a control: the difference between the two
identical ones is the method's noise. The access log goes to a file, as a container's stderr
goes to a pipe a collector reads.

    .venv/bin/python bench/feature_cost.py --rounds 5 --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from features import EVERY_FEATURE_ON, VARIANTS
from harness import ROOT, prepare

CONTROL = "every feature on, again"
CONNECTIONS = 64
_LENGTH = re.compile(rb"content-length: (\d+)", re.IGNORECASE)


class _Client(asyncio.Protocol):
    """One keep-alive connection sending ``request`` again as soon as each answer is whole,
    while ``left[0]`` requests remain to be sent."""

    def __init__(self, request: bytes, left: list[int], failed: list[int], done: asyncio.Event):
        self.request, self.left, self.failed, self.done = request, left, failed, done
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._send()

    def _send(self) -> None:
        if self.left[0] <= 0:
            self.done.set()
            return
        self.left[0] -= 1
        self.transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received += data
        end = self.received.find(b"\r\n\r\n")
        while end >= 0:
            length = _LENGTH.search(self.received, 0, end)
            whole = end + 4 + (int(length.group(1)) if length else 0)
            if len(self.received) < whole:
                return
            if not self.received.startswith(b"HTTP/1.1 200"):
                self.failed[0] += 1
            self.received = self.received[whole:]
            self._send()
            end = self.received.find(b"\r\n\r\n")


async def _drive(port: int, request: bytes, requests: int) -> tuple[float, int]:
    """CPU seconds of this process per request while ``requests`` are answered, and failures."""
    loop = asyncio.get_running_loop()
    left, failed, done = [requests], [0], asyncio.Event()
    connections = [
        await loop.create_connection(
            lambda: _Client(request, left, failed, done), "127.0.0.1", port
        )
        for _ in range(CONNECTIONS)
    ]
    started = time.process_time()
    await done.wait()
    await asyncio.sleep(0.05)  # the last answers in flight
    cost = (time.process_time() - started) / requests
    for transport, _ in connections:
        transport.close()
    return cost, failed[0]


async def _serve_and_drive(model: str, body: bytes, token: str | None, requests: int) -> dict:
    """The service made from this process's environment, on a free port, driven by the lean
    client: a warm-up, then the measured requests."""
    from app.config import Settings
    from app.http.app import create_app
    from app.runner.supervisor import server_for

    settings = Settings()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    listening = asyncio.Event()
    server = server_for(create_app(settings), settings, listening.set)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await listening.wait()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (
        f"POST /v1/models/{model}/predict HTTP/1.1\r\nHost: x\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    await _drive(port, request, requests // 4)  # warm: caches, the batcher's estimates
    cost, failed = await _drive(port, request, requests)
    server.should_exit = True
    await serving
    return {"us": cost * 1e6, "failed": failed}


def run_variant(directory: Path, name: str, model: str, requests: int) -> dict:
    """One variant in a fresh process: its CPU microseconds per request."""
    settings, checked = {v[0]: (v[1], v[2]) for v in [*VARIANTS, (CONTROL, {}, True)]}[name]
    token = secrets.token_hex(32) if checked else None
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPORT_")} | settings
    env |= {
        "MODELPORT_CONFIG": str(directory / "bench.toml"),
        "MODELPORT_STORE_DIR": str(directory / f"store-{secrets.token_hex(4)}"),
        "MODELPORT_GRPC_PORT": "0",
        "MODELPORT_TORCH_THREADS": "1",  # as each of the bench's two workers computes
    } | ({"MODELPORT_API_TOKEN": token} if token else {})
    command = [sys.executable, __file__, "--child", model, str(directory), str(requests)]
    with (directory / "stderr.log").open("ab") as log:
        done = subprocess.run(
            command, env=env | {"CHILD_TOKEN": token or ""}, stdout=subprocess.PIPE, stderr=log
        )
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}; see {directory / 'stderr.log'}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(model: str, rounds: int, requests: int) -> str:
    """Every variant ``rounds`` times, alternating; the report's table."""
    names = [EVERY_FEATURE_ON, CONTROL, *(v[0] for v in VARIANTS[1:])]
    costs: dict[str, list[float]] = {name: [] for name in names}
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        prepare(directory)
        for round_ in range(rounds):
            turn = round_ % len(names)
            for name in names[turn:] + names[:turn]:
                result = run_variant(directory, name, model, requests)
                costs[name].append(result["us"])
                failed += result["failed"]
    on = statistics.median(costs[EVERY_FEATURE_ON])
    lines = [
        f"`{model}`, native JSON door, {CONNECTIONS} connections, {requests:,} requests per run, "
        f"medians of {rounds} alternating runs; CPU of the one process (server and client) per "
        f"request. Failed requests: {failed}.\n",
        "| variant | CPU us / request | difference from every feature on | every run |",
        "|---|--:|--:|---|",
    ]
    for name in names:
        median = statistics.median(costs[name])
        runs = ", ".join(f"{cost:.1f}" for cost in costs[name])
        lines.append(f"| {name} | {median:.1f} | {median - on:+.1f} | {runs} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        model, directory, requests = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
        body = (directory / f"{model}.json").read_bytes()
        token = os.environ.pop("CHILD_TOKEN") or None
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        print(json.dumps(runner(_serve_and_drive(model, body, token, requests))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    print(measure(args.model, args.rounds, args.requests))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
