"""Replicas converging on one version database: random management calls against three replicas
under predict load leave one consistent history that every replica serves; the database going
away costs readiness, never answers; a SIGKILL inside an upload's commit leaves a whole store;
and how fast replicas follow an activation, per backend (a printed figure, with the issue's
bound asserted for PostgreSQL)."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
import torch

from app.state.blobs import FolderBlobStore
from tests.helpers import (
    AUTH,
    BUNDLED,
    LINEAR,
    TOKEN,
    PredictLoad,
    ServerProcess,
    Weights,
    activate,
    all_serve,
    described,
    linear_weights,
    predict,
    replicas,
    run_server,
    saved,
    seeded_state_dict,
    upload,
    wait_until,
    write_config,
)
from tests.services import PostgresServer, postgres_server

pytestmark = pytest.mark.process

ADMIN = {"MODELPORT_ADMIN_TOKEN": TOKEN}
FAST_SYNC = ADMIN | {"MODELPORT_SYNC_INTERVAL_S": "0.2"}
CONVERGE_WITHIN_S = 1.0
"""The issue's bound: every replica serves an acknowledged change within a second."""
CONVERGE_UNDER_LOAD_S = 2.0
"""The same, while a predict load and a random management run share the two cores with the
three replicas and the polling test (0.56 s alone on the slower Intel machine, 1.12 s once under
the whole suite): not a speed figure; a follow loop several sync intervals late still crosses it."""
MOVES = ("activate", "rollback", "import")
"""History actions that move the active pointer (each from one version to another)."""


