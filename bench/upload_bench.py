"""Deploying large weights: the server's memory and the other models' latency during an upload.

Serves a large ``nn.Linear(N, N)`` (``torch.nn:Linear`` with a register table; N=8192: a 268 MB
state_dict) beside the small ``linear``, in a real server process on 127.0.0.1 (``python -m
app``), with weights generated here in a temporary folder. Measures the server tree's RSS
(VmRSS of every process, sampled every ~20 ms) before, at its peak during and after each
upload of new weights for the large model, the upload's status and time, and predict latency
on ``linear`` from one steady keep-alive client: alone, then while uploads run (only the
requests sent while an upload was in flight count). Prints a markdown table.

    .venv/bin/python bench/upload_bench.py            # ~1 minute on 2 cores
    .venv/bin/python bench/upload_bench.py --size 4096 --uploads 1 --out upload.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from harness import tree

ROOT = Path(__file__).resolve().parent.parent
SMALL = "linear"
LARGE = "big"
SAMPLE_S = 0.02
"""How often the server tree's RSS is read."""
BODY = json.dumps({"inputs": [[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0]]}).encode()


# --- the server's memory -------------------------------------------------------------------


def _memory_mib(pids: Sequence[int]) -> tuple[float, float, float]:
    """VmRSS, RssAnon and RssFile of ``pids`` together, in MiB."""
    totals = [0, 0, 0]
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for index, key in enumerate(("VmRSS", "RssAnon", "RssFile")):
            match = re.search(rf"{key}:\s+(\d+) kB", status)
            totals[index] += int(match.group(1)) if match else 0
    rss, anon, file = (kib / 1024 for kib in totals)
    return rss, anon, file


class MemorySampler:
    """Reads the server tree's RSS every SAMPLE_S seconds on a thread of its own; ``peak()``
    gives the highest reading since the last ``reset()``."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._pids = tree(pid)
        self._lock = threading.Lock()
        self._peak = (0.0, 0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(SAMPLE_S):
            if time.monotonic() - refreshed > 1.0:  # a worker replaced meanwhile
                self._pids, refreshed = tree(self._pid), time.monotonic()
            reading = _memory_mib(self._pids)
            with self._lock:
                if reading[0] > self._peak[0]:
                    self._peak = reading

    def now(self) -> tuple[float, float, float]:
        """The tree's memory at this moment."""
        return _memory_mib(tree(self._pid))

    def reset(self) -> None:
        with self._lock:
            self._peak = (0.0, 0.0, 0.0)

    def peak(self) -> tuple[float, float, float]:
        with self._lock:
            return self._peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- the predict client ------------------------------------------------------------------------


@dataclass
class Latencies:
    """Predict latencies (ms) by the time each request was sent (monotonic seconds)."""

    sent: list[float] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    errors: int = 0

    def between(self, start: float, end: float) -> list[float]:
        return [ms for sent, ms in zip(self.sent, self.ms, strict=True) if start <= sent <= end]


