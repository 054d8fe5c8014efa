"""The container image and the Kubernetes manifests: valid offline, and true to the service."""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import validate

from app.config import Settings
from app.http.routes.health import router as health_router
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# The oldest Kubernetes the manifests support and the newest schema kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
SECRET_DEFAULT_MIN_LENGTH = 32


# Each variant is one kustomization: `kubectl apply -k <folder>`.
VARIANTS = {"single-host": DEPLOY, "postgres-s3": DEPLOY / "postgres-s3"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
# Strategic-merge lists the patches may merge into, all keyed by name; any other list a patch
# meets in the base is refused rather than merged the wrong way (volumeMounts, for one, merge
# by mountPath).
MERGED_BY_NAME = {"containers", "env", "volumes"}
# Variables read by boto3 that the manifests may set (the blob store's S3 client).
AWS_VARIABLES = {
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
}
# Never set inline in a manifest: only from a Secret.
SECRET_VARIABLES = {
    f"MODELPORT_{name.upper()}"
    for name, field in Settings.model_fields.items()
    if "SecretStr" in str(field.annotation)
} | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
variants = pytest.mark.parametrize("variant", VARIANTS)


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _kustomization(folder: Path) -> dict[str, Any]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{folder}: the hand-built kustomize below does not know {unknown}"
    return kustomization


def _merge(base: Any, patch: Any, key: str = "") -> Any:
    """Kustomize's strategic merge, for the subset the manifests use: maps merge key by key
    (null deletes), lists of MERGED_BY_NAME merge item by item on their name. Where kubectl is
    at hand, a test checks that this gives exactly what `kubectl kustomize` does."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for name, value in patch.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = _merge(merged[name], value, name) if name in merged else value
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        assert key in MERGED_BY_NAME, f"a patch meets the list {key!r}: merge it by hand"
        # as kustomize orders them: the patch's new items first, then the base's, merged
        patched = {item["name"]: item for item in patch}
        known = {item["name"] for item in base}
        return [item for item in patch if item["name"] not in known] + [
            _merge(item, patched[item["name"]]) if item["name"] in patched else item
            for item in base
        ]
    return patch


def _resource_files(folder: Path) -> list[Path]:
    """The files a kustomization takes resources from, its bases' included."""
    files: list[Path] = []
    for entry in _kustomization(folder)["resources"]:
        path = (folder / entry).resolve()
        files += _resource_files(path) if path.is_dir() else [path]
    return files


def _patch_files(folder: Path) -> list[Path]:
    kustomization = _kustomization(folder)
    own = [(folder / p["path"]).resolve() for p in kustomization.get("patches", [])]
    bases = [(folder / e).resolve() for e in kustomization["resources"]]
    return own + [f for base in bases if base.is_dir() for f in _patch_files(base)]


@functools.cache
def _build(folder: Path) -> tuple[dict[str, Any], ...]:
    """What `kubectl kustomize folder` gives (no kubectl needed): the resources of the folder
    and its bases, each patch merged into the one resource of its kind and name."""
    kustomization = _kustomization(folder)
    resources: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = folder / entry
        resources += list(_build(path.resolve())) if path.is_dir() else _documents(path)
    for item in kustomization.get("patches", []):
        assert set(item) == {"path"}, f"{folder}: patches by file only, targeted by their name"
        for patch in _documents(folder / item["path"]):
            kind, name = patch["kind"], patch["metadata"]["name"]
            [index] = [
                i
                for i, doc in enumerate(resources)
                if (doc["kind"], doc["metadata"]["name"]) == (kind, name)
            ]
            resources[index] = _merge(resources[index], patch)
    # what `kustomize edit set image modelport=REGISTRY/modelport:TAG` adds (on copies: the
    # bases' builds are cached and shared)
    resources = copy.deepcopy(resources)
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, f"{folder}: {image}"
        for doc in resources:
            for container in (
                doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
            ):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return tuple(resources)


def _applied(variant: str) -> list[dict[str, Any]]:
    """The resources `kubectl apply -k` creates for the variant."""
    return list(_build(VARIANTS[variant].resolve()))


def _kinds(variant: str, kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _applied(variant) if doc["kind"] == kind]


def _only(variant: str, kind: str) -> dict[str, Any]:
    found = _kinds(variant, kind)
    assert len(found) == 1, f"expected one {kind} in {variant}, found {len(found)}"
    return found[0]


def _pod(variant: str) -> dict[str, Any]:
    spec: dict[str, Any] = _only(variant, "Deployment")["spec"]["template"]["spec"]
    return spec


def _container(variant: str) -> dict[str, Any]:
    containers = _pod(variant)["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def _examples() -> list[Path]:
    return sorted((DEPLOY / "examples").glob("*.yaml"))


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
@variants
def test_every_variant_validates_strictly_against_the_pinned_kubernetes_schema(
    variant: str, version: str
) -> None:
    documents = _applied(variant)
    assert documents, f"{variant} applies no resource"
    for document in documents:
        # strict: unknown or misspelt fields are errors, not silently dropped by the API server
        validate(document, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_every_example_validates_strictly_against_the_pinned_kubernetes_schema(
    path: Path, version: str
) -> None:
    documents = _documents(path)
    assert documents, f"{path} holds no resource"
    for document in documents:
        validate(document, version, strict=True)


def test_every_manifest_is_a_resource_or_patch_of_a_variant_or_an_example() -> None:
    used = {f for folder in VARIANTS.values() for f in _resource_files(folder.resolve())}
    used |= {f for folder in VARIANTS.values() for f in _patch_files(folder.resolve())}
    used |= {f.resolve() for f in _examples()}
    files = {f.resolve() for f in DEPLOY.rglob("*.y*ml") if f.name != "kustomization.yaml"}
    assert files == used, f"unused: {sorted(files - used)}, missing: {sorted(used - files)}"
    assert all(f.suffix == ".yaml" for f in files)
    examples = {f.resolve() for f in _examples()}
    assert not examples & {f for v in VARIANTS.values() for f in _resource_files(v.resolve())}


@pytest.mark.process
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
@variants
def test_hand_built_kustomization_matches_kubectl_kustomize(variant: str) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(VARIANTS[variant])],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout

    def keyed(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    expected = keyed([d for d in yaml.safe_load_all(built) if d])
    assert keyed(_applied(variant)) == expected


@pytest.mark.parametrize(
    ("variant", "kinds"),
    [
        ("single-host", {"Deployment", "Service", "PersistentVolumeClaim"}),
        (
            "postgres-s3",
            {
                "Deployment",
                "Service",
                "ConfigMap",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
            },
        ),
    ],
)
def test_each_variant_applies_its_resources_and_never_an_example_secret(
    variant: str, kinds: set[str]
) -> None:
    applied = _applied(variant)
    assert sorted(doc["kind"] for doc in applied) == sorted(kinds)
    for document in applied:
        text = yaml.safe_dump(document)
        assert "stringData" not in text
        assert "kind: Secret" not in text, "an example Secret must not be applied"


@variants
def test_replicas_autoscaler_disruption_budget_and_service_all_select_the_deployment(
    variant: str,
) -> None:
    deployment = _only(variant, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    replicas = deployment["spec"]["replicas"]

    for hpa in _kinds(variant, "HorizontalPodAutoscaler"):
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
        assert hpa["spec"]["minReplicas"] == replicas
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]

    for pdb in _kinds(variant, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # a budget that no eviction can meet would block every node drain
        assert "minAvailable" not in pdb["spec"]
        assert 1 <= pdb["spec"]["maxUnavailable"] < replicas

    service = _only(variant, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container(variant)["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()


@variants
def test_probes_use_the_service_health_endpoints_on_its_port(variant: str) -> None:
    container = _container(variant)
    env = _env(container)
    routes = {getattr(route, "path", None) for route in health_router.routes}
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = int(env["MODELPORT_PORT"]["value"])
    grpc_port = int(env["MODELPORT_GRPC_PORT"]["value"])
    assert port == Settings.model_fields["port"].default == 8000
    assert grpc_port == Settings.model_fields["grpc_port"].default == 8001
    assert named_ports == {"http": port, "grpc": grpc_port}

    expected = {"readinessProbe": "/health/ready", "startupProbe": "/health/live"}
    for probe, path in expected.items():
        http_get = container[probe]["httpGet"]
        assert http_get["path"] == path
        assert path in routes
        assert named_ports.get(http_get["port"], http_get["port"]) == port
    # liveness: the standard gRPC health check of the server as a whole (service "")
    assert container["livenessProbe"]["grpc"] == {"port": grpc_port}
    assert env["MODELPORT_HOST"]["value"] == "0.0.0.0"


@variants
def test_secrets_come_from_secret_references_with_placeholder_examples(variant: str) -> None:
    env = _env(_container(variant))
    assert "MODELPORT_ADMIN_TOKEN" in env
    references = {}
    for name, item in env.items():
        if name in SECRET_VARIABLES:
            assert "value" not in item, f"{name} inline"
            references[name] = item["valueFrom"]["secretKeyRef"]
    examples = {
        doc["metadata"]["name"]: doc
        for path in _examples()
        for doc in _documents(path)
        if doc["kind"] == "Secret"
    }
    for name, reference in references.items():
        example = examples[reference["name"]]
        assert example["type"] == "Opaque"
        placeholder = example["stringData"][reference["key"]]
        # obviously not a value, and no use as one: startup or the first request fails
        assert placeholder == "REPLACE-ME", name

    # too short for MODELPORT_ADMIN_TOKEN: a forgotten placeholder stops startup, never serves
    minimum = next(
        m.min_length
        for m in Settings.model_fields["admin_token"].metadata
        if hasattr(m, "min_length")
    )
    assert minimum == SECRET_DEFAULT_MIN_LENGTH
    assert len("REPLACE-ME") < minimum


@variants
def test_config_map_references_name_an_applied_config_map_and_key(variant: str) -> None:
    config_maps = {doc["metadata"]["name"]: doc["data"] for doc in _kinds(variant, "ConfigMap")}
    for name, item in _env(_container(variant)).items():
        reference = item.get("valueFrom", {}).get("configMapKeyRef")
        if reference is None:
            continue
        assert reference["name"] in config_maps, name
        if not reference.get("optional", False):
            assert reference["key"] in config_maps[reference["name"]], name


def _store(variant: str) -> tuple[dict[str, Any], str]:
    """The volume mounted where MODELPORT_STORE_DIR points, and that directory."""
    container = _container(variant)
    store_dir = _env(container)["MODELPORT_STORE_DIR"]["value"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == store_dir]
    assert not mount.get("readOnly", False)
    [volume] = [v for v in _pod(variant)["volumes"] if v["name"] == mount["name"]]
    # the same directory the image declares and points the service at
    assert _dockerfile_env()["MODELPORT_STORE_DIR"] == store_dir
    assert any(store_dir in args for args in _final_stage("VOLUME"))
    return volume, store_dir


def test_single_host_keeps_sqlite_on_one_node_with_a_read_write_once_claim() -> None:
    volume, _ = _store("single-host")
    pvc = _only("single-host", "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    for document in _applied("single-host"):
        assert "ReadWriteMany" not in yaml.safe_dump(document)
    env = _env(_container("single-host"))
    assert "MODELPORT_DATABASE_URL" not in env
    assert "MODELPORT_BLOB_URL" not in env

    # one pod whose workers share the database; no autoscaler could grow past one node
    assert _only("single-host", "Deployment")["spec"]["replicas"] == 1
    assert int(env["MODELPORT_WORKERS"]["value"]) >= 2
    assert not _kinds("single-host", "HorizontalPodAutoscaler")
    # a rolling update's new pod joins the old one on its node, never another host
    [term] = _pod("single-host")["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    labels = _only("single-host", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()


def test_postgres_s3_shares_no_volume_and_keeps_state_in_the_database_and_bucket() -> None:
    volume, _ = _store("postgres-s3")
    assert "emptyDir" in volume
    # room for at least one upload of the largest size accepted
    largest_upload = Settings.model_fields["max_upload_bytes"].default
    assert _quantity(volume["emptyDir"]["sizeLimit"]) >= largest_upload
    assert not _kinds("postgres-s3", "PersistentVolumeClaim")
    for pod_volume in _pod("postgres-s3")["volumes"]:
        assert "persistentVolumeClaim" not in pod_volume
        assert "nfs" not in pod_volume
    assert "affinity" not in _pod("postgres-s3")

    env = _env(_container("postgres-s3"))
    assert "secretKeyRef" in env["MODELPORT_DATABASE_URL"]["valueFrom"]
    assert "configMapKeyRef" in env["MODELPORT_BLOB_URL"]["valueFrom"]
    [storage] = _kinds("postgres-s3", "ConfigMap")
    assert storage["data"]["blob-url"].startswith("s3://")
    assert env["MODELPORT_WORKERS"]["value"] == "1"
    assert _only("postgres-s3", "Deployment")["spec"]["replicas"] >= 2
    assert _kinds("postgres-s3", "HorizontalPodAutoscaler")
    assert _kinds("postgres-s3", "PodDisruptionBudget")


@variants
def test_pod_runs_as_the_image_non_root_user_with_a_read_only_root_filesystem(
    variant: str,
) -> None:
    pod = _pod(variant)
    container = _container(variant)
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


@variants
def test_resources_are_bounded_and_torch_threads_follow_the_cpu_limit(variant: str) -> None:
    container = _container(variant)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    for resource in ("cpu", "memory"):
        assert _quantity(requests[resource]) <= _quantity(limits[resource])
    env = _env(container)
    workers = int(env["MODELPORT_WORKERS"]["value"])
    threads = env["MODELPORT_TORCH_THREADS"]
    if "valueFrom" in threads:
        # the whole limit for each worker: only right with one
        assert workers == 1
        field = threads["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu"
        assert field["containerName"] == container["name"]
        assert _quantity(field.get("divisor", "1")) == 1
    else:
        assert 1 <= int(threads["value"]) * workers <= math.ceil(_quantity(limits["cpu"]))


@variants
def test_termination_grace_covers_the_pre_stop_sleep_and_the_service_drain(variant: str) -> None:
    pod = _pod(variant)
    container = _container(variant)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(_env(container)["MODELPORT_SHUTDOWN_GRACE_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain


@variants
def test_every_variable_set_in_the_image_or_deployment_is_a_setting_or_aws(variant: str) -> None:
    fields = {f"MODELPORT_{name.upper()}" for name in Settings.model_fields}
    names = set(_dockerfile_env()) | set(_env(_container(variant)))
    used = {n for n in names if n.startswith("MODELPORT_")}
    assert used, "no MODELPORT_* settings found"
    assert used <= fields, f"not settings: {sorted(used - fields)}"
    aws = {n for n in names if n.startswith("AWS_")}
    assert aws <= AWS_VARIABLES, f"not AWS settings: {sorted(aws - AWS_VARIABLES)}"
    assert (variant == "postgres-s3") == bool(aws)
    for container in _pod(variant)["containers"]:
        # envFrom would hide its names from the checks above
        assert "envFrom" not in container


def test_dockerfile_is_multi_stage_non_root_healthchecked_with_port_and_volume() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    assert _final_stage("EXPOSE") == ["8000 8001"]  # REST, gRPC
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
