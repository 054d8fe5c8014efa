"""The container image and the Kubernetes manifests: valid offline, and true to the service."""

from __future__ import annotations

import fnmatch
import math
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import validate

from app.config import Settings
from app.routes.health import router as health_router

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# The oldest Kubernetes the manifests support and the newest schema kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
SECRET_DEFAULT_MIN_LENGTH = 32


def _manifest_files() -> list[Path]:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    return [f for f in files if f.name != "kustomization.yaml"]


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _applied() -> list[dict[str, Any]]:
    """The resources `kubectl apply -k deploy/` creates."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    return [doc for name in kustomization["resources"] for doc in _documents(DEPLOY / name)]


def _only(kind: str) -> dict[str, Any]:
    found = [doc for doc in _applied() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _only("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _quantity(value: str | int) -> float:
    """A Kubernetes CPU or memory quantity as a number (cores or bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6}
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#") and not logical:
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        if logical.strip():
            instruction, _, arguments = logical.strip().partition(" ")
            if instruction.upper() == "FROM":
                stages.append([])
            if stages:
                stages[-1].append((instruction.upper(), arguments.strip()))
        logical = ""
    return stages


def _final_stage(instruction: str) -> list[str]:
    return [args for ins, args in _dockerfile_stages()[-1] if ins == instruction]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _final_stage("ENV"):
        for pair in shlex.split(args):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must work offline: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_strictly_against_the_pinned_kubernetes_schema(
    path: Path, version: str
) -> None:
    documents = _documents(path)
    assert documents, f"{path} holds no resource"
    for document in documents:
        # strict: unknown or misspelt fields are errors, not silently dropped by the API server
        validate(document, version, strict=True)


def test_kustomization_applies_every_manifest_except_the_examples() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    top_level = {p.name for p in _manifest_files() if p.parent == DEPLOY}
    assert listed == top_level
    kinds = {doc["kind"] for doc in _applied()}
    assert {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    } <= kinds
    assert "Secret" not in kinds, "the example Secret must not be applied with its placeholder"


