"""What the bench's scripts share: the server processes they start and measure (CPU and memory
read from /proc), and the load generators' runs (wrk for the REST doors, bench/grpc_load.py
for gRPC), each read into one :class:`Row`."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.bench import CNN, MLP, Tiny  # noqa: E402

MODELS = {"tiny": (Tiny, (10,)), "mlp": (MLP, (784,)), "cnn": (CNN, (3, 64, 64))}
CLK_TCK = os.sysconf("SC_CLK_TCK")
ERROR_KINDS = ("connect", "read", "write", "status", "timeout", "errors")
"""The error counts of a load generator's summary: wrk's kinds, and grpc_load's one."""


@dataclass
class Row:
    """One measured point."""

    model: str
    server: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    rss_mib: float
    """Peak RSS of the server's whole process tree."""
    cpu_cores: float
    per_worker_cpu: list[float] = field(default_factory=list)
    mean_batch: float | None = None
    client_cpu_s: float = 0.0
    """CPU seconds the load generator used during the run."""
    requests: int = 0
    worker_rss_mib: float = 0.0
    """Peak RSS of its largest serving process (the process itself when it serves alone)."""


# --- the models, their weights and bodies ----------------------------------------------------


def prepare(directory: Path) -> dict[str, dict[str, Path]]:
    """Seeded weights, the modelport config, and the request bodies."""
    rng = np.random.default_rng(0)
    files: dict[str, dict[str, Path]] = {}
    entries = []
    for seed, (name, (cls, shape)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        weights = directory / f"{name}.pth"
        torch.save(cls().state_dict(), weights)
        sample = rng.normal(size=(1, *shape)).astype(np.float32)
        body = directory / f"{name}.json"
        # four decimals, as a client would send them: ~6 KB for mlp, ~90 KB for cnn (float32
        # values would print with their binary tails and triple the body)
        body.write_text(json.dumps({"inputs": sample.astype(np.float64).round(4).tolist()}))
        raw = directory / f"{name}.bin"
        raw.write_bytes(sample.tobytes())
        files[name] = {"weights": weights, "json": body, "raw": raw}
        files[name] |= _v2_bodies(directory, name, sample)
        entries.append(
            f'[[models]]\nname = "{name}"\nclass = "bench-{name}"\nweights = "{weights}"\n'
        )
    (directory / "bench.toml").write_text("\n".join(entries))
    return files


def _v2_bodies(directory: Path, name: str, sample: np.ndarray) -> dict[str, Path]:
    """The same sample as Open Inference Protocol requests: JSON tensors (the same four
    decimals as the native JSON body), and the binary extension as tritonclient sends it."""
    tensor = {"name": "input", "shape": list(sample.shape), "datatype": "FP32"}
    values = sample.astype(np.float64).round(4).reshape(-1).tolist()
    as_json = directory / f"{name}.v2.json"
    as_json.write_text(json.dumps({"inputs": [tensor | {"data": values}]}))
    header = json.dumps(
        {
            "inputs": [tensor | {"parameters": {"binary_data_size": sample.nbytes}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    binary = directory / f"{name}.v2.bin"
    binary.write_bytes(header + sample.tobytes())
    return {"v2_json": as_json, "v2_binary": binary}


# --- processes --------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Every process's children, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    return children


def tree(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """``pid`` and its descendants (``children`` from :func:`_children`, else read now)."""
    children = _children() if children is None else children
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _is_tracker(pid: int) -> bool:
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) if match else 0
    return total / 1024


class Server:
    """A server process whose tree's CPU and memory can be read."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], ready_url: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    time.sleep(1)  # let every worker finish starting
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"{name} exited with {self.process.returncode}")
            time.sleep(0.2)
        raise SystemExit(f"{name} not ready after 120 s")

    def pids(self) -> list[int]:
        return tree(self.process.pid)

    def workers(self) -> list[int]:
        """The processes that serve: the tree's leaves but multiprocessing's resource tracker
        (the process itself when it serves alone)."""
        children = _children()
        leaves = [
            pid
            for pid in tree(self.process.pid, children)
            if not children.get(pid) and not _is_tracker(pid)
        ]
        return leaves or [self.process.pid]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


# --- load -------------------------------------------------------------------------------------


def run_wrk(
    server: Server, url: str, body: Path, concurrency: int, seconds: int, env: dict[str, str]
) -> Row:
    """One wrk run (one wrk thread drives every connection: on 2 cores, the least CPU taken
    from the servers)."""
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s"]
    command += ["-s", str(ROOT / "bench" / "post.lua"), url]
    return run_load(server, command, {**env, "BODY_FILE": str(body)}, concurrency)


def run_grpc(
    server: Server,
    target: str,
    name: str,
    raw: Path,
    concurrency: int,
    seconds: int,
    env: dict[str, str],
) -> Row:
    """One run of bench/grpc_load.py: ``ModelInfer`` with the raw sample, ``concurrency`` calls
    in flight (``env`` may hold the API token as ``TOKEN``)."""
    shape = ",".join(str(d) for d in (1, *MODELS[name][1]))
    command = [sys.executable, str(ROOT / "bench" / "grpc_load.py"), "--target", target]
    command += ["--model", name, "--shape", shape, "--body", str(raw)]
    command += ["--concurrency", str(concurrency), "--duration", str(seconds)]
    return run_load(server, command, env, concurrency)


def run_load(server: Server, command: list[str], env: dict[str, str], concurrency: int) -> Row:
    """Run a load generator that prints one ``WRK`` or ``GRPC`` JSON summary line; samples the
    server tree's memory while it lasts, and reads its CPU and the generator's."""
    workers = server.workers()
    cpu_before = {pid: _cpu_seconds(pid) for pid in server.pids()}
    peak = [0.0]
    worker_peaks = dict.fromkeys(workers, 0.0)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak[0] = max(peak[0], _rss_mib(server.pids()))
            for pid in workers:
                worker_peaks[pid] = max(worker_peaks[pid], _rss_mib([pid]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    done.set()
    sampler.join()
    line = next(x for x in result.stdout.splitlines() if x.startswith(("WRK ", "GRPC ")))
    stats = json.loads(line.split(" ", 1)[1])
    cpu = {pid: _cpu_seconds(pid) - cpu_before.get(pid, 0.0) for pid in server.pids()}
    # grpc_load reports its CPU during the run alone (Python's start would weigh on short
    # runs); wrk's is read from the kernel once it exits (a C program that starts at once)
    waited = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return Row(
        model="",
        server=server.name,
        concurrency=concurrency,
        rps=stats["requests"] / (stats["duration_us"] / 1e6),
        p50_ms=stats["p50_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        errors=sum(stats.get(kind, 0) for kind in ERROR_KINDS),
        rss_mib=peak[0],
        cpu_cores=sum(cpu.values()) / elapsed,
        per_worker_cpu=[cpu.get(pid, 0.0) / elapsed for pid in workers],
        client_cpu_s=stats.get("cpu_s", waited),
        requests=stats["requests"],
        worker_rss_mib=max(worker_peaks.values()),
    )
