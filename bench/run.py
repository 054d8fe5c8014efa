"""Benchmark modelport against the tutorial FastAPI baseline and the in-process limit.

Starts both servers as real processes on 127.0.0.1, drives them with wrk (an external load
generator, not a Python client competing for the cores) and modelport's gRPC door with
bench/grpc_load.py (one bounded Python process; its CPU is reported beside wrk's), and measures
the same models' forward with no HTTP. Then the cost of each feature (bench/features.py), the
time from launch to ready (bench/startup.py) and an upload of large weights beside a served
model (bench/upload_bench.py). Prints a report and writes it, with the machine's description,
to --out.

    make bench            # or: .venv/bin/python bench/run.py --duration 10
    # the front doors alone, on chosen models (no tutorial server, A/B rounds or in-process limit)
    .venv/bin/python bench/run.py --only-doors --models cnn,mlp --concurrency 1,64 --duration 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import features
import httpx
import startup
import torch
import upload_bench
from harness import MODELS, ROOT, Row, Server, prepare, run_grpc, run_wrk
from report import AB_ROUNDS, AB_SECONDS, GRPC, render, render_doors, table

from app.codecs.arrays import to_batch
from app.http.native import NAMED_FIELDS, decode_json_body
from app.observability.metrics import FLUSH_S

JSON_ENV = {"CONTENT_TYPE": "application/json"}


# --- in-process limit -------------------------------------------------------------------------


def _loaded(
    name: str, weights: str, threads: int, batch: int
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The bench model ``name`` with ``weights``, in eval(), on ``threads`` threads (of this
    thread), and a random input batch of ``batch`` samples."""
    torch.set_num_threads(threads)
    cls, shape = MODELS[name]
    model = cls()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    return model, torch.randn(batch, *shape)