def test_replicas_autoscaler_disruption_budget_and_service_all_select_the_deployment() -> None:
    deployment = _only("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2

    hpa = _only("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]

    pdb = _only("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable", 0) < deployment["spec"]["replicas"]

    service = _only("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()


def test_probes_use_the_service_health_endpoints_on_its_port() -> None:
    container = _container()
    env = _env(container)
    routes = {getattr(route, "path", None) for route in health_router.routes}
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = int(env["MODELPORT_PORT"]["value"])
    assert port == Settings.model_fields["port"].default == 8000
    assert list(named_ports.values()) == [port]

    expected = {
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
        "startupProbe": "/health/live",
    }
    for probe, path in expected.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path
        assert path in routes
        assert named_ports.get(http_get["port"], http_get["port"]) == port
    assert env["MODELPORT_HOST"]["value"] == "0.0.0.0"


def test_admin_token_comes_from_a_secret_reference_never_inline() -> None:
    token = _env(_container())["MODELPORT_ADMIN_TOKEN"]
    assert "value" not in token
    reference = token["valueFrom"]["secretKeyRef"]
    for document in _applied():
        text = yaml.safe_dump(document)
        assert "stringData" not in text
        assert "kind: Secret" not in text

    [example] = _documents(DEPLOY / "examples" / "admin-token-secret.yaml")
    assert example["kind"] == "Secret"
    assert example["metadata"]["name"] == reference["name"]
    placeholder = example["stringData"][reference["key"]]
    # too short for MODELPORT_ADMIN_TOKEN: a forgotten placeholder stops startup, never serves
    minimum = next(
        m.min_length
        for m in Settings.model_fields["admin_token"].metadata
        if hasattr(m, "min_length")
    )
    assert minimum == SECRET_DEFAULT_MIN_LENGTH
    assert len(placeholder) < minimum
    assert placeholder.isupper()


def test_store_is_a_read_write_many_claim_mounted_where_store_dir_points() -> None:
    pvc = _only("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = _only("Deployment")["spec"]["template"]["spec"]
    container = _container()
    [store_volume] = [
        v["name"]
        for v in pod["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    ]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == store_volume]
    store_dir = _env(container)["MODELPORT_STORE_DIR"]["value"]
    assert mount["mountPath"] == store_dir
    assert not mount.get("readOnly", False)
    # the same directory the image declares and points the service at
    assert _dockerfile_env()["MODELPORT_STORE_DIR"] == store_dir
    assert any(store_dir in args for args in _final_stage("VOLUME"))


def test_pod_runs_as_the_image_non_root_user_with_a_read_only_root_filesystem() -> None:
    pod = _only("Deployment")["spec"]["template"]["spec"]
    container = _container()
    [user] = _final_stage("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "USER must be numeric for runAsNonRoot to check it"
    assert int(uid) != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["fsGroup"] == int(gid or uid)
    assert pod["automountServiceAccountToken"] is False

    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    [tmp_volume] = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in tmp_volume


def test_resources_are_bounded_and_torch_threads_follow_the_cpu_limit() -> None:
    container = _container()
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    for resource in ("cpu", "memory"):
        assert _quantity(requests[resource]) <= _quantity(limits[resource])
    threads = _env(container)["MODELPORT_TORCH_THREADS"]
    if "valueFrom" in threads:
        field = threads["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu"
        assert field["containerName"] == container["name"]
        assert _quantity(field.get("divisor", "1")) == 1
    else:
        assert 1 <= int(threads["value"]) <= math.ceil(_quantity(limits["cpu"]))


def test_termination_grace_covers_the_pre_stop_sleep_and_the_service_drain() -> None:
    pod = _only("Deployment")["spec"]["template"]["spec"]
    container = _container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(_env(container)["MODELPORT_SHUTDOWN_GRACE_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain


def test_every_modelport_variable_set_in_the_image_or_deployment_is_a_setting() -> None:
    fields = {f"MODELPORT_{name.upper()}" for name in Settings.model_fields}
    names = set(_dockerfile_env()) | set(_env(_container()))
    used = {n for n in names if n.startswith("MODELPORT_")}
    assert used, "no MODELPORT_* settings found"
    assert used <= fields, f"not settings: {sorted(used - fields)}"


def test_dockerfile_is_multi_stage_non_root_healthchecked_with_port_and_volume() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    assert _final_stage("EXPOSE") == ["8000"]
    assert _final_stage("USER")
    assert _final_stage("VOLUME")
    [healthcheck] = _final_stage("HEALTHCHECK")
    assert "/health/ready" in healthcheck
    assert "urllib" in healthcheck  # no curl or wget in the image
    env = _dockerfile_env()
    assert env["MODELPORT_HOST"] == "0.0.0.0"
    assert Path(env["MODELPORT_CONFIG"]).name == "modelport.toml"
    # CPU torch by default, another index or a local wheel folder by build argument
    build_args = {
        args.partition("=")[0]: args.partition("=")[2]
        for stage in stages
        for ins, args in stage
        if ins == "ARG"
    }
    assert build_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert "TORCH_FIND_LINKS" in build_args
    assert re.fullmatch(r"\d+\.\d+\.\d+", build_args["TORCH_VERSION"])


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            ignored = not negated
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".venv/bin/python", True),
        (".git/config", True),
        ("store/linear/active.json", True),
        ("tests/test_api.py", True),
        (".pytest_cache/v/cache", True),
        (".admin-token", True),
        ("app/__pycache__/main.cpython-311.pyc", True),
        ("wheels/notes.txt", True),
        ("deploy/deployment.yaml", True),
        ("wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", False),
        ("app/main.py", False),
        ("models/digits.py", False),
        ("weights/digits.pth", False),
        ("modelport.toml", False),
        ("pyproject.toml", False),
    ],
)
def test_dockerignore_keeps_local_state_and_secrets_out_of_the_build_context(
    path: str, ignored: bool
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert _ignored(path, patterns) is ignored