def padded_weights(seed: int, padding_mib: int) -> Weights:
    """Seeded linear weights whose weight is a view of a storage ``padding_mib`` large, which
    torch.save writes whole: a valid file of that size, slow to commit."""
    state = seeded_state_dict(seed)
    storage = torch.zeros(padding_mib * 1024 * 1024 // 4)
    storage[:20] = state["linear.weight"].flatten()
    state["linear.weight"] = storage[:20].view(2, 10)
    return Weights(saved(state))


def listed(server: ServerProcess) -> dict[str, Any]:
    """GET /v1/models/linear/versions."""
    body: dict[str, Any] = httpx.get(
        f"{server.url}/v1/models/linear/versions", headers=AUTH, timeout=5
    ).json()
    return body


def full_history(server: ServerProcess) -> list[dict[str, Any]]:
    """Every history entry, oldest first, paged to the end."""
    entries: list[dict[str, Any]] = []
    params: dict[str, int] = {"limit": 100}
    for _ in range(1000):
        page = httpx.get(
            f"{server.url}/v1/models/linear/history", headers=AUTH, params=params, timeout=5
        )
        assert page.status_code == 200, page.text
        body = page.json()
        entries.extend(body["entries"])
        if body["next_before"] is None:
            return entries[::-1]
        params["before"] = body["next_before"]
    raise AssertionError("the history never ended")


def seconds_until_each(
    servers: list[ServerProcess], condition: Callable[[ServerProcess], bool], timeout: float
) -> list[float]:
    """Poll every server every 50 ms; the seconds until ``condition`` first held for each."""
    started = time.monotonic()
    reached: dict[int, float] = {}

    def each_got_there() -> bool:
        for index, server in enumerate(servers):
            if index not in reached and condition(server):
                reached[index] = time.monotonic() - started
        return len(reached) == len(servers)

    wait_until(each_got_there, timeout, "every replica", every=0.05)
    return [reached[index] for index in range(len(servers))]


def ready_status(server: ServerProcess) -> int:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{server.url}/health/ready", timeout=2).status_code
    return 0


# --- 1. random management on three replicas -----------------------------------------------------

MANAGEMENT_ANSWERS = {200, 201, 204, 404, 409}
"""What a management call may answer while others race it: done, or refused as not found or
conflicting. Anything else (a 422 or 5xx) is a failure."""


@dataclass(frozen=True)
class Call:
    """One management call as the client saw it (times on the wall clock, as the history's)."""

    action: str
    version: str | None
    activate: bool
    status: int
    answered: str | None
    """The version in the answer, or the error body."""
    request_id: str | None
    started: float
    ended: float
    replica: int


def manage(
    http: httpx.Client, action: str, weights: Weights, version: str | None, activating: bool
) -> httpx.Response:
    """One management call: ``upload`` sends ``weights``; the others name ``version``."""
    if action == "upload":
        params = {"activate": "true" if activating else "false"}
        return http.put("/v1/models/linear/weights", content=weights.data, params=params)
    if action == "activate":
        return http.post(f"/v1/models/linear/versions/{version}/activate")
    if action == "rollback":
        return http.post("/v1/models/linear/rollback", params={"to": version} if version else {})
    return http.delete(f"/v1/models/linear/versions/{version}")


def operate(
    servers: list[ServerProcess], pool: list[Weights], seed: int, until: float
) -> list[Call]:
    """Random uploads, activations, rollbacks (to the previous version, or to one named) and
    deletes against random replicas until the monotonic time ``until``; every call recorded."""
    rng = random.Random(seed)
    targets = [w.version for w in pool] + [BUNDLED.version]
    calls: list[Call] = []
    clients = [httpx.Client(base_url=s.url, headers=AUTH, timeout=30) for s in servers]
    try:
        while time.monotonic() < until:
            replica = rng.randrange(len(servers))
            action = rng.choices(["upload", "activate", "rollback", "delete"], [3, 3, 2, 2])[0]
            weights, activating = rng.choice(pool), rng.random() < 0.6
            version: str | None = rng.choice(targets)
            if action == "upload":
                version = weights.version
            elif action == "rollback" and rng.random() < 0.7:
                version = None
            started = time.time()
            try:
                response = manage(clients[replica], action, weights, version, activating)
            except httpx.HTTPError as exc:
                status, request_id, answered = 0, None, repr(exc)
            else:
                status, request_id = response.status_code, response.headers.get("X-Request-ID")
                ok = status in (200, 201)
                answered = response.json()["version"] if ok else response.text[:300]
            ended = time.time()
            calls.append(
                Call(
                    action,
                    version,
                    activating,
                    status,
                    answered,
                    request_id,
                    started,
                    ended,
                    replica,
                )
            )
    finally:
        for client in clients:
            client.close()
    return calls


def active_at_some_point(
    moves: list[dict[str, Any]], version: str, started: float, ended: float
) -> bool:
    """Whether the chain of moves names ``version`` active at some moment of [started, ended]
    (wall clock, a little slack for the gap between a commit's timestamp and its commit)."""
    slack = 0.2
    current, since = BUNDLED.version, -math.inf
    spans = []
    for move in moves:
        at = datetime.fromisoformat(move["at"]).timestamp()
        spans.append((since, at, current))
        current, since = move["to_version"], at
    spans.append((since, math.inf, current))
    return any(
        active == version and low <= ended + slack and high >= started - slack
        for low, high, active in spans
    )


def test_random_management_on_three_replicas_leaves_one_history_that_every_replica_serves(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    pool = [linear_weights(seed) for seed in range(100, 106)]
    database = postgres.new_database()
    store = tmp_path / "store"
    with replicas(tmp_path, 3, MODELPORT_DATABASE_URL=database, **FAST_SYNC) as servers:
        with PredictLoad(servers, pause_s=0.005).running() as load:
            until = time.monotonic() + 8.0
            with ThreadPoolExecutor(4) as pool_of_clients:
                futures = [
                    pool_of_clients.submit(operate, servers, pool, seed, until) for seed in range(4)
                ]
                calls = sorted((c for f in futures for c in f.result()), key=lambda c: c.ended)
            last_action = max(call.ended for call in calls)
            final = described(servers[0])["active_version"]

            def every_replica_serves_final() -> bool:
                return all_serve(servers, final)() and all(
                    predict(server)[0] == final for server in servers
                )

            wait_until(every_replica_serves_final, 5.0, f"every replica serving {final}")
            converged_after = time.time() - last_action
            load.wait_for(final)  # and the load goes on, answered by it everywhere
        history = full_history(servers[1])
        versions = listed(servers[2])
        infos = [described(server) for server in servers]

    statuses: dict[str, dict[int, int]] = {}
    for call in calls:
        counts = statuses.setdefault(call.action, {})
        counts[call.status] = counts.get(call.status, 0) + 1
    print(
        f"\nrandom management: {len(calls)} calls {statuses}, {len(load.every())} predicts, "
        f"{len(history)} history entries, converged {converged_after:.3f}s after the last"
    )

    assert not load.failures(), f"predicts failed: {load.failures()[:5]}"
    assert {answer.server for answer in load.every()} == {0, 1, 2}
    assert sum(1 for c in calls if c.status in (200, 201, 204)) > 20, "too little happened"

    # one chain of moves, ending where the database and every replica are
    moves = [entry for entry in history if entry["action"] in MOVES]
    assert moves, "no activation happened"
    position = BUNDLED.version
    for move in moves:
        assert move["from_version"] == position, f"a move that does not chain: {move}"
        position = move["to_version"]
    assert final == position == versions["active"]
    assert converged_after <= CONVERGE_UNDER_LOAD_S, f"converged after {converged_after:.2f}s"
    for info in infos:
        assert info["version"] == info["active_version"] == final

    # every acknowledged change is in the history, under its request id
    by_request: dict[str, list[dict[str, Any]]] = {}
    for entry in history:
        by_request.setdefault(str(entry["request_id"]), []).append(entry)
    for call in calls:
        recorded = by_request.get(str(call.request_id), [])
        if call.action == "upload" and call.status == 201:
            uploads = [e for e in recorded if e["action"] == "upload"]
            assert [e["to_version"] for e in uploads] == [call.version], call
        if call.action == "delete" and call.status == 204:
            deletes = [e for e in recorded if e["action"] == "delete"]
            assert [e["from_version"] for e in deletes] == [call.version], call
        moved = call.action in ("activate", "rollback") and call.status == 200
        moved |= call.action == "upload" and call.activate and call.status in (200, 201)
        if not moved:
            continue
        action = "rollback" if call.action == "rollback" else "activate"
        entries = [e for e in recorded if e["action"] == action]
        if entries:
            assert [e["to_version"] for e in entries] == [call.answered], call
        else:  # activating the version already active records nothing; it was active then
            assert call.action != "rollback", f"an acknowledged rollback is not recorded: {call}"
            assert active_at_some_point(moves, str(call.answered), call.started, call.ended), (
                f"acknowledged, not recorded, and not active meanwhile: {call}"
            )

    # what exists is what the acknowledged uploads and deletes left
    stored = {v["version"]: v for v in versions["versions"]}
    for weights in pool:
        existence = [
            e["action"] == "upload"
            for e in history
            if (e["action"] == "upload" and e["to_version"] == weights.version)
            or (e["action"] in ("delete", "retention") and e["from_version"] == weights.version)
        ]
        assert (weights.version in stored) == (existence[-1] if existence else False), weights
    for call in calls:
        if call.action == "upload" and call.status in (200, 201) and call.version not in stored:
            assert any(
                d.action == "delete"
                and d.status == 204
                and d.version == call.version
                and d.ended > call.started
                for d in calls
            ), f"an acknowledged upload vanished without an acknowledged delete: {call}"
    blobs = FolderBlobStore(store / "blobs")
    for version in stored.values():
        if version["source"] != "bundled":
            assert blobs.fetch(version["sha256"]).read_bytes() in {w.data for w in pool}
    assert list((store / "linear" / "incoming").iterdir()) == []
    unexpected = [c for c in calls if c.status not in MANAGEMENT_ANSWERS]
    assert not unexpected, f"{len(unexpected)} unexpected answers: {unexpected[:5]}"


# --- 2. the database goes away and comes back ----------------------------------------------------


def test_postgresql_down_keeps_predictions_answering_and_readiness_returns_by_itself(
    tmp_path: Path,
) -> None:
    new = linear_weights(201)
    max_age_s = 2.0
    with postgres_server() as database:
        env = {
            "MODELPORT_DATABASE_URL": database.new_database(),
            "MODELPORT_MAX_SYNC_AGE_S": str(max_age_s),
        } | FAST_SYNC
        with replicas(tmp_path, 2, **env) as servers:
            stored = upload(servers[0], new.data, activate="false")
            assert stored.status_code == 201, stored.text
            with PredictLoad(servers, pause_s=0.005).running() as load:
                database.stop()
                turned = seconds_until_each(servers, lambda s: ready_status(s) == 503, 8.0)
                # what is checked is that readiness stays 503 while the database is down: a
                # stretch of time, not an event to wait for
                time.sleep(1.0)
                still_down = [ready_status(server) for server in servers]
                database.start()
                back = seconds_until_each(servers, lambda s: ready_status(s) == 200, 10.0)
            served_meanwhile = {answer.version for answer in load.every()}
            activated = activate(servers[1], new.version)
            followed = wait_until(all_serve(servers, new.version), 5.0, "following")
            answers = [predict(server)[0] for server in servers]

    print(
        f"\ndatabase down: 503 after {[round(t, 2) for t in turned]}s (max age {max_age_s}s), "
        f"200 again {[round(t, 2) for t in back]}s after the restart, "
        f"{len(load.every())} predicts meanwhile; activation followed in {followed:.3f}s"
    )
    assert not load.failures(), f"predicts failed: {load.failures()[:5]}"
    assert {answer.server for answer in load.every()} == {0, 1}
    assert served_meanwhile == {BUNDLED.version}
    for seconds in turned:  # the last read can be up to one sync interval before the stop
        assert max_age_s - 0.5 <= seconds <= max_age_s + 2.0
    assert still_down == [503, 503]
    assert max(back) <= 5.0
    assert activated.status_code == 200, activated.text
    assert answers == [new.version] * 2
    assert followed <= CONVERGE_WITHIN_S


# --- 3. SIGKILL inside an upload's commit ---------------------------------------------------------

KILL_POINTS = ("body sent", "blob being written", "waiting for the database", "version recorded")
"""Where an upload is when its server is killed: its body received, being validated; its blob's
temporary file being written (this one races the server: what was reached is reported); its
blob in place and its first transaction waiting for the model's lock, which this test holds;
its version recorded and its activation waiting for that lock, which this test took in turn."""
MODEL_LOCK = "SELECT pg_advisory_lock(hashtext('linear'))"
"""The lock every write transaction on the model takes first (as a session lock here)."""


def waiting_for_locks(connection: psycopg.Connection[Any]) -> int:
    """Lock requests waiting on advisory locks in this connection's database."""
    query = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    row = connection.execute(query).fetchone()
    return int(row[0]) if row else 0


def kill_during_upload(
    server: ServerProcess, url: str, store: Path, weights: Weights, point: str
) -> str:
    """Upload ``weights`` to ``server`` (on the database ``url``, blobs in ``store``) and
    SIGKILL it once ``point`` is reached; says where the upload was (or that it was answered
    first)."""
    sent = threading.Event()
    answer: list[int] = []

    def body() -> Iterator[bytes]:
        step = 1 << 20
        for offset in range(0, len(weights.data), step):
            yield weights.data[offset : offset + step]
        sent.set()

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.put(
                f"{server.url}/v1/models/linear/weights",
                content=body(),
                headers=AUTH | {"Content-Length": str(len(weights.data))},
                timeout=30,
            )
            answer.append(response.status_code)

    def until(condition: Callable[[], bool]) -> None:
        # a spin (no pause between polls): a temporary blob lives for milliseconds
        wait_until(lambda: answer or condition(), 15, f"{point}: never reached", every=0)

    holder = psycopg.connect(url, autocommit=True)
    next_in_line = psycopg.connect(url, autocommit=True)
    sender = threading.Thread(target=send)
    try:
        if point in ("waiting for the database", "version recorded"):
            holder.execute(MODEL_LOCK)
        sender.start()
        if point == "body sent":
            until(sent.is_set)
        elif point == "blob being written":
            until(lambda: any((store / "blobs").glob(".incoming-*")))
        else:
            until(lambda: waiting_for_locks(holder) == 1)  # the upload's first transaction
        if point == "version recorded":
            # queued behind the upload's first transaction, so ahead of its next one (FIFO)
            queued = threading.Thread(target=next_in_line.execute, args=(MODEL_LOCK,))
            queued.start()
            until(lambda: waiting_for_locks(holder) == 2)
            holder.execute("SELECT pg_advisory_unlock_all()")
            queued.join(15)
            until(lambda: waiting_for_locks(holder) == 1)  # the activation waits
        status = server.stop(signal.SIGKILL)
        assert answer or status == -signal.SIGKILL
    finally:
        server.stop(signal.SIGKILL)
        if sender.ident is not None:
            sender.join()
        holder.close()
        next_in_line.close()
    return f"answered {answer[0]} first" if answer else point


def check_whole(server: ServerProcess, store: Path, whole: dict[str, Weights]) -> dict[str, Any]:
    """After a restart: nothing staged is left, every recorded version has its whole blob, and
    the active version serves; returns the version list, with the blob store's temporary
    files (half-written blobs) under ``half_written``."""
    versions = listed(server)
    assert predict(server)[0] == versions["active"]
    staged = [p.name for p in (store / "linear" / "incoming").iterdir()]
    assert not staged, f"staged uploads left: {staged}"
    versions["half_written"] = [p.name for p in (store / "blobs").rglob(".*")]
    blobs = FolderBlobStore(store / "blobs")
    for version in versions["versions"]:
        if version["source"] != "bundled":  # recorded means stored whole
            stored = blobs.fetch(version["sha256"]).read_bytes()
            assert stored == whole[version["sha256"]].data, version
    return versions


def test_sigkill_inside_an_upload_commit_leaves_only_whole_versions_and_the_acknowledged_one(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    config = write_config(tmp_path, LINEAR)
    store = tmp_path / "store"
    url = postgres.new_database()
    env = {"MODELPORT_ADMIN_TOKEN": TOKEN, "MODELPORT_DATABASE_URL": url}
    acknowledged = linear_weights(300)
    killed = [padded_weights(301 + i, padding_mib=24) for i in range(len(KILL_POINTS))]
    whole = {w.sha256: w for w in [acknowledged, *killed]}
    reached: list[str] = []
    found: list[dict[str, Any]] = []
    for index, (point, weights) in enumerate(zip(KILL_POINTS, killed, strict=True)):
        with run_server(tmp_path, config, env=env) as server:
            if index == 0:
                done = upload(server, acknowledged.data)
                assert done.status_code == 201, done.text
            else:  # the restart after the kill before
                found.append(check_whole(server, store, whole))
            reached.append(kill_during_upload(server, url, store, weights, point))
    with run_server(tmp_path, config, env=env) as server:
        found.append(check_whole(server, store, whole))
        every = [v["version"] for v in found[-1]["versions"]]
        for version in every:
            activated = activate(server, version)
            assert activated.status_code == 200, activated.text
            assert predict(server)[0] == version

    print(
        f"\nSIGKILL during uploads, killed at: {reached}; "
        f"active after each restart: {[v['active'] for v in found]}"
    )
    active, stored = acknowledged.version, {BUNDLED.version, acknowledged.version}
    for weights, point, outcome, versions in zip(killed, KILL_POINTS, reached, found, strict=True):
        if outcome.startswith("answered"):  # it raced the kill and won: acknowledged
            active = weights.version
        if outcome.startswith("answered") or point == "version recorded":
            stored.add(weights.version)
        assert versions["active"] == active, f"after a kill at {outcome}"
        assert {v["version"] for v in versions["versions"]} == stored, f"after a kill at {outcome}"
    half_written = {o: v["half_written"] for o, v in zip(reached, found, strict=True)}
    assert not any(half_written.values()), f"half-written blobs left: {half_written}"


# --- 4. how fast the replicas follow ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_replicas_follow_an_activation_on_one_of_them(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """A figure: seconds from an acknowledged activation on replica A until all three serve it,
    with the default sync interval (2 s) and readiness. Asserted: the issue's bound on
    PostgreSQL, where replicas are told of each change (LISTEN/NOTIFY)."""
    rounds = 8 if backend == "sqlite" else 20  # polling every 2 s: each SQLite round is ~2 s
    pauses = random.Random(4).uniform
    env = dict(ADMIN)
    if backend == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        env["MODELPORT_DATABASE_URL"] = server.new_database()
    pair = [linear_weights(401), linear_weights(402)]
    with replicas(tmp_path, 3, **env) as servers:
        for weights in pair:
            stored = upload(servers[0], weights.data, activate="false")
            assert stored.status_code == 201, stored.text
        figures = []
        for index in range(rounds):
            version = pair[index % 2].version
            if backend == "sqlite":
                # the figure is over the phases of the replicas' polling period: this pause
                # picks one at random, it waits for nothing
                time.sleep(pauses(0.0, 2.0))
            activated = activate(servers[0], version)
            assert activated.status_code == 200, activated.text
            figures.append(wait_until(all_serve(servers, version), 10.0, f"round {index}"))

    p50, p99 = np.percentile(figures, [50, 99])
    print(
        f"\nconvergence on {backend}: {rounds} activations, p50 {p50:.3f}s, p99 {p99:.3f}s, "
        f"max {max(figures):.3f}s"
    )
    if backend == "postgresql":
        assert max(figures) <= CONVERGE_WITHIN_S, f"slowest: {max(figures):.3f}s"
