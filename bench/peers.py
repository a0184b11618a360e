"""Tureen against its peers, side by side in one run, driven by Triton's own perf_analyzer.

    python bench/peers.py [--peers /srv/peers] [--reps 3] [--window-ms 2000] [--work DIR]

Serves the same two models (Tureen's demo MLP ``digits`` and a 10.5M-parameter MLP ``big``,
the same merged weights everywhere) from:

- ``tureen``: Tureen without batching, and ``tureen-db``: with ``serving.batching`` (delay 0);
- ``triton`` and ``triton-db``: NVIDIA Triton from nvidia-pytriton, without and with Triton's
  dynamic batcher (100 us), when ``PEERS/pyt`` is a venv with ``nvidia-pytriton``;
- ``tureen-pb`` and ``triton-pb``: both batchers with one configuration tuned for 16 clients
  (preferred batch size 16, queue delay 5 ms), the same on both sides;
- ``tureen-d100`` ... ``tureen-d5000``: Tureen with queue delays of 100 us to 5 ms, only when
  ``--only`` names them;
- ``kserve``: KServe's ModelServer, when ``PEERS/ksv`` is a venv with ``kserve``;
- ``mlserver`` and ``mlserver-ab``: Seldon MLServer without and with adaptive batching (64 rows,
  0.5 ms), when ``PEERS/mls`` is a venv with ``mlserver`` (pin ``uvloop==0.21.0`` there: its
  workers crash-loop on uvloop 0.23);
- ``floor``: a bare Python gRPC server running the bare forward (what nothing unbatched beats);
- ``floor-db``: the same with the least a delay-0 batcher needs, on grpc.aio as Tureen is (what no
  batched Python server beats), and ``floor-db-threads``: on grpcio's thread-pool server instead,
  only when ``--only`` names it.

Each point (model, concurrency, protocol) runs perf_analyzer against every server in turn,
rotating the order each repetition, with fixed windows (this machine kind is noisy: compare only
figures from one run). Prints the median infer/s and p50 of each cell, then the ratios the
serving issue targets. perf_analyzer comes from ``$TUREEN_PERF_ANALYZER`` or is installed by
``bench/install_perf_analyzer.sh``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
import yaml
from safetensors.torch import save_file
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
from models import MODELS, Big, Digits  # noqa: E402

POINTS = [
    ("digits", 1, "grpc"),
    ("digits", 16, "grpc"),
    ("big", 1, "grpc"),
    ("big", 16, "grpc"),
    ("big", 4, "grpc"),
    ("big", 4, "http"),
]


TUNED = {"max_queue_delay_us": 5000, "preferred_batch_sizes": [16]}
"""The ``-pb`` servers' batching, given to Tureen and Triton alike."""

SWEEP = (100, 1000, 2000, 5000)
"""Queue delays (us) of the ``tureen-dN`` servers, run only when ``--only`` names them: where a
batch's forward runs (the serving loop from 2 ms on, else a worker thread) shows in their rows."""


