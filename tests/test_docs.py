"""The documentation runs: every fenced block of README.md and docs/*.md is executed or checked,
in document order, against a real server started for its page, and every relative link resolves.

How a block is treated, by its language and the HTML comment on the line before it (a directive):

- ``bash`` / ``sh`` / ``console``: run by bash (``set -euo pipefail``) in the page's sandbox (a
  copy of ``models/``, ``weights/``, ``scripts/`` and ``modelport.toml``, ``.venv`` linked, the
  server's admin token in ``.admin-token``), with ``127.0.0.1:8000`` / ``localhost:8000`` pointed
  at the page's server, other ``800N`` ports at free ones, and ``MODELPORT_URL`` set for the CLI.
  Comment lines right after a command are that command's expected output (stdout and stderr):
  each line must match one line, ``...`` matching anything within a line and a ``...`` line any
  number of lines. A comment after a blank line explains, and is not checked. A command ending in
  ``&`` runs in the background; anything still running when the block ends is stopped.
- ``python``: run by the venv's interpreter, in the sandbox, with the same ports.
- ``toml``: parsed; a ``[[models]]`` file is also checked with ``load_service_config``.
- ``json`` / ``yaml``: parsed. ``promql``: every metric it names is in the server's ``/metrics``.
- ``<!-- output -->`` before a ``text`` or ``json`` block: the expected output of the block before
  it (of its last command, for a shell block; ``text``: matched as comment lines are; ``json``: the
  same keys, recursively).
- ``<!-- server-log -->`` before a ``text`` block: lines the page's server has logged (each
  matched as comment lines are).
- ``<!-- file: PATH -->`` before a block: written to PATH in the sandbox, for later blocks.
- ``<!-- service -->`` before a bash block: it starts the service in the foreground; it runs on a
  free port until ``/health/ready`` answers 200, then gets SIGTERM and must shut down cleanly.
- ``<!-- not-run: REASON (EXPLANATION) -->``: not run, for one of the REASONS only.
- A block with no language is a figure (a diagram, a layout): nothing to run, and it must hold no
  command.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import ServedModelConfig, Settings, load_service_config
from tests.helpers import (
    ROOT,
    ServerProcess,
    clean_env,
    free_port,
    run_server,
)

pytestmark = pytest.mark.process

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_IDS = [str(page.relative_to(ROOT)) for page in PAGES]

REASONS = {
    "docker": ("covered by the image check in .ci/run", r"\bdocker\b"),
    "kubectl": ("covered by tests/test_deploy.py offline manifest validation", r"\bkubectl\b"),
    "make": ("the commands CI runs, or too long", r"\bmake (run|test|bench)\b|\bpytest\b"),
    "train": (
        "needs scikit-learn, the train extra, which make test does not install",
        r"scripts/train_digits\.py",
    ),
}
"""Why a block may be left unrun: its explanation, and what the block must contain to use it."""

SHELLS = {"bash", "sh", "console"}
KNOWN = SHELLS | {"python", "toml", "json", "yaml", "promql", "text", ""}
COMMAND = re.compile(r"^\s*(\$ |curl |\.venv/|python3? |pip |make |docker |kubectl )", re.M)
"""What a figure must not hold: a line that reads as a command."""
SANDBOX_COPIES = ("models", "weights", "scripts", "modelport.toml")
BLOCK_TIMEOUT_S = 60
CLIENT_ONLY_SETTINGS = {"MODELPORT_URL"}
"""Read by the client and the CLI, not by the server's Settings."""

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
DIRECTIVE = re.compile(r"^<!--\s*(?P<body>.*?)\s*-->$")
NOT_RUN = re.compile(r"^not-run:\s*(?P<reason>[\w-]+)\s*\((?P<why>.+)\)$")
LOCAL_PORT = re.compile(
    r"(?<=127\.0\.0\.1:)(800\d)\b|(?<=localhost:)(800\d)\b|(?<=--port )(800\d)\b"
)


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: Path
    line: int
    lang: str
    text: str
    directive: str | None

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order, each with the directive just before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            body.append(lines[end][indent:] if lines[end][:indent].isspace() else lines[end])
            end += 1
        assert end < len(lines), f"{page.name}:{index + 1}: unclosed fence"
        before = next((ln.strip() for ln in reversed(lines[:index]) if ln.strip()), "")
        comment = DIRECTIVE.match(before)
        words = opening["info"].split()
        found.append(
            Block(
                page=page,
                line=index + 1,
                lang=words[0] if words else "",
                text="\n".join(body) + "\n",
                directive=comment["body"] if comment else None,
            )
        )
        index = end + 1
    return found


