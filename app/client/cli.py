"""The ``modelport`` command: serve, predict, upload, versions, activate, rollback, delete,
history, health (and ``--version``).

The server URL and token come from flags or the environment (``MODELPORT_URL``,
``MODELPORT_ADMIN_TOKEN``, else ``MODELPORT_API_TOKEN``); ``predict --grpc HOST:PORT`` sends
arrays over the server's gRPC door. A failure prints one line to stderr and exits 1; ``--json``
prints the server's answer as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from app.client import DEFAULT_URL, ModelportClient, ModelportClientError, client_version
from app.client.images import image_sample
from app.client.tensors import load_npz, write_npz


class CliSettings(BaseSettings):
    """Where the server is and how to authenticate, from ``MODELPORT_*`` variables."""

    model_config = SettingsConfigDict(env_prefix="MODELPORT_", extra="ignore")

    url: str = DEFAULT_URL
    """The server's base URL."""

    admin_token: SecretStr | None = None
    """Sent as the bearer token when set (management needs it; it also works for predict)."""

    api_token: SecretStr | None = None
    """Sent when no admin token is set, for servers that protect prediction."""


class CliError(Exception):
    """A problem on this side (an unreadable input file, a model that takes no images)."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"server URL (env MODELPORT_URL, default {DEFAULT_URL})")
    common.add_argument(
        "--token", help="bearer token (env MODELPORT_ADMIN_TOKEN, else MODELPORT_API_TOKEN)"
    )
    common.add_argument("--json", action="store_true", help="print the answer as JSON")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")

    parser = argparse.ArgumentParser(
        prog="modelport", description="Serve PyTorch models, and talk to a modelport server."
    )
    parser.add_argument("--version", action="version", version=f"modelport {client_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # The launcher (python -m app) declares and reads the serve flags: `serve --help` lists them.
    commands.add_parser("serve", add_help=False, help="run the server: python -m app [FLAGS]")

    predict = commands.add_parser(
        "predict", parents=[common], help="run inputs from a file through a model"
    )
    predict.add_argument("model")
    predict.add_argument(
        "--input",
        required=True,
        type=Path,
        metavar="FILE",
        help='.json (samples, one sample, or {"inputs": ...}; inputs by name as {"inputs": '
        "{NAME: ...}} or {NAME: ...}), .npy, .npz (inputs by name), or an image (PNG, JPEG) "
        "for models whose description has an image_input",
    )
    predict.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="save the model's raw output tensor (before its postprocess) as .npy, or its raw "
        "outputs by name as .npz",
    )
    predict.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        help="send the .npy or .npz inputs over the server's gRPC door (raw tensors) and print "
        "or save the raw outputs (before the model's postprocess)",
    )

    upload = commands.add_parser(
        "upload", parents=[common], help="upload weights: validated, stored, activated"
    )
    upload.add_argument("model")
    upload.add_argument("file", type=Path)
    upload.add_argument(
        "--no-activate", action="store_true", help="store the version without serving it"
    )
    upload.add_argument("--sha256", help="expected sha256 of the file")

    versions = commands.add_parser("versions", parents=[common], help="list a model's versions")
    versions.add_argument("model")

    activate = commands.add_parser("activate", parents=[common], help="serve a stored version")
    activate.add_argument("model")
    activate.add_argument("version")

    rollback = commands.add_parser(
        "rollback", parents=[common], help="switch back to the previous version"
    )
    rollback.add_argument("model")

    delete = commands.add_parser(
        "delete", parents=[common], help="delete a stored version (not the active or previous)"
    )
    delete.add_argument("model")
    delete.add_argument("version")

    history = commands.add_parser(
        "history", parents=[common], help="a model's recorded management actions, newest first"
    )
    history.add_argument("model")
    history.add_argument("--limit", type=int, default=20, help="entries (1-500, default 20)")

    commands.add_parser("health", parents=[common], help="is every model ready (exit 1 if not)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 1 on failure, 2 on a usage error."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        _serve(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    settings = CliSettings()
    secret = settings.admin_token or settings.api_token
    token = args.token or (secret.get_secret_value() if secret else None)
    url, grpc = args.url or settings.url, getattr(args, "grpc", None)
    try:
        with ModelportClient(url, token, timeout=args.timeout, grpc=grpc) as client:
            return _COMMANDS[args.command](client, args)
    except (ModelportClientError, CliError) as exc:
        print(f"modelport: {exc}", file=sys.stderr)
        return 1


def _serve(flags: list[str]) -> NoReturn:
    """Become the launcher, ``python -m app FLAGS`` (this process: signals reach the server
    as they would this command). ``-P``: the working folder, left off this command's import
    path, stays off the server's too."""
    os.execv(sys.executable, [sys.executable, "-P", "-m", "app", *flags])