def prepare(work: Path) -> None:
    """Ingredients, specs, merged weights (for the peers) and perf_analyzer's input rows."""
    from sklearn.datasets import load_digits

    for name, module in (("digits", Digits()), ("big", Big())):
        torch.manual_seed(0)
        base = {k: v.contiguous() for k, v in module.state_dict().items()}
        names = []
        for i in range(3):
            noise = torch.Generator().manual_seed(100 + i)
            tuned = {k: (v + 0.02 * v.std() * torch.randn(v.shape, generator=noise)).contiguous() for k, v in base.items()}
            save_file(tuned, str(work / f"{name}-ft{i}.safetensors"))
            names.append(f"{name}-ft{i}")
        factory = (
            {"factory": "tureen.demo.models:mlp", "kwargs": {"hidden": 128}}
            if name == "digits"
            else {"factory": "models:big_mlp"}
        )
        spec = {
            "apiVersion": "tureen/v1",
            "model": name,
            "architecture": factory,
            "ingredients": [{"name": n, "path": str(work / f"{n}.safetensors")} for n in names],
        }
        (work / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        (work / f"{name}-db.yaml").write_text(yaml.safe_dump({**spec, "serving": {"batching": {"max_queue_delay_us": 0}}}))
        (work / f"{name}-pb.yaml").write_text(yaml.safe_dump({**spec, "serving": {"batching": TUNED}}))
        for delay in SWEEP:
            batching = {"batching": {"max_queue_delay_us": delay}}
            (work / f"{name}-d{delay}.yaml").write_text(yaml.safe_dump({**spec, "serving": batching}))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tureen",
                "--log-level",
                "warning",
                "merge",
                str(work / f"{name}.yaml"),
                "-o",
                str(work / f"{name}-blend.safetensors"),
            ],
            check=True,
            env=environment(),
        )
    rows = load_digits().data[:32].astype(np.float32)
    (work / "input-digits.json").write_text(json.dumps({"data": [{"pixels": [float(v) for v in row]} for row in rows]}))
    x = np.random.default_rng(1).standard_normal((32, 3072)).astype(np.float32)
    (work / "input-big.json").write_text(json.dumps({"data": [{"x": [round(float(v), 5) for v in row]} for row in x]}))
    configs = {}
    for name, (input_name, features, outputs) in MODELS.items():
        config = mc.ModelConfig(name=name, max_batch_size=64)
        config.input.add(name=input_name, data_type=mc.TYPE_FP32, dims=[features])
        for output in outputs:
            config.output.add(name=output, data_type=mc.TYPE_FP32, dims=[10])
        configs[name] = pb.ModelConfigResponse(config=config).SerializeToString().hex()
    (work / "configs.json").write_text(json.dumps(configs))


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "peers"), os.environ.get("PYTHONPATH", "")]), **(extra or {})}


def servers(work: Path, peers: Path) -> dict[str, tuple[list[str], dict[str, str], int, int | None]]:
    """name -> (command, environment, gRPC port, HTTP port)."""
    found: dict[str, tuple[list[str], dict[str, str], int, int | None]] = {}
    variants = [("tureen", ""), ("tureen-db", "-db"), ("tureen-pb", "-pb")] + [(f"tureen-d{d}", f"-d{d}") for d in SWEEP]
    for i, (name, suffix) in enumerate(variants):
        grpc_port, http_port = 18101 + 10 * i, 18100 + 10 * i
        command = [sys.executable, "-m", "tureen", "--log-level", "warning", "serve", "--host", "127.0.0.1"]
        command += [
            "--spec",
            str(work / f"digits{suffix}.yaml"),
            "--spec",
            str(work / f"big{suffix}.yaml"),
            "--store",
            str(work / f"store-{name}"),
        ]
        command += ["--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(grpc_port + 1)]
        found[name] = (command, environment(), grpc_port, http_port)
    found["floor"] = (
        [sys.executable, str(HERE / "peers" / "serve_floor.py"), "--weights", str(work), "--port", "18201"],
        environment(),
        18201,
        None,
    )
    for name, server, port in (("floor-db", "aio", 18211), ("floor-db-threads", "threads", 18221)):
        command = [sys.executable, str(HERE / "peers" / "serve_floor_batched.py"), "--weights", str(work)]
        found[name] = ([*command, "--port", str(port), "--server", server], environment(), port, None)
    libpython = sysconfig.get_config_var("LIBDIR") or ""  # the tritonserver stub links the interpreter's libpython
    if (peers / "pyt" / "bin" / "python").exists():
        tuned = [
            "--dynamic",
            "--delay-us",
            str(TUNED["max_queue_delay_us"]),
            "--preferred",
            *map(str, TUNED["preferred_batch_sizes"]),
        ]
        for i, (name, flags) in enumerate(
            (("triton", []), ("triton-db", ["--dynamic", "--delay-us", "100"]), ("triton-pb", tuned))
        ):
            grpc_port = 18301 + 10 * i
            command = [
                str(peers / "pyt" / "bin" / "python"),
                str(HERE / "peers" / "serve_triton.py"),
                "--weights",
                str(work),
                *flags,
            ]
            command += ["--grpc-port", str(grpc_port), "--http-port", str(grpc_port - 1), "--metrics-port", str(grpc_port + 1)]
            found[name] = (command, environment({"LD_LIBRARY_PATH": libpython}), grpc_port, grpc_port - 1)
    if (peers / "mls" / "bin" / "python").exists():
        for i, (name, flags) in enumerate((("mlserver", []), ("mlserver-ab", ["--adaptive"]))):
            grpc_port = 18501 + 10 * i
            command = [str(peers / "mls" / "bin" / "python"), str(HERE / "peers" / "serve_mlserver.py"), "--weights", str(work)]
            command += [
                "--configs",
                str(work / "configs.json"),
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(grpc_port - 1),
                *flags,
            ]
            found[name] = (command, environment(), grpc_port, None)
    if (peers / "ksv" / "bin" / "python").exists():
        command = [str(peers / "ksv" / "bin" / "python"), str(HERE / "peers" / "serve_kserve.py"), "--weights", str(work)]
        command += ["--configs", str(work / "configs.json"), "--grpc_port", "18401", "--http_port", "18400"]
        found["kserve"] = (command, environment(), 18401, None)
    return found


def start(name: str, command: list[str], env: dict[str, str], work: Path) -> subprocess.Popen[bytes]:
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)


