"""Generate the Python code of the gRPC front door's .proto files (app/grpc/proto/) with
grpcio-tools, reproducibly: ``make grpc`` (or ``.venv/bin/python scripts/generate_grpc.py``).

The generated files are committed; tests/test_grpc.py regenerates them into a temporary folder
and fails when the committed ones differ. One change is made to protoc's output: the files'
descriptors go into the door's own pool (``app.grpc.proto.POOL``, one for all of them, since
grpc_predict_v2.proto imports extensions.proto) instead of protobuf's default pool, where
tritonclient.grpc and KServe register their own copies of the same ``inference.*`` messages (two
copies in one pool fail at import with "duplicate symbol"), so that modelport's code and those
clients can live in one process (the tests, an application embedding both).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("app/grpc/proto")
PROTOS = ("extensions.proto", "grpc_predict_v2.proto", "health.proto")
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = (
    "# modelport: the door's own pool, beside the default pool where clients register the same\n"
    "# names (scripts/generate_grpc.py)\n"
    "from app.grpc.proto import POOL as _POOL\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def generated_names() -> list[Path]:
    """The generated files, relative to the repository root."""
    return [
        PROTO_DIR / f"{Path(proto).stem}{suffix}"
        for proto in PROTOS
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    ]


def generate(out: Path) -> list[Path]:
    """Write the generated files under ``out`` (as the repository lays them out); their paths."""
    (out / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        # paths relative to the root, so that the generated imports are ``app.grpc.proto...``
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={ROOT}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(ROOT / PROTO_DIR / proto),
            ]
        )
        if status != 0:
            raise SystemExit(f"protoc failed on {proto} (status {status})")
    paths = [out / name for name in generated_names()]
    for path in paths:
        if path.name.endswith("_pb2.py"):
            text = path.read_text(encoding="utf-8")
            if text.count(DEFAULT_POOL) != 1:
                raise SystemExit(f"{path}: protoc's output changed; update {__file__}")
            path.write_text(text.replace(DEFAULT_POOL, OWN_POOL), encoding="utf-8")
    return paths


if __name__ == "__main__":
    for written in generate(ROOT):
        print(f"wrote {written.relative_to(ROOT)}")
    sys.exit(0)