def _print(args: argparse.Namespace, answer: Any, text: str) -> None:
    print(json.dumps(answer) if args.json else text)


def _predict(client: ModelportClient, args: argparse.Namespace) -> int:
    if args.grpc and args.input.suffix.lower() not in (".npy", ".npz"):
        raise CliError(f"--grpc sends arrays: give a .npy or .npz file, not {args.input.name}")
    info = client.model(args.model)
    inputs = read_inputs(args.input, info)
    if args.output is not None:
        return _predict_to_file(client, args, inputs, info)
    if args.grpc:
        raw = client.prediction(args.model, inputs)
        answer = raw.as_dict() | {"outputs": _samples(raw.outputs)}
    else:
        answer = client.predict(args.model, inputs, postprocess=True)
    lines = [f"{answer['model']} (version {answer['version']})"]
    lines += [f"[{i}] {json.dumps(out)}" for i, out in enumerate(answer["outputs"])]
    _print(args, answer, "\n".join(lines))
    return 0


def _samples(outputs: np.ndarray | dict[str, np.ndarray]) -> list[Any]:
    """Raw outputs as one value per sample (an object of outputs by name, for outputs by
    name), as a postprocessed answer lists them."""
    if isinstance(outputs, np.ndarray):
        rows: list[Any] = outputs.tolist()
        return rows
    columns = {name: array.tolist() for name, array in outputs.items()}
    return [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]


def _predict_to_file(
    client: ModelportClient, args: argparse.Namespace, inputs: Any, model: dict[str, Any]
) -> int:
    """The raw output tensor saved as ``.npy``, or the raw outputs by name as ``.npz``; a line
    saying what was written."""
    path: Path = args.output
    names = [output["name"] for output in model["outputs"]]
    by_name = path.suffix.lower() == ".npz"
    if not by_name and len(names) > 1:
        raise CliError(
            f"model {args.model!r} has {len(names)} outputs ({', '.join(names)}): save them "
            "by name as .npz (--output FILE.npz)"
        )
    answer = client.prediction(args.model, inputs, postprocess=False)
    outputs: dict[str, np.ndarray] = (
        answer.outputs if isinstance(answer.outputs, dict) else {names[0]: answer.outputs}
    )
    try:  # through a file object: np.save would add ".npy" to a name without it
        with path.open("wb") as file:
            if by_name:
                write_npz(file, outputs)
            else:
                [output] = outputs.values()
                np.save(file, output, allow_pickle=False)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc}") from None
    saved = {
        name: {"shape": list(array.shape), "dtype": str(array.dtype)}
        for name, array in outputs.items()
    }
    summary: dict[str, Any] = {"model": answer.model, "version": answer.version}
    summary |= {"outputs": saved} if by_name else saved[next(iter(saved))]
    summary["file"] = str(path)
    listed = ", ".join(f"{name} {out['shape']} {out['dtype']}" for name, out in saved.items())
    _print(args, summary, f"{answer.model} (version {answer.version}): {listed} -> {path}")
    return 0