# --- expected output ----------------------------------------------------------------------------


def _pattern(line: str) -> re.Pattern[str] | None:
    """A line of expected output as a regex (None for a lone ``...``: any number of lines)."""
    if line.strip() == "...":
        return None
    return re.compile(".*".join(re.escape(part) for part in line.split("...")))


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.replace("\r", "").splitlines() if ln.strip()]


def matches(expected: list[str], actual_text: str) -> bool:
    """Whether the output ``actual_text`` is the ``expected`` lines (with ``...`` wildcards)."""
    patterns = [_pattern(line) for line in expected if line.strip()]
    actual = _lines(actual_text)

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(patterns):
            return j == len(actual)
        pattern = patterns[i]
        if pattern is None:
            return any(match(i + 1, k) for k in range(j, len(actual) + 1))
        return j < len(actual) and bool(pattern.fullmatch(actual[j])) and match(i + 1, j + 1)

    return match(0, 0)


def same_keys(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Where the keys of two JSON documents differ (objects recursively, lists by their first
    item)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        problems = []
        if set(expected) != set(actual):
            only_shown, only_got = set(expected) - set(actual), set(actual) - set(expected)
            problems.append(
                f"{path}: the docs show {sorted(only_shown)} that the answer lacks,"
                f" the answer has {sorted(only_got)} that the docs lack"
            )
        for key in set(expected) & set(actual):
            problems += same_keys(expected[key], actual[key], f"{path}.{key}")
        return problems
    if isinstance(expected, list) and isinstance(actual, list) and expected and actual:
        return same_keys(expected[0], actual[0], f"{path}[0]")
    if isinstance(expected, dict | list) != isinstance(actual, dict | list):
        return [f"{path}: the docs show {type(expected).__name__}, the answer {actual!r}"]
    return []


# --- shell blocks -------------------------------------------------------------------------------


@dataclass
class _Scan:
    """Where a shell line leaves a multi-line construct: quotes, a heredoc, a continuation."""

    single: bool = False
    double: bool = False
    heredoc: str | None = None
    continued: bool = False

    @property
    def open(self) -> bool:
        return self.single or self.double or self.heredoc is not None or self.continued

    def feed(self, line: str) -> None:
        if self.heredoc is not None:
            if line.strip() == self.heredoc:
                self.heredoc = None
            return
        escaped = False
        for position, char in enumerate(line):
            if escaped:
                escaped = False
            elif self.single:
                self.single = char != "'"
            elif char == "\\":
                escaped = True
            elif char == '"':
                self.double = not self.double
            elif self.double:
                continue
            elif char == "'":
                self.single = True
            elif char == "#" and (position == 0 or line[position - 1].isspace()):
                break
        self.continued = line.rstrip().endswith("\\") and not self.single
        if not (self.single or self.double):
            heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
            if heredoc:
                self.heredoc = heredoc[1]


MARK = "@@docs-test-mark@@"


def _console_to_bash(text: str) -> str:
    """``$ command`` lines with their output under them, as a bash block with output comments."""
    out, command = [], False
    for line in text.splitlines():
        if line.startswith("$ ") or (command and out and out[-1].rstrip().endswith("\\")):
            out.append(line.removeprefix("$ "))
            command = True
        else:
            out.append(f"# {line}" if line.strip() else "")
            command = False
    return "\n".join(out) + "\n"


def shell_script(text: str) -> tuple[str, list[tuple[int, list[str]]]]:
    """The block as a bash script that marks where each top-level command begins, and the
    expected output of each command that has one: (the command's mark, its lines)."""
    script = [
        "set -euo pipefail",
        "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT",
    ]
    expected: list[tuple[int, list[str]]] = []
    scan = _Scan()
    marks = 0
    command: list[str] = []
    previous = "blank"  # what the last top-level line was: blank, comment, command, output

    def close_command() -> None:
        nonlocal marks
        if not command:
            return
        marks += 1
        script.append(f"printf '\\n{MARK}\\n'")
        last = command[-1].split(" #", 1)[0].rstrip()
        background = last.endswith("&") and not last.endswith("&&")
        # a foreground command's stderr joins its output; a background one keeps the block's
        script.extend(command if background else ["{", *command, "} 2>&1"])
        command.clear()

    for line in text.splitlines():
        if command and scan.open:
            command.append(line)
            scan.feed(line)
            continue
        stripped = line.strip()
        if not stripped:
            close_command()
            previous = "blank"
        elif stripped.startswith("#"):
            if previous in ("command", "output"):
                if previous == "command":
                    close_command()
                    expected.append((marks, []))
                expected[-1][1].append(stripped[2:] if stripped.startswith("# ") else "")
                previous = "output"
            else:
                previous = "comment"
        else:
            close_command()
            command.append(line)
            scan.feed(line)
            previous = "command"
    close_command()
    script.append(f"printf '\\n{MARK}\\n'")
    return "\n".join(script) + "\n", expected


def _run(
    args: list[str], cwd: Path, env: dict[str, str], stdin: str | None = None
) -> tuple[int, str, str]:
    """Run a command in its own process group; on a timeout, end the whole group."""
    process = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(stdin, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        err += f"\n(ended after {BLOCK_TIMEOUT_S}s)"
        return -1, out, err
    return process.returncode, out, err


# --- one page -----------------------------------------------------------------------------------


@dataclass
class PageRun:
    """The sandbox, server and ports that one page's blocks share, in document order."""

    page: Path
    tmp: Path
    server: ServerProcess | None = None
    last_output: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def sandbox(self) -> Path:
        return self.tmp / "work"

    def prepare(self) -> None:
        self.sandbox.mkdir()
        for name in SANDBOX_COPIES:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(
                    source, self.sandbox / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(source, self.sandbox / name)
        (self.sandbox / ".venv").symlink_to(Path(sys.prefix))
        (self.sandbox / ".admin-token").write_text(self.token + "\n")

    def port_for(self, literal: str, service: bool) -> int:
        if literal == "8000" and not service:
            assert self.server is not None
            return self.server.port
        key = f"service:{literal}" if service else literal
        if key not in self.ports or service:
            self.ports[key] = free_port()
        return self.ports[key]

    def localised(self, text: str, service: bool = False) -> str:
        return LOCAL_PORT.sub(lambda m: str(self.port_for(m[0], service)), text)

    def env(self) -> dict[str, str]:
        variables = {"MODELPORT_STORE_DIR": str(self.sandbox / "store")}
        if self.server is not None:
            variables["MODELPORT_URL"] = self.server.url
        return clean_env(**variables)

    def needs_server(self, block: Block) -> bool:
        if block.directive == "server-log" or block.lang == "promql":
            return True
        runs = block.lang in SHELLS | {"python"} and block.directive is None
        # 8001: the server's gRPC door
        server = r"(127\.0\.0\.1|localhost):800[01]|bin/modelport "
        return runs and bool(re.search(server, block.text))

    # -- each kind of block

    def shell(self, block: Block) -> None:
        text = _console_to_bash(block.text) if block.lang == "console" else block.text
        script, expected = shell_script(self.localised(text))
        code, out, err = _run(["bash", "-c", script], self.sandbox, self.env())
        report = f"{block.where}: the block\n{block.text}\nprinted\n{out}\nstderr\n{err}"
        assert code == 0, f"exit status {code}; {report}"
        segments = out.split(f"\n{MARK}\n")
        for mark, lines in expected:
            assert matches(lines, segments[mark]), (
                f"{block.where}: expected\n" + "\n".join(lines) + f"\ngot\n{segments[mark]}"
            )
        assert '"internal_error"' not in out, report
        self.last_output = segments[-2] if len(segments) > 1 else ""  # the last command's

    def python(self, block: Block) -> None:
        python = str(self.sandbox / ".venv" / "bin" / "python")
        env = self.env()
        code, out, err = _run([python, "-"], self.sandbox, env, self.localised(block.text))
        assert code == 0, f"{block.where}: exit status {code}\n{out}\n{err}"
        self.last_output = out + err

    def output(self, block: Block) -> None:
        assert self.last_output is not None, f"{block.where}: no block before this output"
        if block.lang == "json":
            shown = json.loads(block.text)
            got = json.loads(self.last_output)
            problems = same_keys(shown, got)
            assert not problems, f"{block.where}: " + "; ".join(problems)
        else:
            assert block.lang == "text", f"{block.where}: an output block is text or json"
            assert matches(block.text.splitlines(), self.last_output), (
                f"{block.where}: expected\n{block.text}got\n{self.last_output}"
            )

    def server_log(self, block: Block) -> None:
        assert self.server is not None

        def logged() -> bool:
            log = _lines(self.server.output())
            return all(any(matches([want], have) for have in log) for want in _lines(block.text))

        deadline = time.monotonic() + 5  # the access log is written just after the answer
        while not logged():
            assert time.monotonic() < deadline, (
                f"{block.where}: not in the server's log:\n{block.text}\n{self.server.output()}"
            )
            time.sleep(0.05)

    def service(self, block: Block) -> None:
        assert block.lang in SHELLS, f"{block.where}: a service block is a shell command"
        text = self.localised(block.text, service=True)
        port = self.ports.get("service:8000")
        assert port is not None, f"{block.where}: a service block names its port, --port 8000"
        log = self.tmp / f"service-{port}.log"
        # the signal goes on to the service, and the service's exit status comes back
        script = (
            "trap 'kill -TERM $child' TERM\n"
            f"{text.strip()} &\n"
            "child=$!\n"
            "wait $child || true\n"
            "wait $child\n"
        )
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", script],
                cwd=self.sandbox,
                env=self.env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while not _answers(f"http://127.0.0.1:{port}/health/ready"):
                assert process.poll() is None, f"{block.where}: exited\n{log.read_text()}"
                assert time.monotonic() < deadline, f"{block.where}: not ready\n{log.read_text()}"
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            code = process.wait(40)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # the launcher exits 0; a bare uvicorn re-raises the signal once it has shut down
        clean = code == 0 or (
            code == 128 + signal.SIGTERM and "shutdown complete" in log.read_text()
        )
        assert clean, f"{block.where}: exit status {code} on SIGTERM\n{log.read_text()}"

    def write_file(self, block: Block, path: str) -> None:
        target = (self.sandbox / path).resolve()
        assert target.is_relative_to(self.sandbox.resolve()), f"{block.where}: {path} leaves"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text, encoding="utf-8")
        if block.lang == "python":
            compile(block.text, path, "exec")

    def toml(self, block: Block) -> None:
        document = tomllib.loads(block.text)
        if "models" in document:
            path = self.sandbox / f"docs-{block.line}.toml"
            path.write_text(block.text, encoding="utf-8")
            for model in load_service_config(path):
                assert model.weights.is_file(), f"{block.where}: no file {model.weights}"

    def promql(self, block: Block) -> None:
        assert self.server is not None
        scrape = httpx.get(f"{self.server.url}/metrics", timeout=10).text
        declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", scrape, re.MULTILINE))
        for name in sorted(set(re.findall(r"\bmodelport_\w+", block.text))):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            known = name in declared or declared.get(base) == "histogram"
            assert known, f"{block.where}: no metric {name} in /metrics"

    def run(self, block: Block) -> None:
        directive = block.directive or ""
        assert block.lang in KNOWN, f"{block.where}: unknown block language {block.lang!r}"
        if directive.startswith("not-run:"):
            check_not_run(block)
            return
        if self.server is None and self.needs_server(block):
            self.server = self.stack.enter_context(self.start_server())
        if directive.startswith("file:"):
            self.write_file(block, directive.removeprefix("file:").strip())
        elif directive == "output":
            self.output(block)
        elif directive == "server-log":
            self.server_log(block)
        elif directive == "service":
            self.service(block)
        elif directive:
            raise AssertionError(f"{block.where}: unknown directive <!-- {directive} -->")
        elif block.lang in SHELLS:
            self.shell(block)
        elif block.lang == "python":
            self.python(block)
        elif block.lang == "toml":
            self.toml(block)
        elif block.lang == "json":
            json.loads(block.text)
        elif block.lang == "yaml":
            import yaml

            yaml.safe_load(block.text)
        elif block.lang == "promql":
            self.promql(block)
        elif not block.lang:
            command = COMMAND.search(block.text)
            assert not command, f"{block.where}: a figure holding a command: {command[0]!r}"
        else:
            raise AssertionError(
                f"{block.where}: a text block is an output (<!-- output -->, <!-- server-log -->)"
                " or not run (<!-- not-run: ... -->)"
            )

    @contextlib.contextmanager
    def start_server(self) -> Iterator[ServerProcess]:
        folder = self.tmp / "server"
        folder.mkdir()
        config = self.sandbox / "modelport.toml"  # the bundled models, as `make run` serves
        # the gRPC door where the page's 127.0.0.1:8001 points
        grpc_port = str(self.port_for("8001", service=False))
        env = {"MODELPORT_ADMIN_TOKEN": self.token, "MODELPORT_GRPC_PORT": grpc_port}
        with run_server(folder, config, env=env) as server:
            yield server


def _answers(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def check_not_run(block: Block) -> None:
    """A block left unrun names one of the REASONS, with its explanation, and is that kind."""
    marked = NOT_RUN.match(block.directive or "")
    assert marked, f"{block.where}: write <!-- not-run: REASON (EXPLANATION) -->"
    reason, why = marked["reason"], marked["why"]
    assert reason in REASONS, f"{block.where}: {reason!r} is not one of {sorted(REASONS)}"
    explanation, needs = REASONS[reason]
    assert why == explanation, f"{block.where}: the reason {reason} reads ({explanation})"
    assert re.search(needs, block.text), f"{block.where}: a {reason} block without {reason}"


# --- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_block_of_the_page_runs_in_order_against_a_real_server(
    page: Path, tmp_path: Path
) -> None:
    run = PageRun(page, tmp_path)
    run.prepare()
    with run.stack:
        for block in blocks_of(page):
            run.run(block)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_blocks_left_unrun_say_why(page: Path) -> None:
    for block in blocks_of(page):
        if (block.directive or "").startswith("not-run"):
            check_not_run(block)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (and explicit ids), as GitHub names them."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading and not fenced:
            slug = _slug(heading[1])
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
        found.update(re.findall(r'<a (?:id|name)="([^"]+)"', line))
    return found


def links(page: Path) -> Iterator[tuple[int, str]]:
    """(line, target) of every Markdown link of ``page`` outside code."""
    fenced = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = re.sub(r"`[^`]*`", "", line)
        for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
            yield number, target
        for target in re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose):
            yield number, target


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_relative_link_points_to_a_file_and_anchor_that_exist(page: Path) -> None:
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{number}: {target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{number}: {target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def _table(page: Path, first_cell: str) -> dict[str, str]:
    """First cell -> second cell of the table rows whose first cell matches ``first_cell``."""
    rows = re.findall(
        rf"^\|\s*`({first_cell})`\s*\|\s*(.*?)\s*\|", page.read_text(encoding="utf-8"), re.M
    )
    return dict(rows)


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_configuration_lists_every_setting_with_its_default() -> None:
    page = ROOT / "docs" / "configuration.md"
    documented = _table(page, r"MODELPORT_[A-Z_]+")
    fields = {f"MODELPORT_{name.upper()}": info for name, info in Settings.model_fields.items()}
    assert set(documented) == set(fields), (
        f"missing: {sorted(set(fields) - set(documented))}; "
        f"not settings: {sorted(set(documented) - set(fields))}"
    )
    for variable, cell in documented.items():
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if literal:
            default = fields[variable].default
            assert literal[1] == _shown(default), f"{variable}: the docs say {cell}, not {default}"


def test_configuration_lists_every_field_of_the_toml_file() -> None:
    documented = _table(ROOT / "docs" / "configuration.md", r"[a-z_]+")
    fields = {info.alias or name for name, info in ServedModelConfig.model_fields.items()}
    assert set(documented) == fields


def test_every_setting_the_docs_name_exists() -> None:
    settings = {f"MODELPORT_{name.upper()}" for name in Settings.model_fields}
    for page in PAGES:
        named = set(re.findall(r"\bMODELPORT_[A-Z][A-Z0-9_]*[A-Z0-9]\b", page.read_text()))
        unknown = named - settings - CLIENT_ONLY_SETTINGS
        assert not unknown, f"{page.relative_to(ROOT)} names {sorted(unknown)}"


def test_make_targets_the_docs_name_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for page in PAGES:
        named = set(re.findall(r"(?:^|`|\) )make ([a-z][\w-]*)", page.read_text(), re.M))
        assert named <= targets, f"{page.relative_to(ROOT)}: no target {sorted(named - targets)}"
