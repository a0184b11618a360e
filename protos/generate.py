"""Regenerate the Python code for Tureen's own protos into server/tureen/v1/.

    pip install grpcio-tools==1.81.0 && python protos/generate.py

The generated modules are committed, so installing Tureen needs no protoc. The proto path
``tureen/v1/admin.proto`` makes them the package ``tureen.v1``, next to the rest of Tureen.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos" / "tureen").rglob("*.proto"))
    out = ROOT / "server"
    code = protoc.main(
        ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    )
    notice = '"""Generated from protos/tureen/v1 by protos/generate.py; do not edit."""\n'
    (out / "tureen" / "v1" / "__init__.py").write_text(notice)
    return code


if __name__ == "__main__":
    sys.exit(main())