def _forward_loop(
    name: str, weights: str, batch: int, seconds: float, threads: int, out: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    model, x = _loaded(name, weights, threads, batch)
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
    args = (name, str(weights), batch, seconds, threads)
    return sum(_spawned(_forward_loop, args, processes))


def _forward_latency(
    name: str, weights: str, threads: int, seconds: float, out: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    model, x = _loaded(name, weights, threads, 1)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    out.put(1000 * statistics.median(times))


def forward_ms(name: str, weights: Path, threads: int, seconds: float = 3.0) -> float:
    """Median milliseconds of one batch-1 forward, in a process of its own on ``threads``
    threads: what a lone request's answer cannot beat."""
    [median] = _spawned(_forward_latency, (name, str(weights), threads, seconds), 1)
    return median


def _spawned(target: Callable[..., None], args: tuple[object, ...], processes: int) -> list[float]:
    """Run ``target(*args, queue)`` in ``processes`` fresh processes at once; what each put."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=target, args=(*args, out)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = [out.get() for _ in workers]
    for worker in workers:
        worker.join()
    return results


def decode_ms(name: str, body: Path, rounds: int = 200) -> float:
    """Median milliseconds the server's JSON decode of one body takes (the native door's
    decode, then the checked numpy batch), in this process."""
    sample_shape = MODELS[name][1]
    raw = body.read_bytes()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        _, inputs, numeric = decode_json_body(raw, NAMED_FIELDS)
        to_batch(inputs, sample_shape, torch.float32, known_numeric=numeric)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


# --- the run ----------------------------------------------------------------------------------


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


def batch_totals(base_url: str, model: str, token: str) -> tuple[float, float]:
    """The (sum, count) of modelport's batch size histogram for ``model``, whole service."""
    time.sleep(FLUSH_S)  # until every worker has written what it counted
    headers = {"Authorization": f"Bearer {token}"}
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text
    values = {}
    for kind in ("sum", "count"):
        match = re.search(rf'^modelport_batch_size_{kind}{{model="{model}"}} (\S+)$', text, re.M)
        values[kind] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def _mean_batch(
    base_url: str, model: str, before: tuple[float, float] | None, token: str
) -> float | None:
    if before is None:
        return None
    total, count = batch_totals(base_url, model, token)
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
        "--out",
        type=Path,
        help="where to write the report (default: bench/results.md, full runs only)",
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
        # every feature on, as shipped: access log (to /dev/null), request ids, request
        # metrics; and the API token checked on each request
        token = secrets.token_hex(32)
        ours_env = env | {
            "MODELPORT_STORE_DIR": str(directory / "store"),
            "MODELPORT_GRPC_PORT": grpc_target.rsplit(":", 1)[1],
            "MODELPORT_API_TOKEN": token,
        }
        auth = {"TOKEN": token}
        rows: list[Row] = []
        pairs: dict[tuple[str, int], float] = {}
        lone: dict[str, tuple[float, float]] = {}

        def base(label: str) -> str:
            return f"http://127.0.0.1:{ours_port if label == 'modelport' else base_port}"

        launch = [python, "-m", "app", "--port", str(ours_port), "--workers", str(args.workers)]
        ours = Server(
            "modelport",
            [*launch, "--config", str(directory / "bench.toml")],
            ours_env,
            f"http://127.0.0.1:{ours_port}/health/ready",
        )
        # the tutorial server is measured at each point right beside modelport's native JSON
        # door: this machine's speed drifts by tens of percent within minutes
        tutorial = (
            None
            if args.only_doors
            else Server(
                "tutorial",
                [python, "bench/tutorial_server.py", tmp, str(base_port)],
                env,
                f"http://127.0.0.1:{base_port}/openapi.json",
            )
        )
        try:
            for name in names:
                for point, concurrency in enumerate(concurrencies):
                    doors = protocols(name, files[name])
                    url, seconds = base("modelport"), args.duration
                    runs: list[tuple[str, Callable[[], Row]]] = [
                        (
                            label,
                            partial(
                                run_wrk, ours, url + path, body, concurrency, seconds, wrk | auth
                            ),
                        )
                        for label, path, body, wrk in doors
                    ]
                    raw = files[name]["raw"]
                    grpc = partial(
                        run_grpc, ours, grpc_target, name, raw, concurrency, seconds, auth
                    )
                    runs.append((GRPC, grpc))
                    if tutorial is not None:
                        json_body, url = files[name]["json"], f"{base('tutorial')}/predict/{name}"
                        baseline = partial(
                            run_wrk, tutorial, url, json_body, concurrency, seconds, JSON_ENV
                        )
                        runs.insert(1, ("tutorial", baseline))
                    # the front doors one after another at each point, in turn first and last
                    for label, measure in runs[:: -1 if point % 2 else 1]:
                        ours_run = label != "tutorial"
                        before = batch_totals(base("modelport"), name, token) if ours_run else None
                        row = measure()
                        row.model, row.server = name, label
                        row.mean_batch = _mean_batch(base("modelport"), name, before, token)
                        rows.append(row)
                        print(table([row]).splitlines()[-1], flush=True)
                    if concurrency == 1 and not args.only_doors:
                        # what a lone request cannot beat, measured beside its runs (this
                        # machine's speed drifts by tens of percent within minutes): one
                        # batch-1 forward on every core, and one JSON body's decode
                        weights = files[name]["weights"]
                        lone[name] = (
                            forward_ms(name, weights, os.cpu_count() or 1),
                            decode_ms(name, files[name]["json"]),
                        )
                    if not args.only_doors:
                        binary_doors = [door for door in doors if door[0].endswith("binary)")]
                        pairs[name, concurrency] = alternate(
                            ours, base("modelport"), binary_doors, concurrency, auth
                        )
        finally:
            ours.stop()
            if tutorial is not None:
                tutorial.stop()
        if args.only_doors:
            report = render_doors(rows, args, threads)
            print(report)
            if args.out is not None:
                args.out.write_text(report)
            return
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
        small = [name for name in names if name in ("tiny", "mlp")]
        sections = {
            "The cost of each feature (bench/features.py)": features.run(
                directory, small, args.workers
            ),
            "Startup: launch to ready (bench/startup.py)": startup.run(),
            "Uploading large weights beside a served model (bench/upload_bench.py)": (
                upload_bench.main([]).split("\n", 1)[1].strip()  # without its own title
            ),
        }
    report = render(rows, pairs, limits, lone, args, threads) + "".join(
        f"\n## {title}\n\n{text}\n" for title, text in sections.items()
    )
    print(report)
    full_run = not args.only_doors and all(
        getattr(args, name) == parser.get_default(name)
        for name in ("duration", "concurrency", "models", "workers")
    )
    if args.out or full_run:  # a partial run never overwrites the full run's record
        (args.out or ROOT / "bench" / "results.md").write_text(report)


def alternate(
    server: Server,
    base_url: str,
    doors: list[tuple[str, str, Path, dict[str, str]]],
    concurrency: int,
    auth: dict[str, str],
) -> float:
    """V2 binary / native binary req/s from AB_ROUNDS short runs of each, the order swapped
    every round, compared by their medians: on this machine a single run of a point moves
    about 10%, and the door measured second tends to lose."""
    measured: dict[str, list[float]] = {label: [] for label, *_ in doors}
    for round_ in range(AB_ROUNDS):
        for label, path, body, wrk_env in doors[:: -1 if round_ % 2 else 1]:
            url = f"{base_url}{path}"
            row = run_wrk(server, url, body, concurrency, AB_SECONDS, wrk_env | auth)
            measured[label].append(row.rps)
    native, v2 = (statistics.median(measured[label]) for label, *_ in doors)
    return v2 / native


if __name__ == "__main__":
    main()