async def _predict_loop(port: int, stop: threading.Event, out: Latencies) -> None:
    """One keep-alive connection sending predict requests back to back (a light raw HTTP/1.1
    client: it shares the cores with the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"POST /v1/models/{SMALL}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    try:
        while not stop.is_set():
            sent = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            out.sent.append(sent)
            out.ms.append((time.monotonic() - sent) * 1000)
            if not head.startswith(b"HTTP/1.1 200"):
                out.errors += 1
    finally:
        writer.close()


class PredictClient:
    """The steady predict loop, on a thread of its own until ``stop()``."""

    def __init__(self, port: int) -> None:
        self.latencies = Latencies()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(_predict_loop(port, self._stop, self.latencies)),
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> Latencies:
        self._stop.set()
        self._thread.join(30)
        return self.latencies


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Upload:
    """One upload and what the server did meanwhile."""

    status: int
    seconds: float
    rss_before: float
    rss_peak: float
    anon_peak: float
    file_peak: float
    rss_after: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    received_s: float
    """Seconds until the server had the whole body (then validation, storing, activation)."""
    p99_receiving_ms: float
    p99_after_ms: float


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prepare(directory: Path, size: int, uploads: int) -> tuple[Path, list[Path]]:
    """The weights (seeded, generated here), the config, and the files to upload."""
    torch.manual_seed(0)
    small = directory / "linear.pth"
    torch.save({"linear.weight": torch.randn(2, 10), "linear.bias": torch.randn(2)}, small)
    files = []
    for index in range(uploads + 1):
        path = directory / f"big{index}.pth"
        torch.save({"weight": torch.randn(size, size) / size, "bias": torch.zeros(size)}, path)
        files.append(path)
    config = directory / "upload_bench.toml"
    config.write_text(
        f'[[models]]\nname = "{SMALL}"\nclass = "linear"\nweights = "{small}"\n\n'
        f'[[models]]\nname = "{LARGE}"\nclass = "torch.nn:Linear"\nweights = "{files[0]}"\n'
        f"kwargs = {{ in_features = {size}, out_features = {size} }}\n"
        f'register = {{ input_shape = [{size}], input_dtype = "float32" }}\n'
    )
    return config, files[1:]


def start_server(
    directory: Path, config: Path, port: int, token: str, workers: int
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPORT_")}
    env |= {
        "MODELPORT_STORE_DIR": str(directory / "store"),
        "MODELPORT_ADMIN_TOKEN": token,
        "MODELPORT_GRPC_PORT": "0",
    }
    log = (directory / "server.log").open("wb")
    command = [sys.executable, "-m", "app", "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(
        [*command, "--config", str(config)], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (directory / "server.log").read_text()[-2000:]
            raise SystemExit(f"the server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit("the server was not ready after 60 s")


def upload(port: int, token: str, path: Path, incoming: Path) -> tuple[int, float, float]:
    """PUT the file as a raw body; its status, seconds, and seconds until the server had
    received the whole body (its staged file in ``incoming`` at full size; NaN if not seen).
    With curl when there is one: a Python uploader in this process would take the GIL from the
    predict client measuring."""
    url = f"http://127.0.0.1:{port}/v1/models/{LARGE}/weights"
    size = path.stat().st_size
    started = time.monotonic()
    received = float("nan")
    if shutil.which("curl"):
        command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", str(path)]
        command += ["-H", f"Authorization: Bearer {token}", "--max-time", "120", url]
        command += ["-H", "Content-Type: application/octet-stream"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        while process.poll() is None:
            if math.isnan(received):
                with contextlib.suppress(OSError):
                    if any(p.stat().st_size >= size for p in incoming.glob("*.part")):
                        received = time.monotonic() - started
            time.sleep(0.01)
        status = process.communicate()[0]
        return int(status or 0), time.monotonic() - started, received
    with path.open("rb") as body:
        answer = httpx.put(
            url,
            content=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size),
            },
            timeout=120,
        )
    return answer.status_code, time.monotonic() - started, received


def measure(
    port: int,
    token: str,
    sampler: MemorySampler,
    files: list[Path],
    idle_s: float,
    incoming: Path,
) -> tuple[list[float], int, list[Upload], float]:
    """The predict loop alone for ``idle_s``, then each upload with the loop running: the
    latencies alone (ms), the failed predicts, each upload, and the RSS with no upload."""
    client = PredictClient(port)
    time.sleep(0.5)  # warm: the connection and the first forwards
    idle_start = time.monotonic()
    time.sleep(idle_s)
    idle_end = time.monotonic()
    idle_rss = sampler.now()[0]
    results = []
    for path in files:
        time.sleep(1.0)  # the previous upload's memory settled
        before = sampler.now()[0]
        sampler.reset()
        started = time.monotonic()
        status, seconds, received = upload(port, token, path, incoming)
        ended = time.monotonic()
        rss, anon, file = sampler.peak()
        time.sleep(1.0)
        during = client.latencies.between(started, ended)
        receiving = client.latencies.between(started, started + received)
        after = client.latencies.between(started + received, ended)
        results.append(
            Upload(
                status,
                seconds,
                before,
                rss,
                anon,
                file,
                sampler.now()[0],
                statistics.median(during) if during else float("nan"),
                _percentile(during, 0.99),
                max(during, default=float("nan")),
                len(during),
                received,
                _percentile(receiving, 0.99),
                _percentile(after, 0.99),
            )
        )
    latencies = client.stop()
    return latencies.between(idle_start, idle_end), latencies.errors, results, idle_rss


def render(
    args: argparse.Namespace, idle: list[float], errors: int, uploads: list[Upload], rss: float
) -> str:
    size = args.size
    param_mib = (size * size + size) * 4 / 2**20
    lines = [
        "# modelport: deploying large weights",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "",
        f"Command: `.venv/bin/python bench/upload_bench.py --size {size} --uploads "
        f"{args.uploads} --idle {args.idle} --workers {args.workers}`. `{LARGE}`: nn.Linear("
        f"{size}, {size}), {param_mib:,.0f} MiB of parameters, torch.save files uploaded raw "
        f"(PUT, activate); `{SMALL}`: nn.Linear(10, 2), predicted by one keep-alive client "
        f"back to back (JSON, one sample). RSS: VmRSS of the server's process tree, sampled "
        f"every {SAMPLE_S * 1000:.0f} ms; growth = peak during the upload - before it, in "
        f"units of the model's parameter size. Latency during an upload: the requests sent "
        f"while it was in flight.",
        "",
        "| phase | status | upload s (body received) | RSS before MiB | peak MiB (anon + file) "
        "| growth | after MiB | predict p50 ms | p99 ms (receiving / after) | max ms | requests |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        f"| no upload | - | - | {rss:,.0f} | - | - | - | {statistics.median(idle):.2f} | "
        f"{_percentile(idle, 0.99):.2f} | {max(idle):.2f} | {len(idle)} |",
    ]
    for index, u in enumerate(uploads, 1):
        growth = (u.rss_peak - u.rss_before) / param_mib
        lines.append(
            f"| upload {index} | {u.status} | {u.seconds:.2f} ({u.received_s:.2f}) | "
            f"{u.rss_before:,.0f} | {u.rss_peak:,.0f} ({u.anon_peak:,.0f} + {u.file_peak:,.0f}) "
            f"| {growth:.2f}x | {u.rss_after:,.0f} | {u.p50_ms:.2f} | {u.p99_ms:.2f} "
            f"({u.p99_receiving_ms:.2f} / {u.p99_after_ms:.2f}) | {u.max_ms:.2f} | "
            f"{u.requests} |"
        )
    if errors:
        lines.append(f"\n{errors} predict request(s) failed.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark; print the report, write it to ``--out`` if given, and return it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="the large Linear's features")
    parser.add_argument("--uploads", type=int, default=2, help="uploads of new weights")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of predict alone")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, help="where to write the markdown report")
    args = parser.parse_args(argv)
    token = secrets.token_urlsafe(32)
    port = 21000 + secrets.randbelow(1000)
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        directory = Path(tmp)
        config, files = prepare(directory, args.size, args.uploads)
        server = start_server(directory, config, port, token, args.workers)
        try:
            sampler = MemorySampler(server.pid)
            try:
                incoming = directory / "store" / LARGE / "incoming"
                idle, errors, uploads, rss = measure(
                    port, token, sampler, files, args.idle, incoming
                )
            finally:
                sampler.stop()
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    report = render(args, idle, errors, uploads, rss)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return report


if __name__ == "__main__":
    main()
