"""The operator commands: push, versions, activate, rollback, delete, status, canary, spec show.

They talk to a running server through ``tureen_client`` (the library in ``clients/``). Output is
a human table by default and JSON with ``--json``; a push that waits shows a progress bar on
stderr while the server builds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tureen_client import SoupClient, SoupClientError, read_token

__all__ = ["COMMANDS", "SoupClientError", "add_commands", "show_spec"]


def _client_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--server",
        default=os.environ.get("TUREEN_SERVER", "localhost:8001"),
        help="HOST:PORT (default: $TUREEN_SERVER or localhost:8001)",
    )
    command.add_argument("--token-file", metavar="F", help="bearer token for admin calls (default: $TUREEN_ADMIN_TOKEN)")
    command.add_argument("--tls-ca", metavar="F", help="connect with TLS, trusting this CA (PEM)")
    command.add_argument("--tls-cert", metavar="F", help="with --tls-ca: present this client certificate (mTLS)")
    command.add_argument("--tls-key", metavar="F", help="the client certificate's private key")
    command.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_commands(commands: Any, spec_commands: Any) -> None:
    push = commands.add_parser("push", help="push a spec as a model's next version (activated unless --no-activate)")
    push.add_argument("spec", metavar="SPEC", help="a soup spec (YAML or JSON); ingredient paths are read by the server")
    push.add_argument("--no-activate", action="store_true", help="store and build only; activate later")
    push.add_argument("--wait", action="store_true", help="wait for the build (and the swap), showing progress")
    push.add_argument(
        "--in-place",
        action="store_true",
        help="when there is no room for a second blend: stop serving the model while the new one builds (a short pause)",
    )
    _client_options(push)
    versions = commands.add_parser("versions", help="list a model's versions and their states")
    versions.add_argument("model")
    _client_options(versions)
    activate = commands.add_parser("activate", help="make a version serve its model")
    activate.add_argument("model")
    activate.add_argument("version", type=int)
    _client_options(activate)
    rollback = commands.add_parser("rollback", help="go back to the previously active version (or --to V)")
    rollback.add_argument("model")
    rollback.add_argument("--to", type=int, metavar="V", help="this version instead of the previous one")
    _client_options(rollback)
    delete = commands.add_parser("delete", help="delete a version that is not active")
    delete.add_argument("model")
    delete.add_argument("version", type=int)
    _client_options(delete)
    status = commands.add_parser("status", help="active versions, builds in progress and memory, per model")
    status.add_argument("model", nargs="?", default="")
    status.add_argument("--watch", action="store_true", help="print again on every change until Ctrl-C")
    _client_options(status)
    canary = commands.add_parser("canary", help="end a model's canary by hand: promote it, or abort it")
    canary.add_argument("action", choices=("promote", "abort"))
    canary.add_argument("model")
    _client_options(canary)
    show = spec_commands.add_parser("show", help="print a model's active spec, or a given version's")
    show.add_argument("model")
    show.add_argument("version", type=int, nargs="?", default=0)
    _client_options(show)


def _client(args: argparse.Namespace) -> SoupClient:
    def read(path: str | None, flag: str) -> bytes | None:
        if not path:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise SoupClientError(_invalid(), f"{flag}: {exc.strerror or exc}") from None

    return SoupClient(
        args.server,
        token=read_token(args.token_file),
        root_certificates=read(args.tls_ca, "--tls-ca"),
        private_key=read(args.tls_key, "--tls-key"),
        certificate_chain=read(args.tls_cert, "--tls-cert"),
    )


def _invalid() -> Any:
    import grpc

    return grpc.StatusCode.INVALID_ARGUMENT


def _push(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.push(args.spec, activate=not args.no_activate or args.in_place, wait=False, in_place=args.in_place)
        if args.wait:
            info = _follow(client, info, activate=not args.no_activate, quiet=args.json)
        if args.json:
            print(json.dumps(info))
        else:
            what = {"active": "serving", "canary": "serving as a canary"}.get(info["state"], info["state"])
            print(f"{info['model']} version {info['version']}: {what}")
    return 0 if info["state"] != "failed" else 1


def _follow(client: SoupClient, info: dict[str, Any], *, activate: bool, quiet: bool) -> dict[str, Any]:
    """Wait for the pushed version to build (and activate); draw a progress bar after a moment."""
    model, version = info["model"], int(info["version"])
    started = time.monotonic()
    done = {"active", "canary"} if activate else {"ready", "active"}
    drawn = False
    for status in client.watch(model):
        current = next((v for v in client.versions(model) if int(v["version"]) == version), info)
        if current["state"] in done or current["state"] in ("failed", "rejected"):
            if drawn:
                print(file=sys.stderr)
            if current["state"] == "failed":
                raise SoupClientError(_failed(), f"{model} version {version} failed to build: {current['reason']}")
            if current["state"] == "rejected":
                raise SoupClientError(_failed(), f"{model} version {version} was not activated: {current['reason']}")
            return current
        building = next((m.get("building") for m in status["models"] if m["model"] == model), None)
        if not quiet and building and int(building.get("version", 0)) == version and time.monotonic() - started > 0.5:
            fraction = float(building.get("fraction", 0.0))
            bar = "#" * int(fraction * 30)
            print(
                f"\r{model} v{version} [{bar:<30}] {fraction:4.0%} {building.get('stage', '')[:40]:<40}", end="", file=sys.stderr
            )
            drawn = True
    return info


def _failed() -> Any:
    import grpc

    return grpc.StatusCode.FAILED_PRECONDITION


def _versions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.versions(args.model)
    if args.json:
        print(json.dumps(rows))
        return 0
    table = [["VERSION", "STATE", "PUSHED BY", "PUSHED AT", "BUILD", "HELD-OUT", "REASON"]]
    for row in rows:
        build = f"{float(row['build_seconds']):.2f} s" if float(row.get("build_seconds") or 0) else "-"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(row["pushed_at"])))
        held_out = _scores(row.get("evaluation") or {}) or "-"
        table.append([str(row["version"]), row["state"], row["pushed_by"], when, build, held_out, row.get("reason", "")[:90]])
    _print_table(table)
    scored = [row for row in rows if row.get("ingredient_evaluation")]
    if scored:
        latest = scored[-1]
        print(f"\ningredients alone (scored by version {latest['version']}):")
        ingredients = [["INGREDIENT", "HELD-OUT"]]
        ingredients += [[i["ingredient"], _scores(i.get("splits") or {})] for i in latest["ingredient_evaluation"]]
        _print_table(ingredients)
    for row in rows:
        if row.get("resolution_json"):
            print(f"version {row['version']}: {_search_summary(json.loads(row['resolution_json']))}")
    return 0


def _scores(by_split: dict[str, Any]) -> str:
    """``val accuracy 0.9777 · test accuracy 0.9722``: the first metric (the task's main one) per split."""
    parts = []
    for split, scores in sorted(by_split.items()):  # maps keep no order over the wire
        metrics = scores.get("metrics", scores)
        name = "accuracy" if "accuracy" in metrics else "perplexity" if "perplexity" in metrics else next(iter(metrics), "")
        if name:
            parts.append(f"{split} {name} {float(metrics[name]):.4f}")
    return " · ".join(parts)


def _search_summary(resolution: dict[str, Any]) -> str:
    log = resolution.get("log", {})
    weights = resolution.get("merge", {}).get("weights", {})
    kind, metric, split = log.get("search", "?"), log.get("metric", "?"), log.get("split", "?")
    if kind == "greedy":
        kept = [name for name, w in weights.items() if w]
        return f"greedy soup on {split!r} by {metric}: kept {', '.join(kept)} (tried in order {', '.join(log.get('order', []))})"
    if kind == "grid":
        tried = log.get("tried", [])
        chosen = resolution.get("merge", {}).get("parameters", {})
        picked = {name: chosen.get(name) for name in (tried[0]["parameters"] if tried else {})}
        return f"grid search on {split!r} by {metric}: {len(tried)} points, kept {picked} ({metric} {log.get('best')})"
    shown = ", ".join(f"{name} {float(w):.3f}" for name, w in weights.items())
    return f"{kind} soup on {split!r} by {metric}: weights {shown}"


def _activate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _report(args, client.activate(args.model, args.version))


def _rollback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _report(args, client.rollback(args.model, args.to))


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.model, args.version)
    print(
        json.dumps({"model": args.model, "version": args.version, "deleted": True})
        if args.json
        else f"deleted {args.model} version {args.version}"
    )
    return 0


