"""A bounded gRPC load generator for the bench: ``ModelInfer`` calls with raw input contents, a
fixed number in flight, for a fixed time, as wrk drives the REST doors.

One process and one event loop (``grpc.aio``); the request is serialized once and sent as
bytes, and answers are not parsed (wrk does not parse bodies either), so the client spends its
CPU on gRPC itself. Each in-flight call has a connection of its own, as each of wrk's does, so
that the kernel spreads them over the server's worker processes (``SO_REUSEPORT``); one channel
would pin every call to one worker. Prints one line, ``GRPC {json}``: requests, duration_us,
p50_us, p99_us, errors and the client's own CPU seconds during the run (cpu_s).

    .venv/bin/python bench/grpc_load.py --target 127.0.0.1:8001 --model mlp --shape 1,784 \\
        --body mlp.bin --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.grpc.proto import grpc_predict_v2_pb2 as pb  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
CALL_TIMEOUT_S = 10.0
"""A call not answered by then is an error (wrk's ``--timeout 10s``)."""
MAX_REQUESTS = 10_000_000
"""The most calls one run makes, whatever its duration."""


def request_bytes(model: str, shape: list[int], body: bytes) -> bytes:
    """One FP32 ``ModelInferRequest`` with ``body`` as its raw input, serialized."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=shape)
    request = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[body])
    return request.SerializeToString()


def percentile(ordered: list[float], percent: float) -> float:
    """The nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(
    target: str, message: bytes, concurrency: int, seconds: float, token: str | None = None
) -> dict[str, float]:
    """Drive ``concurrency`` calls in flight for ``seconds`` (with ``token`` as the bearer
    token when given); the summary."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel, not shared
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(concurrency)]
    latencies: list[float] = []
    errors = 0
    try:
        await asyncio.gather(*(channel.channel_ready() for channel in channels))
        # no serializers: the request goes as the bytes it is, the answer comes back as bytes
        calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]]
        calls = [channel.unary_unary(METHOD) for channel in channels]
        cpu_before, started = cpu_seconds(), time.perf_counter()
        deadline = started + seconds

        async def drive(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) + errors < MAX_REQUESTS:
                sent = time.perf_counter()
                try:
                    await call(message, timeout=CALL_TIMEOUT_S, metadata=metadata)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(drive(call) for call in calls))
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": round(elapsed * 1e6),
        "p50_us": round(percentile(latencies, 50) * 1e6),
        "p99_us": round(percentile(latencies, 99) * 1e6),
        "errors": errors,
        "cpu_s": round(cpu, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC door")
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", required=True, help="the input's shape, e.g. 1,784")
    parser.add_argument("--body", type=Path, required=True, help="the raw float32 input")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--token", help="the API token, sent as the bearer token (default: $TOKEN)")
    args = parser.parse_args()
    shape = [int(d) for d in args.shape.split(",")]
    message = request_bytes(args.model, shape, args.body.read_bytes())
    token = args.token or os.environ.get("TOKEN")
    summary = asyncio.run(run(args.target, message, args.concurrency, args.duration, token))
    print("GRPC " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
