"""Benchmark modelport against the tutorial FastAPI baseline and the in-process limit.

Starts both servers as real processes on 127.0.0.1, drives them with wrk (an external load
generator, not a Python client competing for the cores) and modelport's gRPC door with
bench/grpc_load.py (one bounded Python process; its CPU is reported beside wrk's), and measures
the same models' forward with no HTTP. Prints a table and writes it, with the machine's
description, to --out.

    make bench            # or: .venv/bin/python bench/run.py --duration 10
    # the front doors alone, on chosen models (no tutorial server, A/B rounds or in-process limit)
    .venv/bin/python bench/run.py --only-doors --models cnn,mlp --concurrency 1,64 --duration 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.observability.metrics import FLUSH_S  # noqa: E402
from models.bench import CNN, MLP, Tiny  # noqa: E402

MODELS = {"tiny": (Tiny, (10,)), "mlp": (MLP, (784,)), "cnn": (CNN, (3, 64, 64))}
CLK_TCK = os.sysconf("SC_CLK_TCK")
JSON_ENV = {"CONTENT_TYPE": "application/json"}
GRPC = "modelport (gRPC)"
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
    cpu_cores: float
    per_worker_cpu: list[float] = field(default_factory=list)
    mean_batch: float | None = None
    client_cpu_s: float = 0.0
    """CPU seconds the load generator used during the run."""
    requests: int = 0


# --- processes --------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for child in _children(pid):
        pids += _tree(child)
    return pids


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
        return _tree(self.process.pid)

    def workers(self) -> list[int]:
        """The processes that serve: the tree's leaves but multiprocessing's resource tracker
        (the process itself when it serves alone)."""
        leaves = [pid for pid in self.pids() if not _children(pid) and not _is_tracker(pid)]
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
    server: Server, target: str, name: str, raw: Path, concurrency: int, seconds: int
) -> Row:
    """One run of bench/grpc_load.py: ``ModelInfer`` with the raw sample, ``concurrency`` calls
    in flight."""
    shape = ",".join(str(d) for d in (1, *MODELS[name][1]))
    command = [sys.executable, str(ROOT / "bench" / "grpc_load.py"), "--target", target]
    command += ["--model", name, "--shape", shape, "--body", str(raw)]
    command += ["--concurrency", str(concurrency), "--duration", str(seconds)]
    return run_load(server, command, {}, concurrency)


def run_load(server: Server, command: list[str], env: dict[str, str], concurrency: int) -> Row:
    """Run a load generator that prints one ``WRK`` or ``GRPC`` JSON summary line; samples the
    server tree's memory while it lasts, and reads its CPU and the generator's."""
    workers = server.workers()
    cpu_before = {pid: _cpu_seconds(pid) for pid in server.pids()}
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peak[0] = max(peak[0], _rss_mib(server.pids()))

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
    )


# --- in-process limit -------------------------------------------------------------------------


def _forward_loop(
    name: str, weights: str, batch: int, seconds: float, threads: int, out: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(threads)
    cls, shape = MODELS[name]
    model = cls()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    x = torch.randn(batch, *shape)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        count, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            model(x)
            count += batch
    out.put(count / seconds)


def in_process(
    name: str, weights: Path, batch: int, processes: int, threads: int, seconds: float = 3.0
) -> float:
    """Samples/s of ``processes`` concurrent forward loops: the server's compute ceiling."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [
        context.Process(
            target=_forward_loop, args=(name, str(weights), batch, seconds, threads, out)
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    total = sum(out.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total


# --- the run ----------------------------------------------------------------------------------


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


def protocols(name: str, files: dict[str, Path]) -> list[tuple[str, str, Path, dict[str, str]]]:
    """Each front door measured: its label, path, body and wrk environment."""
    shape = ",".join(str(d) for d in (1, *MODELS[name][1]))
    native, v2 = f"/v1/models/{name}/predict", f"/v2/models/{name}/infer"
    header_length = files["v2_binary"].stat().st_size - files["raw"].stat().st_size
    octets = "application/octet-stream"
    return [
        ("modelport", native, files["json"], JSON_ENV),
        (
            "modelport (binary)",
            native,
            files["raw"],
            # binary both ways, as the V2 binary requests ask (binary_data on the output)
            {"CONTENT_TYPE": octets, "ACCEPT": octets, "TENSOR_SHAPE": shape}
            | {"TENSOR_DTYPE": "float32"},
        ),
        ("modelport (V2 JSON)", v2, files["v2_json"], JSON_ENV),
        (
            "modelport (V2 binary)",
            v2,
            files["v2_binary"],
            {"CONTENT_TYPE": octets, "HEADER_LENGTH": str(header_length)},
        ),
    ]


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def batch_totals(base_url: str, model: str) -> tuple[float, float]:
    """The (sum, count) of modelport's batch size histogram for ``model``, whole service."""
    time.sleep(FLUSH_S)  # until every worker has written what it counted
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values = {}
    for kind in ("sum", "count"):
        match = re.search(rf'^modelport_batch_size_{kind}{{model="{model}"}} (\S+)$', text, re.M)
        values[kind] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def table(rows: list[Row]) -> str:
    lines = [
        "| model | server | conc | req/s | p50 ms | p99 ms | errors | peak RSS MiB | server CPU "
        "| mean batch | client CPU s / 1k req |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        spread = (
            " (" + " + ".join(f"{c:.2f}" for c in r.per_worker_cpu) + ")"
            if len(r.per_worker_cpu) > 1
            else ""
        )
        lines.append(
            f"| {r.model} | {r.server} | {r.concurrency} | {r.rps:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p99_ms:.2f} | {r.errors} | {r.rss_mib:,.0f} | {r.cpu_cores:.2f}{spread} | "
            + ("-" if r.mean_batch is None else f"{r.mean_batch:.1f}")
            + (f" | {1000 * r.client_cpu_s / r.requests:.2f} |" if r.requests else " | - |")
        )
    return "\n".join(lines)


def _mean_batch(base_url: str, model: str, before: tuple[float, float] | None) -> float | None:
    if before is None:
        return None
    total, count = batch_totals(base_url, model)
    return (total - before[0]) / (count - before[1]) if count > before[1] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--models", default="tiny,mlp,cnn")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--only-doors",
        action="store_true",
        help="modelport's front doors alone: no A/B rounds, tutorial server or in-process limit",
    )
    parser.add_argument(
        "--out", type=Path, help="where to write the report (bench/results.md for a full run)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    names = args.models.split(",")
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        files = prepare(directory)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPORT_")}
        ours_port, base_port = 18000 + secrets.randbelow(1000), 19000 + secrets.randbelow(1000)
        grpc_target = f"127.0.0.1:{20000 + secrets.randbelow(1000)}"
        # as shipped: access log, request ids and metrics on (the log goes to /dev/null)
        ours_env = env | {
            "MODELPORT_STORE_DIR": str(directory / "store"),
            "MODELPORT_GRPC_PORT": grpc_target.rsplit(":", 1)[1],
        }
        rows: list[Row] = []
        pairs: dict[tuple[str, int], float] = {}

        def base(label: str) -> str:
            return f"http://127.0.0.1:{ours_port if label == 'modelport' else base_port}"

        launch = [python, "-m", "app", "--port", str(ours_port), "--workers", str(args.workers)]
        ours = Server(
            "modelport",
            [*launch, "--config", str(directory / "bench.toml")],
            ours_env,
            f"http://127.0.0.1:{ours_port}/health/ready",
        )
        try:
            for name in names:
                for point, concurrency in enumerate(concurrencies):
                    doors = protocols(name, files[name])
                    url, seconds = base("modelport"), args.duration
                    runs: list[tuple[str, Callable[[], Row]]] = [
                        (label, partial(run_wrk, ours, url + path, body, concurrency, seconds, wrk))
                        for label, path, body, wrk in doors
                    ]
                    raw = files[name]["raw"]
                    grpc = partial(run_grpc, ours, grpc_target, name, raw, concurrency, seconds)
                    runs.append((GRPC, grpc))
                    # the front doors one after another at each point, in turn first and last
                    for label, measure in runs[:: -1 if point % 2 else 1]:
                        before = batch_totals(base("modelport"), name)
                        row = measure()
                        row.model, row.server = name, label
                        row.mean_batch = _mean_batch(base("modelport"), name, before)
                        rows.append(row)
                        print(table([row]).splitlines()[-1], flush=True)
                    if not args.only_doors:
                        binary_doors = [door for door in doors if door[0].endswith("binary)")]
                        pairs[name, concurrency] = alternate(
                            ours, base("modelport"), binary_doors, concurrency
                        )
        finally:
            ours.stop()
        if args.only_doors:
            report = render_doors(rows, args, threads)
            print(report)
            if args.out is not None:
                args.out.write_text(report)
            return
        tutorial = Server(
            "tutorial",
            [python, "bench/tutorial_server.py", tmp, str(base_port)],
            env,
            f"http://127.0.0.1:{base_port}/openapi.json",
        )
        try:
            for name in names:
                for concurrency in concurrencies:
                    url = f"{base('tutorial')}/predict/{name}"
                    json_body = files[name]["json"]
                    row = run_wrk(tutorial, url, json_body, concurrency, args.duration, JSON_ENV)
                    row.model = name
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
        finally:
            tutorial.stop()
        # batch 1, the batch sizes the batcher reached under load, and a few for reference
        limits = {
            name: {
                batch: in_process(name, files[name]["weights"], batch, args.workers, threads)
                for batch in sorted(
                    {1, 8, 32}
                    | {round(r.mean_batch) for r in rows if r.model == name and r.mean_batch}
                )
            }
            for name in names
        }
    report = render(rows, pairs, limits, args, threads)
    print(report)
    (args.out or ROOT / "bench" / "results.md").write_text(report)


AB_ROUNDS, AB_SECONDS = 7, 2


def alternate(
    server: Server,
    base_url: str,
    doors: list[tuple[str, str, Path, dict[str, str]]],
    concurrency: int,
) -> float:
    """V2 binary / native binary req/s from AB_ROUNDS short runs of each, the order swapped
    every round, compared by their medians: on this machine a single run of a point moves
    about 10%, and the door measured second tends to lose."""
    measured: dict[str, list[float]] = {label: [] for label, *_ in doors}
    for round_ in range(AB_ROUNDS):
        for label, path, body, wrk_env in doors[:: -1 if round_ % 2 else 1]:
            row = run_wrk(server, f"{base_url}{path}", body, concurrency, AB_SECONDS, wrk_env)
            measured[label].append(row.rps)
    native, v2 = (statistics.median(measured[label]) for label, *_ in doors)
    return v2 / native


DOORS = (
    ("native JSON", "modelport"),
    ("V2 JSON", "modelport (V2 JSON)"),
    ("native binary", "modelport (binary)"),
    ("V2 binary", "modelport (V2 binary)"),
    ("gRPC", GRPC),
)
"""The front doors of the side-by-side table: their titles and row labels."""


def front_doors(rows: list[Row], pairs: dict[tuple[str, int], float]) -> str:
    """Each door's req/s and p99 per model and concurrency, V2 against native in each form,
    and gRPC against V2 binary."""
    by_point = {(r.model, r.concurrency, r.server): r for r in rows}
    lines = [
        "| model | conc | "
        + " | ".join(title for title, _ in DOORS)
        + " | V2 / native JSON | V2 / native binary "
        f"| same, medians of {AB_ROUNDS} alternating {AB_SECONDS} s runs | gRPC / V2 binary |",
        "|---|--:|" + "--:|" * (len(DOORS) + 4),
    ]
    for model, concurrency in dict.fromkeys((r.model, r.concurrency) for r in rows):
        point = [by_point.get((model, concurrency, label)) for _, label in DOORS]
        if None in point:
            continue
        native_json, v2_json, native_binary, v2_binary, grpc = (r.rps for r in point if r)
        pair = pairs.get((model, concurrency))
        lines.append(
            f"| {model} | {concurrency} | "
            + " | ".join(f"{r.rps:,.0f} ({r.p99_ms:.1f})" for r in point if r)
            + f" | {v2_json / native_json:.2f} | {v2_binary / native_binary:.2f} | "
            + ("-" if pair is None else f"{pair:.2f}")
            + f" | {grpc / v2_binary:.2f} |"
        )
    return "\n".join(lines)


def preamble(args: argparse.Namespace, threads: int) -> str:
    """The report's title, machine, command and what its rows are."""
    only = " --only-doors" if args.only_doors else ""
    return (
        f"# modelport benchmark\n\nMachine: {machine()}\n\n"
        f"Command: `.venv/bin/python bench/run.py{only} --duration {args.duration} --concurrency "
        f"{args.concurrency} --models {args.models} --workers {args.workers}`; modelport with "
        f"{args.workers} worker processes x {threads} torch thread(s), batching on (defaults); "
        f"tutorial: 1 uvicorn worker, default settings. One sample per request. Server CPU is "
        f"in cores (per worker in brackets). modelport's rows, on the same server: native JSON "
        f"in and out (`modelport`); raw float32 bytes in and out (`binary`); the Open Inference "
        f"Protocol's JSON tensors (`V2 JSON`) and binary tensor extension in and out "
        f"(`V2 binary`), driven by wrk; the protocol's gRPC `ModelInfer` with raw contents in "
        f"and out (`gRPC`), driven by bench/grpc_load.py (Python, one process, a connection per "
        f"call in flight as wrk has). Client CPU: the load generator's CPU seconds per 1,000 "
        f"requests (wrk's or grpc_load's), taken from the same 2 cores as the server's.\n\n"
    )


def render_doors(rows: list[Row], args: argparse.Namespace, threads: int) -> str:
    """The report of ``--only-doors``: every run, and the doors side by side."""
    return (
        f"{preamble(args, threads)}{table(rows)}\n\n"
        f"## Front doors, side by side (req/s, p99 ms in brackets)\n\n{front_doors(rows, {})}\n"
    )


def render(
    rows: list[Row],
    pairs: dict[tuple[str, int], float],
    limits: dict[str, dict[int, float]],
    args: argparse.Namespace,
    threads: int,
) -> str:
    limit_lines = ["| model | batch | samples/s |", "|---|--:|--:|"]
    for name, by_batch in limits.items():
        limit_lines += [f"| {name} | {batch} | {v:,.0f} |" for batch, v in by_batch.items()]
    ratios = [
        "| model | conc | modelport / tutorial req/s | p99 modelport / tutorial |",
        "|---|--:|--:|--:|",
    ]
    for row in rows:
        if row.server != "modelport":
            continue
        base = next(
            r
            for r in rows
            if r.server == "tutorial" and r.model == row.model and r.concurrency == row.concurrency
        )
        ratios.append(
            f"| {row.model} | {row.concurrency} | {row.rps / base.rps:.1f}x | "
            f"{row.p99_ms / base.p99_ms:.2f} |"
        )
    binary = [r for r in rows if r.server == "modelport (binary)" and r.model == "cnn"]
    best = max(limits.get("cnn", {0: 0.0}).values())
    cnn_line = (
        f"\ncnn binary path at its best concurrency: {max(r.rps for r in binary):,.0f} "
        f"req/s = {max(r.rps for r in binary) / best:.0%} of the in-process limit "
        f"({best:,.0f} samples/s)\n"
        if binary and best
        else ""
    )
    return (
        f"{preamble(args, threads)}"
        f"{table(rows)}\n\n## Ratios\n\n" + "\n".join(ratios) + "\n"
        f"\n## Front doors, side by side (req/s, p99 ms in brackets)\n\n"
        f"{front_doors(rows, pairs)}\n"
        f"\n## In-process limit (samples/s, {args.workers} processes x {threads} thread(s), "
        f"no HTTP)\n\n" + "\n".join(limit_lines) + "\n" + cnn_line
    )


if __name__ == "__main__":
    main()