def _canary(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.promote_canary(args.model) if args.action == "promote" else client.abort_canary(args.model)
    if args.json:
        print(json.dumps(info))
    elif args.action == "promote":
        print(f"{info['model']} version {info['version']}: serving (canary promoted)")
    else:
        print(f"{info['model']} version {info['version']}: canary aborted, all traffic back on the active version")
    return 0


def _report(args: argparse.Namespace, info: dict[str, Any]) -> int:
    print(json.dumps(info) if args.json else f"{info['model']} version {info['version']}: serving")
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if not args.watch:
            _print_status(client.status(args.model), args.json)
            return 0
        for status in client.watch(args.model):
            _print_status(status, args.json)
    return 0


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status), flush=True)
        return
    table = [["MODEL", "ACTIVE", "CANARY", "BUILDING", "RESIDENT", "MEMORY", "INGREDIENTS", "ONLINE ACCURACY"]]
    for model in status["models"]:
        building = model.get("building")
        progress = f"v{building['version']} {float(building['fraction']):.0%} {building['stage'][:72]}" if building else "-"
        resident = ",".join(str(v) for v in model["resident_versions"]) or "-"
        memory = (int(model["active_bytes"]) + int(model["resident_bytes"])) / 1e6
        canary = int(model.get("canary_version") or 0)
        canary_cell = f"v{canary} {float(model['canary_percent']):g}%" if canary else "-"
        online = model.get("online") or {}
        online_cell = " · ".join(
            f"v{v} {float(o['accuracy']):.4f} ({int(o['samples'])})" for v, o in sorted(online.items()) if int(o["samples"])
        )
        row = [model["model"], str(model["active_version"] or "-"), canary_cell, progress, resident, f"{memory:.1f} MB"]
        row.append(model.get("placement") or "-")
        table.append([*row, online_cell or "-"])
    _print_table(table)
    for model in status["models"]:
        if model.get("canary_note"):
            print(f"{model['model']} canary: {model['canary_note']}")
    placed = status.get("ingredient_bytes_by_placement") or {}
    held = ", ".join(f"{p} {int(placed[p]) / 1e6:.1f} MB" for p in ("device", "host", "disk") if int(placed.get(p, 0)))
    print(f"device {status['device']}, ingredients {held or '0.0 MB'}", flush=True)


def show_spec(args: argparse.Namespace) -> int:
    import yaml

    with _client(args) as client:
        info, document = client.spec(args.model, args.version)
    if args.json:
        print(json.dumps({"version": info, "spec": document}))
    else:
        print(f"# {info['model']} version {info['version']} ({info['state']}), pushed by {info['pushed_by']}")
        print(yaml.safe_dump(document, sort_keys=False), end="")
    return 0


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "push": _push,
    "versions": _versions,
    "activate": _activate,
    "rollback": _rollback,
    "delete": _delete,
    "status": _status,
    "canary": _canary,
}
