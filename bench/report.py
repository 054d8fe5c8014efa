"""The bench's report: the table of every run, the ratios against the tutorial server, the
front doors side by side, the in-process limit, and the targets of issue 14 (memory per
worker, a lone cnn request against the in-process forward)."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
from harness import Row

GRPC = "modelport (gRPC)"
AB_ROUNDS, AB_SECONDS = 7, 2
"""Alternating short runs comparing the two binary doors: rounds, and seconds per run."""


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


def table(rows: list[Row]) -> str:
    lines = [
        "| model | server | conc | req/s | p50 ms | p99 ms | errors | peak RSS MiB (largest "
        "worker) | server CPU "
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
            f"{r.p99_ms:.2f} | {r.errors} | {r.rss_mib:,.0f} ({r.worker_rss_mib:,.0f}) | "
            f"{r.cpu_cores:.2f}{spread} | "
            + ("-" if r.mean_batch is None else f"{r.mean_batch:.1f}")
            + (f" | {1000 * r.client_cpu_s / r.requests:.2f} |" if r.requests else " | - |")
        )
    return "\n".join(lines)


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
        f"tutorial: 1 uvicorn worker, default settings, measured at each point beside "
        f"modelport's native JSON door. One sample per request. Server CPU is "
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


def memory(rows: list[Row]) -> str:
    """Peak RSS of modelport's largest worker (over every door run at the point) against the
    tutorial server's one process, and of modelport's whole tree."""
    lines = [
        "| model | conc | modelport: largest worker | modelport: every process "
        "| tutorial: its process | largest worker / tutorial |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for model, concurrency in dict.fromkeys((r.model, r.concurrency) for r in rows):
        point = [r for r in rows if (r.model, r.concurrency) == (model, concurrency)]
        ours = [r for r in point if r.server != "tutorial"]
        theirs = [r for r in point if r.server == "tutorial"]
        if not ours or not theirs:
            continue
        worker = max(r.worker_rss_mib for r in ours)
        tree = max(r.rss_mib for r in ours)
        base = theirs[0].rss_mib
        lines.append(
            f"| {model} | {concurrency} | {worker:,.0f} | {tree:,.0f} | {base:,.0f} "
            f"| {worker / base:.2f} |"
        )
    return "\n".join(lines)


def lone_requests(rows: list[Row], lone: dict[str, tuple[float, float]]) -> str:
    """At concurrency 1, each model's p50 against its batch-1 forward on every core in-process
    (plus one body's decode for JSON)."""
    lines = [
        "| model | door | p50 ms | forward ms (batch 1, every core) | + JSON decode ms "
        "| p50 / what it cannot beat |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for model, (forward, decode) in lone.items():
        doors = (("modelport (binary)", "binary", 0.0), ("modelport", "JSON", decode))
        for label, door, decoded in doors:
            row = next(
                (r for r in rows if (r.model, r.server, r.concurrency) == (model, label, 1)), None
            )
            if row is None:
                continue
            floor = forward + decoded
            shown = f"{decoded:.2f}" if decoded else "-"
            lines.append(
                f"| {model} | {door} | {row.p50_ms:.2f} | {forward:.2f} | {shown} "
                f"| {row.p50_ms / floor:.2f} |"
            )
    return "\n".join(lines)


def render(
    rows: list[Row],
    pairs: dict[tuple[str, int], float],
    limits: dict[str, dict[int, float]],
    lone: dict[str, tuple[float, float]],
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
        f"no HTTP)\n\n"
        + "\n".join(limit_lines)
        + "\n"
        + cnn_line
        + f"\n## A lone request against the in-process forward (concurrency 1)\n\n"
        f"{lone_requests(rows, lone)}\n"
        f"\n## Memory: peak RSS (MiB) per point\n\n{memory(rows)}\n"
    )