def wait_ready(port: int, process: subprocess.Popen[bytes], seconds: float = 300.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
                if all(client.is_model_ready(name) for name in MODELS):
                    return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


def measure(
    pa: str, model: str, concurrency: int, protocol: str, port: int, work: Path, window_ms: int
) -> tuple[float, float] | None:
    """(infer/s, p50 ms) of one perf_analyzer run, or None when it failed."""
    input_name, features, _ = MODELS[model]
    out = work / "pa.csv"
    out.unlink(missing_ok=True)
    command = [pa, "-m", model, "-i", protocol, "-u", f"127.0.0.1:{port}", "--shape", f"{input_name}:{features}"]
    command += ["--concurrency-range", str(concurrency), "-p", str(window_ms), "-s", "1000", "-r", "3"]
    command += ["--input-data", str(work / f"input-{model}.json"), "-f", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0 or not out.exists():
        failed = (done.stdout + done.stderr).strip().splitlines()
        print(f"  perf_analyzer failed: {failed[-1] if failed else '(no output)'}", flush=True)
        return None
    row = next(csv.DictReader(out.open()))
    return float(row["Inferences/Second"]), int(row["p50 latency"]) / 1000


def table(
    results: dict[tuple[str, int, str, str], list[tuple[float, float]]], names: list[str], points: list[tuple[str, int, str]]
) -> None:
    def cell(key: tuple[str, int, str, str], index: int) -> float | None:
        values = [r[index] for r in results.get(key, [])]
        return statistics.median(values) if values else None

    print("| model, load | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for model, concurrency, protocol in points:
        for index, what in ((0, "infer/s"), (1, "p50 ms")):
            cells = []
            for name in names:
                value = cell((model, concurrency, protocol, name), index)
                cells.append("-" if value is None else f"{value:.0f}" if index == 0 else f"{value:.2f}")
            print(f"| {model} c={concurrency} {protocol} {what} | " + " | ".join(cells) + " |")
    print()
    for label, a, b, index in (
        (
            "big c=16: tureen-db / triton-db infer/s (target >= 1.3)",
            ("big", 16, "grpc", "tureen-db"),
            ("big", 16, "grpc", "triton-db"),
            0,
        ),
        (
            "big c=16: tureen-db / triton-db p50 (target <= 1.0)",
            ("big", 16, "grpc", "tureen-db"),
            ("big", 16, "grpc", "triton-db"),
            1,
        ),
        ("big c=16: tureen-pb / triton-pb infer/s", ("big", 16, "grpc", "tureen-pb"), ("big", 16, "grpc", "triton-pb"), 0),
        ("big c=16: tureen-pb / triton-pb p50", ("big", 16, "grpc", "tureen-pb"), ("big", 16, "grpc", "triton-pb"), 1),
        ("big c=16: tureen-pb / triton-db infer/s", ("big", 16, "grpc", "tureen-pb"), ("big", 16, "grpc", "triton-db"), 0),
        ("big c=16: tureen-db / floor-db infer/s", ("big", 16, "grpc", "tureen-db"), ("big", 16, "grpc", "floor-db"), 0),
        ("big c=16: floor-db / triton-db infer/s", ("big", 16, "grpc", "floor-db"), ("big", 16, "grpc", "triton-db"), 0),
        (
            "digits c=1: tureen-db / tureen p50 (target <= 1.05)",
            ("digits", 1, "grpc", "tureen-db"),
            ("digits", 1, "grpc", "tureen"),
            1,
        ),
        ("big c=1: tureen-db / tureen p50 (target <= 1.05)", ("big", 1, "grpc", "tureen-db"), ("big", 1, "grpc", "tureen"), 1),
        ("digits c=16: tureen-db infer/s / 946 (target >= 2)", ("digits", 16, "grpc", "tureen-db"), None, 0),
        (
            "big c=4: tureen-db http / grpc infer/s (target >= 0.67)",
            ("big", 4, "http", "tureen-db"),
            ("big", 4, "grpc", "tureen-db"),
            0,
        ),
    ):
        top, bottom = cell(a, index), (cell(b, index) if b else 946.0)
        print(f"{label}: " + ("-" if top is None or not bottom else f"{top / bottom:.2f}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=Path, default=Path("/srv/peers"), help="folder of the peers' venvs (pyt, ksv)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--only", nargs="*", help="servers to run (default: all found)")
    parser.add_argument("--points", nargs="*", metavar="MODEL:C:PROTOCOL", help="points to run, e.g. big:16:grpc (default: all)")
    args = parser.parse_args()
    pa = os.environ.get("TUREEN_PERF_ANALYZER") or str(ROOT / ".perf_analyzer" / "perf_analyzer")
    if not Path(pa).exists():
        pa = subprocess.run(
            ["bash", str(HERE / "install_perf_analyzer.sh"), str(ROOT / ".perf_analyzer")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
    named = {f"{model}:{c}:{protocol}": (model, c, protocol) for model, c, protocol in POINTS}
    unknown = sorted(set(args.points or ()) - set(named))
    if unknown:
        parser.error(f"--points: unknown {', '.join(unknown)} (known: {', '.join(named)})")
    points = [point for key, point in named.items() if not args.points or key in args.points]
    work = args.work or Path(tempfile.mkdtemp(prefix="tureen-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(work)
    swept = {f"tureen-d{delay}" for delay in SWEEP} | {"floor-db-threads"}
    found = {n: s for n, s in servers(work, args.peers).items() if (n in args.only if args.only else n not in swept)}
    processes = {name: start(name, command, env, work) for name, (command, env, _, _) in found.items()}
    try:
        ready = [name for name in found if wait_ready(found[name][2], processes[name])]
        print(
            f"servers ready: {', '.join(ready)} (not: {', '.join(sorted(set(found) - set(ready))) or 'none'}); logs in {work}",
            flush=True,
        )
        results: dict[tuple[str, int, str, str], list[tuple[float, float]]] = {}
        for rep in range(args.reps):
            order = ready[rep % len(ready) :] + ready[: rep % len(ready)]
            for model, concurrency, protocol in points:
                for name in order:
                    port = found[name][2] if protocol == "grpc" else found[name][3]
                    if port is None:
                        continue
                    got = measure(pa, model, concurrency, protocol, port, work, args.window_ms)
                    print(f"rep {rep} {model} c={concurrency} {protocol} {name}: {got}", flush=True)
                    if got is not None:
                        results.setdefault((model, concurrency, protocol, name), []).append(got)
        table(results, ready, points)
    finally:
        for process in processes.values():
            try:
                os.killpg(process.pid, signal.SIGINT)
            except ProcessLookupError:
                continue
        for process in processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
