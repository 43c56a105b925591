"""Generates the Python code for the protobuf contracts in ``protos/`` (``make protos``).

The generated modules land in ``pdmesh/v1/`` so that their own imports (``pdmesh.v1.common_pb2``)
resolve inside this package. ``--check`` regenerates into a scratch folder and fails when the
committed code differs, which is how the test suite catches stale generated code.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = "pdmesh/v1"


def proto_files() -> list[Path]:
    """The contract files, in a stable order."""
    return sorted((PROTO_ROOT / "pdmesh" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Runs protoc over every contract, writing under ``out_root``; returns the generated files."""
    from grpc_tools import protoc

    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(protos))
    out_dir = out_root / OUT_PACKAGE
    (out_dir / "__init__.py").write_text('"""Generated protobuf code; regenerate with `make protos`."""\n')
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def stale_files() -> list[str]:
    """Names of generated files that differ from what the contracts produce now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed_dir = ROOT / OUT_PACKAGE
        names = {p.name for p in fresh} | {
            p.name for p in committed_dir.glob("*") if p.is_file() and p.suffix in (".py", ".pyi")
        }
        stale = []
        for name in sorted(names):
            a, b = Path(tmp) / OUT_PACKAGE / name, committed_dir / name
            if not a.exists() or not b.exists() or not filecmp.cmp(a, b, shallow=False):
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run `make protos`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    files = generate(ROOT)
    print(f"wrote {len(files)} files to {OUT_PACKAGE}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
