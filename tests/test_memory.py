"""Memory: the supervisor keeps no torch, an idle worker hands its batches' memory back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from app.serving.batching import IDLE_TRIM_S
from models.bench import CNN
from tests.helpers import (
    DIGITS,
    LINEAR,
    ROOT,
    ServerProcess,
    clean_env,
    free_port,
    rss_kib,
    run_server,
    wait_until,
    worker_pids,
    write_config,
)

pytestmark = pytest.mark.process

BIG_BATCH = 64
"""cnn samples per request: ~8 MiB per activation of its first layers."""


def mapped_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_supervisor_of_several_workers_loads_no_torch(tmp_path: Path) -> None:
    with run_server(tmp_path, write_config(tmp_path, LINEAR), "--workers", "2") as server:
        workers = worker_pids(server.process.pid)
        assert "libtorch_cpu" not in mapped_files(server.process.pid)
        assert len(workers) == 2
        assert all("libtorch_cpu" in mapped_files(pid) for pid in workers)


def test_a_bad_config_with_several_workers_exits_2_with_one_line(tmp_path: Path) -> None:
    """The supervisor reads the config file only; the workers find the bad kwargs, and the
    launcher reports it once, as it does serving alone."""
    config = write_config(tmp_path, LINEAR, {**DIGITS, "kwargs": {"num_clases": 3}})
    args = [sys.executable, "-m", "app", "--workers", "2", "--port", str(free_port())]
    env = clean_env(MODELPORT_STORE_DIR=str(tmp_path / "store"))

    result = subprocess.run(
        [*args, "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modelport: config error: model 'digits': bad kwargs: ")
    assert "num_clases" in lines[0]


def anon_mib(pids: list[int]) -> float:
    return sum(rss_kib(pid, "RssAnon") for pid in pids) / 1024


def page_faults(pids: list[int]) -> int:
    """The minor page faults of these processes so far."""
    return sum(
        int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7]) for pid in pids
    )


def predict_big_batch(server: ServerProcess) -> None:
    batch = np.random.default_rng(0).normal(size=(BIG_BATCH, 3, 64, 64)).astype(np.float32)
    answer = httpx.post(
        f"{server.url}/v1/models/cnn/predict",
        content=batch.tobytes(),
        headers={
            "Content-Type": "application/octet-stream",
            "X-Tensor-Shape": ",".join(map(str, batch.shape)),
            "X-Tensor-Dtype": "float32",
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("count", [1, 2])
def test_the_memory_of_large_batches_goes_back_to_the_system_once_the_model_is_idle(
    tmp_path: Path, count: int
) -> None:
    """A worker (or the one process serving alone) keeps the largest working set of the
    forwards in its heap, and reuses it for the next batches; once an inference thread has had
    nothing to do for IDLE_TRIM_S, it gives that back, and a worker's private memory comes back
    near its level before the first batch."""
    weights = tmp_path / "cnn.pth"
    torch.manual_seed(0)
    torch.save(CNN().state_dict(), weights)
    config = write_config(tmp_path, {"name": "cnn", "class": "bench-cnn", "weights": str(weights)})
    with run_server(tmp_path, config, "--workers", str(count)) as server:
        workers = worker_pids(server.process.pid) if count > 1 else [server.process.pid]
        before = anon_mib(workers)
        predict_big_batch(server)  # the first pages its buffers in
        faults = page_faults(workers)
        for _ in range(5):
            predict_big_batch(server)
        if count == 1:  # (of two workers, the first batch of the other one faults its own)
            # each reused the heap its forerunner freed (allocator.tune_heap): 1,500-5,000
            # pages for the five; glibc's own policy trimmed it after each forward, and the
            # next one faulted it in again: ~43,000
            assert page_faults(workers) - faults < 15_000
        # a batch of 64 needs ~40 MiB of activations at once; kept, two workers held ~180 MiB
        # more after these six
        wait_until(
            lambda: anon_mib(workers) - before < 50,
            IDLE_TRIM_S + 10,
            "the workers giving the batches' memory back",
            server=server,
        )


def test_freed_heap_memory_goes_back_to_the_system_when_released() -> None:
    """After one 16 MiB buffer was freed, glibc serves every smaller buffer from its heap, and
    a freed one below the heap's top stays resident until the heap is trimmed."""
    probe = textwrap.dedent(
        """
        import ctypes, sys
        from app.serving.allocator import release_free_memory

        def rss_kib():
            with open("/proc/self/status") as status:
                return int(next(x for x in status if x.startswith("VmRSS:")).split()[1])

        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(libc.malloc(16 << 20))  # glibc: from now on, buffers up to 16 MiB on the heap
        before = rss_kib()
        big, pins = [], []
        for _ in range(16):
            big.append(libc.malloc(4 << 20))
            ctypes.memset(big[-1], 1, 4 << 20)
            pins.append(libc.malloc(256 << 10))  # keeps each big one below the heap's top
        for pointer in big:
            libc.free(pointer)
        if sys.argv[1] == "released":
            assert release_free_memory()
        print((rss_kib() - before) // 1024)
        """
    )

    def kept_mib(mode: str) -> int:
        command = [sys.executable, "-c", probe, mode]
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert kept_mib("kept") >= 48  # glibc's own policy: the 64 MiB stay resident
    assert kept_mib("released") < 8


HEAP_PROBE = textwrap.dedent(
    """
    import resource, sys, threading, torch
    from app.serving.allocator import release_free_memory, tune_heap
    from models.bench import CNN

    def rss_kib():
        with open("/proc/self/status") as status:
            return int(next(x for x in status if x.startswith("VmRSS:")).split()[1])

    def page_faults():  # of the calling thread
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

    if sys.argv[1] == "tuned":
        assert tune_heap()
    torch.set_num_threads(1)
    model = CNN().eval()
    SIZES = (32, 8, 64, 16)  # cnn batches of ~2-16 MiB activations each
    faults = []

    def forwards():  # as an inference thread does: batches of every size, one after another
        with torch.inference_mode():
            for size in SIZES:  # the first of each size may grow the heap
                model(torch.randn(size, 3, 64, 64))
            before = page_faults()
            for size in SIZES * 2:
                model(torch.randn(size, 3, 64, 64))
            faults.append(page_faults() - before)

    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))  # the code of its layers paged in
    before = rss_kib()
    for _ in range(2):  # threads other than the main one
        thread = threading.Thread(target=forwards)
        thread.start()
        thread.join()
    release_free_memory()
    print(max(faults), (rss_kib() - before) // 1024)
    """
)


def heap_probe(mode: str) -> tuple[int, int]:
    """(page faults of an inference thread's repeated forwards, MiB kept after the trim) in a
    process whose heap is ``mode`` ("tuned" by allocator.tune_heap, or glibc's "plain")."""
    command = [sys.executable, "-c", HEAP_PROBE, mode]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    faults, kept_mib = out.stdout.split()
    return int(faults), int(kept_mib)


def test_a_tuned_heap_serves_repeated_forwards_from_memory_it_keeps_until_the_trim() -> None:
    """A worker's heap (allocator.tune_heap): forwards of any batch size reuse the buffers of
    the ones before without faulting pages in again, and the idle trim gives back what every
    thread freed, not only the main thread."""
    faults, kept_mib = heap_probe("tuned")
    assert faults < 10_000  # 1,300-6,200 here
    assert kept_mib < 4  # 1
    # glibc's own policy: most of them trimmed after each forward and faulted in by the next
    # (40,000-51,000), and 16-28 MiB kept at the top of the threads' own heaps in most runs
    plain_faults, _ = heap_probe("plain")
    assert plain_faults > 3 * faults
