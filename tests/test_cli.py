"""The installed ``modelport`` console script against a server it started (``modelport serve``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from models.digits import HELDOUT
from tests.helpers import (
    BROKEN,
    BUNDLED,
    DIGITS,
    LINEAR,
    SAMPLE,
    SENTIMENT,
    TOKEN,
    TOKENS,
    WEIGHTS,
    ServerProcess,
    clean_env,
    first,
    free_port,
    linear_weights,
    metric,
    run_server,
    sentiment_outputs,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process

MODELPORT = Path(sys.executable).parent / "modelport"
# The upload walkthrough changes this copy of linear, so the other tests see the bundled one.
COPY = {**LINEAR, "name": "linear-cli"}
VERSIONS_COPY = {**LINEAR, "name": "linear-cli-versions"}
"""The copy whose versions the delete and history test changes."""
MAX_BODY_BYTES = 4096
"""The server's predict body cap: BATCH fits as float32 bytes (2560) and not as JSON (~13 kB)."""
BATCH = np.random.default_rng(0).standard_normal((64, 10), dtype=np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``modelport serve`` itself; live (not ready: BROKEN is, until fitting weights arrive)."""
    directory = tmp_path_factory.mktemp("cli-server")
    config = write_config(directory, LINEAR, DIGITS, COPY, BROKEN, VERSIONS_COPY)
    port = free_port()
    env = clean_env(
        MODELPORT_ADMIN_TOKEN=TOKEN,
        MODELPORT_STORE_DIR=str(directory / "store"),
        MODELPORT_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
    )
    args = [str(MODELPORT), "serve", "--port", str(port), "--config", str(config)]
    process = ServerProcess(args, env, port, directory / "server.log")
    try:
        wait_until(lambda: process.answers("/health/live"), 60, "live", every=0.1, server=process)
        yield process
    finally:
        process.stop()


def modelport(
    server: ServerProcess | None, *args: str, stderr: int = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    """Run the console script with the server's URL and the admin token in its environment."""
    env = {"MODELPORT_URL": server.url, "MODELPORT_ADMIN_TOKEN": TOKEN} if server else {}
    return subprocess.run(
        [str(MODELPORT), *args],
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=60,
        check=False,
    )


def concurrently(
    server: ServerProcess | None, *commands: list[str]
) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands at once, to keep the suite fast; results in order."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: modelport(server, *args), commands))


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's message: exit 1, and exactly one line on stderr."""
    assert result.returncode == 1, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modelport: ")
    return lines[0]


def test_health_exits_1_naming_a_model_that_cannot_serve_until_fitting_weights_arrive(
    server: ServerProcess,
) -> None:
    before, before_json = concurrently(server, ["health"], ["health", "--json"])
    fixed = modelport(server, "upload", "broken", str(WEIGHTS / "linear.pth"))
    after, after_json = concurrently(server, ["health"], ["health", "--json"])

    assert before.returncode == 1
    assert before.stdout.splitlines()[:4] == [
        "not ready",
        "  linear: ready",
        "  digits: ready",
        "  linear-cli: ready",
    ]
    assert before.stdout.splitlines()[4].startswith("  broken: unavailable: ")
    assert "missing keys" in before.stdout
    assert json.loads(before_json.stdout)["unavailable"]["broken"]
    assert fixed.returncode == 0, fixed.stderr
    assert after.returncode == 0
    assert after.stdout.splitlines() == [
        "ready",
        "  linear: ready",
        "  digits: ready",
        "  linear-cli: ready",
        "  broken: ready",
        "  linear-cli-versions: ready",
    ]
    assert as_json(after_json)["ready"] is True


def test_predict_reads_json_and_npy_files_with_a_batch_or_one_sample(
    server: ServerProcess, tmp_path: Path
) -> None:
    batch = [SAMPLE, [1.0] * 10]
    (tmp_path / "batch.json").write_text(json.dumps(batch))
    (tmp_path / "body.json").write_text(json.dumps({"inputs": batch}))
    (tmp_path / "one.json").write_text(json.dumps(SAMPLE))
    np.save(tmp_path / "batch.npy", np.array(batch, np.float32))
    files = ["batch.json", "body.json", "one.json", "batch.npy"]

    *answers, text = concurrently(
        server,
        *(["predict", "linear", "--input", str(tmp_path / name), "--json"] for name in files),
        ["predict", "linear", "--input", str(tmp_path / "one.json")],
    )

    for name, answer in zip(files, answers, strict=True):
        expected = BUNDLED.outputs(batch if name != "one.json" else [SAMPLE])
        assert np.allclose(as_json(answer)["outputs"], expected, atol=1e-6), name
    version = as_json(answers[2])["version"]
    assert text.stdout.splitlines()[0] == f"linear (version {version})"
    assert text.stdout.splitlines()[1].startswith("[0] [0.0888")


def test_predict_saves_the_raw_output_tensor_of_npy_inputs_as_npy(
    server: ServerProcess, tmp_path: Path
) -> None:
    np.save(tmp_path / "batch.npy", BATCH)
    (tmp_path / "batch.json").write_text(json.dumps(BATCH.tolist()))
    np.save(tmp_path / "one.npy", BATCH[0].astype(np.float64))
    output, one = tmp_path / "out.npy", tmp_path / "one-out.npy"

    text, as_json_line, labelled, as_lists = concurrently(
        server,
        ["predict", "linear", "--input", str(tmp_path / "batch.npy"), "--output", str(output)],
        ["predict", "linear", "--input", str(tmp_path / "one.npy"), "--output", str(one), "--json"],
        ["predict", "linear", "--input", str(tmp_path / "batch.npy"), "--json"],
        ["predict", "linear", "--input", str(tmp_path / "batch.json")],
    )

    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("linear (version ")
    assert text.stdout.rstrip().endswith(f"): output [64, 2] float32 -> {output}")
    saved = np.load(output, allow_pickle=False)
    assert saved.dtype == np.float32
    np.testing.assert_allclose(saved, BUNDLED.outputs(BATCH), rtol=0, atol=1e-6)
    summary = as_json(as_json_line)
    assert (summary["shape"], summary["dtype"], summary["file"]) == ([1, 2], "float32", str(one))
    np.testing.assert_allclose(np.load(one), BUNDLED.outputs(BATCH[:1]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(as_json(labelled)["outputs"], BUNDLED.outputs(BATCH), atol=1e-6)
    # the .npy went as float32 bytes: the same values as JSON are over the server's body cap
    assert one_error_line(as_lists).endswith("(payload_too_large, HTTP 413)")


def test_predict_turns_png_and_jpeg_pictures_into_the_digits_input(
    server: ServerProcess, tmp_path: Path
) -> None:
    with np.load(HELDOUT) as data:
        images, labels = data["images"][:2].astype(np.float64), data["labels"][:2].tolist()
    paths = []
    for index, (pixels, image_format) in enumerate(zip(images, ["PNG", "JPEG"], strict=True)):
        # Dark ink on a light ground, 32x32: the digit as a person would draw or scan it.
        ink = (255 - np.round(pixels * 255 / 16)).astype(np.uint8)
        picture = Image.fromarray(ink, "L").resize((32, 32), Image.Resampling.NEAREST)
        paths.append(tmp_path / f"digit{index}.{image_format.lower()}")
        picture.convert("RGB").save(paths[-1], image_format)

    answers = concurrently(
        server, *(["predict", "digits", "--input", str(path), "--json"] for path in paths)
    )

    assert [as_json(answer)["outputs"][0]["label"] for answer in answers] == labels


def test_upload_shows_the_report_then_versions_activate_and_rollback(
    server: ServerProcess, tmp_path: Path
) -> None:
    retrained = linear_weights(1).write(tmp_path / "retrained.pth")

    upload = modelport(server, "upload", "linear-cli", str(retrained))
    version = upload.stdout.split()[2]
    versions, listed = concurrently(
        server, ["versions", "linear-cli"], ["versions", "linear-cli", "--json"]
    )
    rollback = modelport(server, "rollback", "linear-cli")
    activate = as_json(modelport(server, "activate", "linear-cli", version, "--json"))

    assert upload.returncode == 0, upload.stderr
    assert upload.stderr == ""  # no progress bar when stderr is not a terminal
    assert upload.stdout.splitlines()[0] == f"linear-cli: version {version} (new version, active)"
    assert "  smoke test  passed" in upload.stdout.splitlines()
    assert "  keys        2 loaded (strict)" in upload.stdout.splitlines()
    header, bundled_row, uploaded_row = versions.stdout.splitlines()
    assert header.split() == ["VERSION", "SOURCE", "CREATED", "FILE"]
    assert bundled_row.split()[1::2] == ["bundled", "linear.pth"]
    assert bundled_row.split()[-1] == "previous"
    assert uploaded_row.split()[:2] == [version, "upload"]
    assert uploaded_row.split()[-2:] == ["retrained.pth", "active"]
    assert as_json(listed)["active"] == version
    previous = as_json(listed)["previous"]
    assert rollback.stdout.strip() == f"linear-cli: rolled back to version {previous}"
    assert activate["version"] == version
    assert activate["active"] is True


def test_delete_and_history_of_versions(server: ServerProcess, tmp_path: Path) -> None:
    model = VERSIONS_COPY["name"]
    spare = linear_weights(6).write(tmp_path / "spare.pth")
    stored = as_json(modelport(server, "upload", model, str(spare), "--no-activate", "--json"))
    version = stored["version"]

    deleted = modelport(server, "delete", model, version)
    versions = as_json(modelport(server, "versions", model, "--json"))
    history, history_json, bundled_refused, unknown = concurrently(
        server,
        ["history", model],
        ["history", model, "--limit", "1", "--json"],
        ["delete", model, versions["active"]],
        ["delete", model, "0123456789ab"],
    )
    again = modelport(server, "delete", model, version, "--json")

    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == f"{model}: version {version} deleted\n"
    assert version not in [v["version"] for v in versions["versions"]]
    header, *rows = history.stdout.splitlines()
    assert header.split() == ["SEQ", "AT", "ACTION", "FROM", "TO", "CLIENT"]
    assert rows[0].split()[2:] == ["delete", version, "-", "127.0.0.1"]
    assert rows[1].split()[2:] == ["upload", "-", version, "127.0.0.1"]
    entries = as_json(history_json)["entries"]
    assert [(e["action"], e["from_version"]) for e in entries] == [("delete", version)]
    assert "(version_conflict, HTTP 409)" in one_error_line(bundled_refused)
    assert "(version_not_found, HTTP 404)" in one_error_line(unknown)
    assert "(version_not_found, HTTP 404)" in one_error_line(again)  # deleted already


def test_version_prints_the_client_version() -> None:
    result = modelport(None, "--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"modelport {metadata.version('modelport')}\n"


def test_a_server_that_never_answers_times_out_in_one_line() -> None:
    with socket.socket() as silent:  # takes connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = modelport(None, "health", "--url", url, "--timeout", "0.5")

    line = one_error_line(result)
    assert "did not answer GET /health/ready within the client's timeout of 0.5 s" in line


def test_upload_draws_a_progress_bar_on_a_terminal(server: ServerProcess) -> None:
    terminal, child_side = os.openpty()
    # An 80x24 terminal: tqdm sizes its bar to the window, which a new pty reports as 0x0.
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        upload = modelport(
            server, "upload", "linear", str(WEIGHTS / "linear.pth"), stderr=child_side
        )
        os.close(child_side)
        drawn = _read_all(terminal)
    finally:
        os.close(terminal)
    assert upload.returncode == 0
    assert "linear.pth: 100%" in drawn
    assert "2.01k/2.01k" in drawn


def _read_all(fd: int) -> str:
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the writing side is closed and drained
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_failures_print_one_line_and_exit_1(server: ServerProcess, tmp_path: Path) -> None:
    (tmp_path / "one.json").write_text(json.dumps(SAMPLE))
    Image.new("L", (8, 8)).save(tmp_path / "picture.png")
    one = str(tmp_path / "one.json")

    unknown, takes_no_images, missing, wrong_token, refused, usage = concurrently(
        server,
        ["predict", "nope", "--input", one],
        ["predict", "linear", "--input", str(tmp_path / "picture.png")],
        ["predict", "linear", "--input", str(tmp_path / "absent.json")],
        ["rollback", "linear", "--token", "x" * 40],
        ["upload", "digits", str(WEIGHTS / "linear.pth")],
        ["activate", "linear"],
    )
    down = modelport(None, "health", "--url", f"http://127.0.0.1:{free_port()}")

    assert "no model named 'nope'" in one_error_line(unknown)
    assert "takes no images" in one_error_line(takes_no_images)
    assert "cannot read" in one_error_line(missing)
    assert one_error_line(wrong_token).endswith("(forbidden, HTTP 403)")
    assert "weights do not fit the model" in one_error_line(refused)
    assert one_error_line(refused).endswith("(weights_incompatible, HTTP 422)")
    assert "cannot reach the server" in one_error_line(down)
    assert usage.returncode == 2


@pytest.fixture(scope="module")
def named_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Serves sentiment (two inputs, two outputs) and linear, with the same body cap."""
    directory = tmp_path_factory.mktemp("cli-named-server")
    config = write_config(directory, SENTIMENT, LINEAR)
    env = {"MODELPORT_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    with run_server(directory, config, env=env) as process:
        yield process


def test_predict_reads_inputs_by_name_from_npz_and_json_and_saves_the_outputs_by_name(
    named_server: ServerProcess, tmp_path: Path
) -> None:
    np.savez(tmp_path / "batch.npz", **TOKENS)
    np.savez(tmp_path / "one.npz", **{name: value[0] for name, value in TOKENS.items()})
    small = {name: value.tolist() for name, value in first(2).items()}
    (tmp_path / "body.json").write_text(json.dumps({"inputs": small}))
    (tmp_path / "one.json").write_text(json.dumps({k: v[0] for k, v in small.items()}))
    (tmp_path / "batch.json").write_text(json.dumps({k: v.tolist() for k, v in TOKENS.items()}))
    np.save(tmp_path / "linear.npy", BATCH)
    out, linear_out = tmp_path / "out.npz", tmp_path / "linear.npz"

    def predict(model: str, file: str, *flags: str) -> list[str]:
        return ["predict", model, "--input", str(tmp_path / file), *flags]

    batch, one, body, one_json, saved, saved_json, linear, as_lists = concurrently(
        named_server,
        predict("sentiment", "batch.npz", "--json"),
        predict("sentiment", "one.npz", "--json"),
        predict("sentiment", "body.json", "--json"),
        predict("sentiment", "one.json"),
        predict("sentiment", "batch.npz", "--output", str(out)),
        predict("sentiment", "body.json", "--output", str(tmp_path / "small.npz"), "--json"),
        predict("linear", "linear.npy", "--output", str(linear_out)),
        predict("sentiment", "batch.json"),
    )

    expected = sentiment_outputs(TOKENS)
    answers = {"batch": (as_json(batch), 200), "one": (as_json(one), 1), "body": (as_json(body), 2)}
    for what, (answer, count) in answers.items():
        assert len(answer["outputs"]) == count, what
        for name, values in expected.items():
            got = [sample[name] for sample in answer["outputs"]]
            np.testing.assert_allclose(got, values[:count], rtol=0, atol=1e-6, err_msg=what)
    version = as_json(batch)["version"]
    header, line = one_json.stdout.splitlines()
    assert header == f"sentiment (version {version})"
    assert line.startswith('[0] {"logits": [')
    assert '"embedding": [' in line
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout == (
        f"sentiment (version {version}): logits [200, 3] float32, "
        f"embedding [200, 4] float32 -> {out}\n"
    )
    with np.load(out, allow_pickle=False) as written:
        assert written.files == ["logits", "embedding"]
        for name, values in expected.items():
            np.testing.assert_allclose(written[name], values, rtol=0, atol=1e-6)
    assert as_json(saved_json)["outputs"] == {
        "logits": {"shape": [2, 3], "dtype": "float32"},
        "embedding": {"shape": [2, 4], "dtype": "float32"},
    }
    assert linear.returncode == 0, linear.stderr
    with np.load(linear_out, allow_pickle=False) as written:
        assert written.files == ["output"]
        np.testing.assert_allclose(written["output"], BUNDLED.outputs(BATCH), rtol=0, atol=1e-6)
    # the .npz went as binary: the same values as JSON are over the server's body cap
    assert one_error_line(as_lists).endswith("(payload_too_large, HTTP 413)")


def test_predict_by_name_failures_print_one_line(
    named_server: ServerProcess, tmp_path: Path
) -> None:
    np.savez(tmp_path / "batch.npz", **first(2))
    np.savez(tmp_path / "missing.npz", input_ids=TOKENS["input_ids"][:2])
    np.save(tmp_path / "ids.npy", TOKENS["input_ids"][:2])
    (tmp_path / "text.npz").write_text("not a zip")
    single = tmp_path / "out.npy"

    to_npy, missing, unnamed, unreadable = concurrently(
        named_server,
        ["predict", "sentiment", "--input", str(tmp_path / "batch.npz"), "--output", str(single)],
        ["predict", "sentiment", "--input", str(tmp_path / "missing.npz")],
        ["predict", "sentiment", "--input", str(tmp_path / "ids.npy")],
        ["predict", "sentiment", "--input", str(tmp_path / "text.npz")],
    )

    assert one_error_line(to_npy) == (
        "modelport: model 'sentiment' has 2 outputs (logits, embedding): save them by name as "
        ".npz (--output FILE.npz)"
    )
    assert not single.exists()
    assert "takes the inputs ['input_ids', 'attention_mask']" in one_error_line(missing)
    assert one_error_line(missing).endswith("(invalid_input, HTTP 422)")
    assert "takes 2 inputs by name" in one_error_line(unnamed)
    assert one_error_line(unreadable) == (
        f"modelport: cannot read {tmp_path / 'text.npz'}: not an .npz file: File is not a zip file"
    )


# --- over the gRPC door ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """Serves sentiment and linear, with its gRPC door on a free port (``HOST:PORT``)."""
    directory = tmp_path_factory.mktemp("cli-grpc-server")
    port = free_port()
    config = write_config(directory, SENTIMENT, LINEAR)
    with run_server(directory, config, env={"MODELPORT_GRPC_PORT": str(port)}) as process:
        yield process, f"127.0.0.1:{port}"


def test_predict_over_grpc_prints_and_saves_the_raw_outputs_as_over_http(
    grpc_server: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    server, target = grpc_server
    np.save(tmp_path / "linear.npy", BATCH)
    np.savez(tmp_path / "tokens.npz", **first(2))
    (tmp_path / "batch.json").write_text(json.dumps([SAMPLE]))
    over_grpc, over_http = tmp_path / "grpc.npz", tmp_path / "http.npz"

    def calls() -> float:
        scrape = httpx.get(f"{server.url}/metrics", timeout=10).text
        endpoint = "/inference.GRPCInferenceService/ModelInfer"
        return metric(scrape, "modelport_requests_total", missing=0.0, endpoint=endpoint)

    def predict(model: str, file: str, *flags: str) -> list[str]:
        return ["predict", model, "--input", str(tmp_path / file), *flags]

    before = calls()
    linear, linear_http, text, saved, saved_http, not_arrays = concurrently(
        server,
        predict("linear", "linear.npy", "--grpc", target, "--json"),
        predict("linear", "linear.npy", "--json"),
        predict("sentiment", "tokens.npz", "--grpc", target),
        predict("sentiment", "tokens.npz", "--grpc", target, "--output", str(over_grpc)),
        predict("sentiment", "tokens.npz", "--output", str(over_http)),
        predict("linear", "batch.json", "--grpc", target),
    )

    assert calls() == before + 3
    answer, expected = as_json(linear), as_json(linear_http)  # linear has no postprocess
    assert (answer["model"], answer["version"]) == ("linear", expected["version"])
    np.testing.assert_allclose(answer["outputs"], expected["outputs"], rtol=0, atol=1e-6)
    assert text.returncode == 0, text.stderr
    header, *lines = text.stdout.splitlines()
    assert header.startswith("sentiment (version ")
    assert [line[:16] for line in lines] == ['[0] {"logits": [', '[1] {"logits": [']
    assert saved.returncode == saved_http.returncode == 0, saved.stderr + saved_http.stderr
    with np.load(over_grpc) as got, np.load(over_http) as wanted:
        assert got.files == wanted.files == ["logits", "embedding"]
        for name in wanted.files:
            np.testing.assert_array_equal(got[name], wanted[name])
    assert one_error_line(not_arrays) == (
        "modelport: --grpc sends arrays: give a .npy or .npz file, not batch.json"
    )