def read_inputs(path: Path, model: dict[str, Any]) -> Any:
    """A batch of samples from a JSON, ``.npy``, ``.npz`` or image file, for the model
    described by ``model`` (its ``GET /v1/models/{name}`` answer): lists from JSON and
    pictures, an array from ``.npy`` (sent as a binary tensor), arrays by name from ``.npz``
    (sent as one ``.npz``) and a JSON object (lists by name). A single sample (of each input)
    becomes a batch of one."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "inputs" in data:
                data = data["inputs"]
        elif suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            data = load_npz(path)
        else:
            return [_image_sample(path, model)]
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    if isinstance(data, dict):
        shapes = {spec["name"]: spec["shape"] for spec in model["inputs"]}
        return {name: _batched(value, shapes.get(name)) for name, value in data.items()}
    return _batched(data, model["input_shape"])


def _batched(value: Any, sample_shape: list[int] | None) -> Any:
    """``value`` as a batch: one sample (of the input's sample shape) becomes a batch of one."""
    try:
        shape = list(np.shape(value))
    except ValueError:  # ragged: the server says exactly what is wrong
        return value
    if shape != sample_shape:
        return value
    return value[None] if isinstance(value, np.ndarray) else [value]


def _image_sample(path: Path, model: dict[str, Any]) -> Any:
    """One sample from a picture file, by the recipe the model's description states."""
    try:
        with Image.open(path) as image:
            return image_sample(image, model)
    except UnidentifiedImageError:
        raise CliError(f"cannot read {path}: not .json, .npy, .npz or an image") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _upload(client: ModelportClient, args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise CliError(f"no such file: {path}")
    # disable=None: the bar shows on a terminal only, so logs and pipes get clean lines.
    with tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=path.name,
        file=sys.stderr,
        disable=None,
    ) as bar:

        def progress(sent: int, _total: int) -> None:
            bar.update(sent - bar.n)

        answer = client.upload(
            args.model, path, activate=not args.no_activate, sha256=args.sha256, progress=progress
        )
    _print(args, answer, upload_report(answer))
    return 0


def upload_report(answer: dict[str, Any]) -> str:
    """What an upload became and what was checked before it could serve."""
    state = "active" if answer["active"] else "stored, not active"
    novelty = "new version" if answer["created"] else "identical to an existing version"
    report = answer["report"]
    lines = [
        f"{answer['model']}: version {answer['version']} ({novelty}, {state})",
        f"  sha256      {answer['sha256']}",
        f"  size        {answer['size']} bytes ({answer['format']})",
    ]
    if "loaded_keys" in report:
        strict = "strict" if report.get("strict") else "non-strict"
        lines.append(f"  keys        {report['loaded_keys']} loaded ({strict})")
    if "smoke_test" in report:
        lines.append(f"  smoke test  {report['smoke_test']}")
    acceptance = report.get("acceptance")
    if acceptance:
        lines.append(
            f"  acceptance  {acceptance['metric']} {acceptance['score']} "
            f"(required {acceptance['threshold']})"
        )
    return "\n".join(lines)


def _versions(client: ModelportClient, args: argparse.Namespace) -> int:
    answer = client.versions(args.model)
    rows = [("VERSION", "SOURCE", "CREATED", "FILE", "")]
    for v in answer["versions"]:
        flag = "active" if v["active"] else "previous" if v["previous"] else ""
        rows.append((v["version"], v["source"], v["created_at"][:19], v["filename"] or "-", flag))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    text = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, [*widths, 0], strict=True)).rstrip()
        for row in rows
    )
    _print(args, answer, text)
    return 0


def _activate(client: ModelportClient, args: argparse.Namespace) -> int:
    answer = client.activate(args.model, args.version)
    _print(args, answer, f"{args.model}: version {answer['version']} is active")
    return 0


def _rollback(client: ModelportClient, args: argparse.Namespace) -> int:
    answer = client.rollback(args.model)
    _print(args, answer, f"{args.model}: rolled back to version {answer['version']}")
    return 0


def _delete(client: ModelportClient, args: argparse.Namespace) -> int:
    client.delete(args.model, args.version)
    answer = {"model": args.model, "version": args.version, "deleted": True}
    _print(args, answer, f"{args.model}: version {args.version} deleted")
    return 0


def _history(client: ModelportClient, args: argparse.Namespace) -> int:
    answer = client.history(args.model, limit=args.limit)
    rows: list[tuple[str, ...]] = [("SEQ", "AT", "ACTION", "FROM", "TO", "CLIENT")]
    for e in answer["entries"]:
        cells = (e["from_version"], e["to_version"], e["client"])
        rows.append((str(e["seq"]), e["at"][:19], e["action"], *(c or "-" for c in cells)))
    _print(args, answer, _table(rows))
    return 0


def _table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns two spaces apart, without trailing spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _health(client: ModelportClient, args: argparse.Namespace) -> int:
    answer = client.health()
    unavailable = answer.get("unavailable", {})
    lines = ["ready" if answer["ready"] else "not ready"]
    lines += [
        f"  {name}: {state}" + (f": {unavailable[name]}" if name in unavailable else "")
        for name, state in answer["models"].items()
    ]
    _print(args, answer, "\n".join(lines))
    return 0 if answer["ready"] else 1


_COMMANDS: dict[str, Callable[[ModelportClient, argparse.Namespace], int]] = {
    "predict": _predict,
    "upload": _upload,
    "versions": _versions,
    "activate": _activate,
    "rollback": _rollback,
    "delete": _delete,
    "history": _history,
    "health": _health,
}
