"""The operator commands against a real server process: push, versions, status, spec show, rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import digits_spec, serve_process, write_ingredients, write_spec


def tureen(*args: str, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TUREEN_ADMIN_TOKEN"}
    extra = ["--token-file", str(token_file)] if token_file else []
    return subprocess.run([sys.executable, "-m", "tureen", *args, *extra], capture_output=True, text=True, timeout=120, env=env)


def test_operator_commands_push_list_show_and_roll_back(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 2)
    first = write_spec(tmp_path, digits_spec(["ft-0", "ft-1"]), "v1.yaml")
    second = write_spec(tmp_path, digits_spec(["ft-0", "ft-1"], merge={"weights": {"ft-0": 2.0, "ft-1": 1.0}}), "v2.yaml")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with serve_process(["--spec", str(first), "--admin-token-file", str(token)]) as (_, port, _, _):
        server = ["--server", f"127.0.0.1:{port}"]
        refused = tureen("versions", "digits", *server)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr and "Traceback" not in refused.stderr

        pushed = tureen("push", str(second), "--wait", *server, token_file=token)
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.strip() == "digits version 2: serving"

        listed = tureen("versions", "digits", *server, token_file=token)
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:3] == ["VERSION", "STATE", "PUSHED"]
        assert [line.split()[:2] for line in lines[1:]] == [["1", "retired"], ["2", "active"]]

        status = json.loads(tureen("status", "--json", *server, token_file=token).stdout)
        assert status["models"][0]["active_version"] == "2" and status["models"][0]["resident_versions"] == ["1"]

        shown = tureen("spec", "show", "digits", *server, token_file=token).stdout
        assert shown.startswith("# digits version 2 (active)") and "ft-0: 2.0" in shown

        rolled = tureen("rollback", "digits", "--json", *server, token_file=token)
        assert json.loads(rolled.stdout)["version"] == "1"
        kept = tureen("push", str(second), "--no-activate", "--wait", "--json", *server, token_file=token)
        assert json.loads(kept.stdout)["state"] == "ready"
