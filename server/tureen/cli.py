"""The ``tureen`` command line: ``serve``, ``merge``, ``spec``, and the operator commands of ``tureen.ops``.

Errors end the command with exit code 1 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tureen import __version__, ops
from tureen.errors import SoupError

_log = logging.getLogger("tureen")

CALL_HINT = """\
The demo soup 'digits' is served on {host}:{port}. Call it with Triton's client:

    import numpy as np, tritonclient.grpc as grpcclient
    from sklearn.datasets import load_digits
    client = grpcclient.InferenceServerClient("{host}:{port}")
    pixels = load_digits().data[:8].astype(np.float32)
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    print(client.infer("digits", [tensor]).as_numpy("logits").argmax(axis=1))

or run `python clients/digits_client.py --url {host}:{port}` from a checkout.
{http}Metrics: curl http://{host}:{metrics_port}/metrics
"""

LLM_HINT = """\
The demo soup 'stdlib' (a small Llama, fine-tuned on parts of the Python standard library) is
served on {host}:{http_port}. Complete code with Triton's generate extension or the OpenAI API:

    curl -s http://{host}:{http_port}/v2/models/stdlib/generate \\
      -d '{{"text_input": "def __init__(self", "parameters": {{"max_tokens": 24, "temperature": 0}}}}'

    from openai import OpenAI
    client = OpenAI(base_url="http://{host}:{http_port}/v1", api_key="unused")
    answer = client.completions.create(model="stdlib", prompt="def test_", max_tokens=24, temperature=0.7, top_p=0.9,
                                        seed=0)
    print(answer.choices[0].text)

Metrics (tokens, time to first token): curl http://{host}:{metrics_port}/metrics
"""


def _port_or_off(text: str) -> int | None:
    return None if text == "off" else _port(text)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0-65535; 0 picks a free one)")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tureen", description="Serve model soups, merged live on the device.")
    parser.add_argument("--version", action="version", version=f"tureen {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve soups over KServe v2 gRPC and HTTP/REST with Prometheus metrics")
    serve.add_argument("--spec", action="append", default=[], metavar="FILE", help="a soup spec (YAML or JSON); repeatable")
    serve.add_argument(
        "--demo",
        nargs="?",
        const="digits",
        choices=["digits", "llm"],
        help="serve a demo soup, trained on first run: 'digits' (the default: an MLP on scikit-learn's digits) or 'llm' "
        "(a small Llama trained on the Python standard library, fine-tuned per package)",
    )
    serve.add_argument(
        "--demo-dir",
        type=Path,
        metavar="DIR",
        help="where the demo keeps its ingredients (default: $XDG_CACHE_HOME/tureen/demo, or demo-llm, under ~/.cache)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    serve.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port; 0 picks a free one (default: 8001)")
    serve.add_argument(
        "--http-port",
        type=_port_or_off,
        default=8000,
        help="KServe v2 HTTP/REST port; 0 picks a free one, 'off' serves gRPC only (default: 8000)",
    )
    serve.add_argument("--metrics-port", type=_port, default=8002, help="Prometheus port; 0 picks a free one (default: 8002)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, CUDA when present)")
    serve.add_argument(
        "--max-message-mb",
        type=_positive,
        default=64,
        metavar="MB",
        help="largest gRPC message (or HTTP request body) accepted or sent, in MiB (default: 64)",
    )
    serve.add_argument(
        "--grpc-workers",
        type=_positive,
        default=8,
        metavar="N",
        help="threads for blocking admin calls and for forwards too slow to run on the serving loop (default: 8)",
    )
    serve.add_argument(
        "--cpu-threads",
        type=_positive,
        metavar="N",
        help="threads of torch's CPU operators (Triton's INTRA_OP_THREAD_COUNT; default on a CPU device: every core "
        "for a forward on the serving loop and for builds, the cores less one for forwards and generations beside "
        "it; OMP_NUM_THREADS, when set, counts as the cores)",
    )
    _kernels_option(serve)
    _placement_option(serve)
    serve.add_argument(
        "--store",
        metavar="DIR",
        help="the durable spec store, shareable by replicas (default: $TUREEN_STORE, else the demo folder's "
        "store/ with --demo, else $XDG_STATE_HOME/tureen/store or ~/.local/state/tureen/store)",
    )
    serve.add_argument(
        "--keep-versions",
        type=int,
        default=1,
        metavar="K",
        help="earlier blends per model kept in memory for instant rollback (default: 1)",
    )
    serve.add_argument(
        "--blend-memory-mb",
        type=_positive,
        metavar="MB",
        help="cap on the memory all blends (active and kept) hold together; a build past it fails "
        "with RESOURCE_EXHAUSTED (default: no cap, the device's free memory decides)",
    )
    serve.add_argument(
        "--store-poll-seconds", type=float, default=1.0, metavar="S", help="how often replicas read the store (default: 1)"
    )
    serve.add_argument(
        "--admin-token-file", metavar="F", help="require this bearer token for admin calls (default: $TUREEN_ADMIN_TOKEN, if set)"
    )
    serve.add_argument(
        "--inference-token-file",
        metavar="F",
        help="require this bearer token for inference too (default: $TUREEN_INFERENCE_TOKEN, if set)",
    )
    serve.add_argument(
        "--admin-allow-from",
        action="append",
        metavar="CIDR",
        help="peers admin calls are served to; repeatable (default without a token: 127.0.0.0/8 and ::1; "
        "with a token, any peer holding it)",
    )
    serve.add_argument(
        "--insecure-open-admin",
        action="store_true",
        help="without an admin token, serve admin calls to every peer that reaches the port (logs a warning)",
    )
    serve.add_argument(
        "--allow-factory",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a module:callable glob that pushed specs may name as a factory, e.g. 'mycompany.models:*'; "
        "repeatable (always allowed: tureen.demo.models:*, the Hugging Face builder, the start-up specs' factories)",
    )
    serve.add_argument(
        "--ingredient-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder pushed specs may read ingredients, evaluation sets and configs from; repeatable "
        "(always allowed: the files the start-up specs name, the folders their spec files lie in, the demo folder)",
    )
    serve.add_argument("--tls-cert", metavar="F", help="serve TLS with this certificate (PEM), with --tls-key")
    serve.add_argument("--tls-key", metavar="F", help="the certificate's private key (PEM)")
    serve.add_argument("--tls-client-ca", metavar="F", help="require client certificates signed by this CA (mTLS)")

    merge = commands.add_parser("merge", help="merge a spec offline into a safetensors file, no server")
    merge.add_argument("spec", metavar="SPEC", help="a soup spec (YAML or JSON)")
    merge.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="where to write the merged .safetensors (a spec's tokenizer goes beside it, as tokenizer.json)",
    )
    merge.add_argument("--device", default="cpu", help="device to merge on (default: cpu)")
    merge.add_argument("--json", action="store_true", help="print a JSON summary instead of a sentence")
    _kernels_option(merge)
    _placement_option(merge, default="disk")

    profile = commands.add_parser("profile", help="how far apart a soup's ingredients lie, and what lies between them")
    profile.add_argument("spec", metavar="SPEC", help="a soup spec (YAML or JSON); sweep and calibration need its evaluation")
    profile.add_argument("--plot", metavar="OUT.png", help="where to write the plot (default: MODEL-profile.png here)")
    profile.add_argument("--between", nargs=2, metavar=("A", "B"), help="sweep between these ingredients (default: base to soup)")
    profile.add_argument("--points", type=_positive, default=11, metavar="N", help="points of the sweep (default: 11)")
    profile.add_argument("--split", metavar="NAME", help="the split the sweep scores (default: the evaluation's select)")
    profile.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    profile.add_argument("--json", action="store_true", help="print JSON for scripts")

    spec = commands.add_parser("spec", help="work with soup specs")
    spec_commands = spec.add_subparsers(dest="spec_command", required=True, metavar="SPEC_COMMAND")
    convert = spec_commands.add_parser("from-mergekit", help="convert a mergekit config ('models' or 'slices') to a spec")
    convert.add_argument("config", metavar="CONFIG.yml", help="a mergekit YAML config")
    convert.add_argument("-o", "--output", metavar="OUT", help="write the spec here instead of standard output")
    convert.add_argument("--model", help="the model name clients will call (default: the config's file name)")
    convert.add_argument("--json", action="store_true", help="write JSON instead of YAML")
    ops.add_commands(commands, spec_commands)
    return parser


def _kernels_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--merge-kernels",
        default="auto",
        choices=["auto", "compiled", "eager"],
        help="compiled: fused torch.compile kernels (seconds to compile once per kind of merge, then at memory "
        "speed); eager: plain torch ops; auto: compiled where it wins back its compile on a CPU (task-vector "
        "merges reading 2 GiB or more with sparsification, 16 GiB without; linear never) (default: auto)",
    )


def _placement_option(command: argparse.ArgumentParser, default: str = "auto") -> None:
    once = " (a one-shot merge reads each ingredient once: disk streams it, no copy to hold)" if default == "disk" else ""
    command.add_argument(
        "--ingredient-placement",
        default=default,
        choices=["auto", "device", "host", "disk"],
        help="where ingredients live between merges, for specs that name no placement: device memory, host memory "
        "(copied to the device piece by piece), or disk (read tensor by tensor during a merge, never held whole); "
        "auto: the device when the spec's ingredients fit in half its free memory, else host, else disk; on a CPU, "
        f"disk from 1 GiB of ingredients when the spec has no evaluation (default: {default}){once}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        commands = {"serve": _serve, "merge": _merge, "profile": _profile, "spec": _spec, **ops.COMMANDS}
        return int(commands[args.command](args))
    except ops.SoupClientError as exc:
        print(f"tureen: error: {exc} ({exc.code.name})", file=sys.stderr)
        return 1
    except (SoupError, OSError) as exc:
        print(f"tureen: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def default_store(demo_dir: Path | None = None) -> str:
    """$TUREEN_STORE, else the demo folder's store/ when serving a demo, else the XDG state
    directory's tureen/store. A demo keeps its versions beside its files: a store that another
    demo folder seeded would name that folder's files, which this demo's policy refuses."""
    if os.environ.get("TUREEN_STORE"):
        return os.environ["TUREEN_STORE"]
    if demo_dir is not None:
        return str(demo_dir / "store")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "tureen" / "store")


def _token(path: str | None, env: str, flag: str) -> str | None:
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise SoupError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
        if not token:
            raise SoupError(f"{flag}: {path} is empty")
        return token
    return os.environ.get(env) or None


def _folders(paths: Sequence[str]) -> list[str]:
    for path in paths:
        if not Path(path).is_dir():
            raise SoupError(f"--ingredient-root: {path} is not a folder")
    return list(paths)


def _demo(kind: str) -> Any:
    """The module that trains demo ``kind`` (``prepare``, ``default_cache_dir``)."""
    if kind == "llm":
        from tureen.demo import llm

        return llm
    from tureen.demo import train

    return train


def _finish_demo(args: argparse.Namespace, app: Any, demo_dir: Path) -> None:
    """The demo's second act (the greedy soup and the comparison), then how to call it."""
    host = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    if args.demo == "llm":
        from tureen.demo import llm_report

        llm_report.finish(app.controller, demo_dir)
        print(LLM_HINT.format(host=host, http_port=app.http_port, metrics_port=app.metrics_port), file=sys.stderr)
        return
    from tureen.demo.report import finish

    finish(app.controller, demo_dir)
    http = f"Over HTTP/REST: curl http://{host}:{app.http_port}/v2/models/digits\n" if app.http_port else ""
    print(CALL_HINT.format(host=host, port=app.grpc_port, metrics_port=app.metrics_port, http=http), file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from tureen.app import App, Settings
    from tureen.core.devices import resolve_device
    from tureen.core.store import SpecStore
    from tureen.spec import load_spec

    resolve_device(args.device)  # a wrong --device fails before any training or loading
    sources = [str(path) for path in args.spec]
    demo_dir: Path | None = None
    if args.demo:
        demo_dir = args.demo_dir or _demo(args.demo).default_cache_dir()
        sources.append(str(_demo(args.demo).prepare(demo_dir)))
    specs = [load_spec(path) for path in sources]
    store = args.store or default_store(demo_dir)
    if not specs and not SpecStore(store).models():
        raise SoupError(f"nothing to serve: give --spec FILE (repeatable) or --demo, or push specs to a store (--store {store})")
    settings = Settings(
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        device=args.device,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        grpc_workers=args.grpc_workers,
        cpu_threads=args.cpu_threads,
        ingredient_placement=args.ingredient_placement,
        merge_kernels=args.merge_kernels,
        store=store,
        keep_versions=args.keep_versions,
        blend_memory_bytes=args.blend_memory_mb * 1024 * 1024 if args.blend_memory_mb else None,
        poll_seconds=args.store_poll_seconds,
        admin_token=_token(args.admin_token_file, "TUREEN_ADMIN_TOKEN", "--admin-token-file"),
        inference_token=_token(args.inference_token_file, "TUREEN_INFERENCE_TOKEN", "--inference-token-file"),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        admin_allow_from=tuple(args.admin_allow_from) if args.admin_allow_from else None,
        insecure_open_admin=args.insecure_open_admin,
        allow_factories=tuple(args.allow_factory),
        ingredient_roots=tuple(_folders(args.ingredient_root)),
    )
    app = App(specs, settings, sources)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    app.start()
    try:
        blends = app.build_all()
        if demo_dir is not None:
            _finish_demo(args, app, demo_dir)
        _log.info("ready: %d model(s) serving; Ctrl-C or SIGTERM stops", len(blends))
        stopping.wait()
        _log.info("stopping")
    finally:
        app.stop()
    return 0


def _merge(args: argparse.Namespace) -> int:
    from tureen.core.devices import resolve_device
    from tureen.core.ingredients import IngredientPool
    from tureen.core.kitchen import Kitchen
    from tureen.core.observer import NullObserver
    from tureen.core.writer import SafetensorsWriter
    from tureen.spec import load_spec

    started = time.perf_counter()
    output = Path(args.output)
    if not output.parent.is_dir():
        raise SoupError(f"-o: folder {output.parent} does not exist")
    spec = load_spec(args.spec)
    pool = IngredientPool(resolve_device(args.device), NullObserver(), args.ingredient_placement)
    kitchen = Kitchen(pool, NullObserver(), args.merge_kernels)
    metadata = {"tureen.model": spec.model, "tureen.spec": spec.model_dump_json(by_alias=True)}
    writer = SafetensorsWriter(output, metadata)  # writes each tensor while the next ones merge
    try:
        merged = kitchen.merge(spec, tokenizer_to=output.parent, sink=writer)
        writer.close()
    except OSError as exc:
        writer.abort()
        raise SoupError(f"-o: cannot write {output}: {exc.strerror or exc}") from None
    except BaseException:
        writer.abort()
        raise
    summary = {
        "output": args.output,
        "model": spec.model,
        "method": spec.merge.method,
        "ingredients": len(spec.ingredients),
        "tensors": len(merged),
        "parameters": sum(t.numel() for t in merged.values()),
        "dtype": spec.dtype,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if spec.tokenizer is not None:
        summary["tokenizer"] = str(output.parent / "tokenizer.json")
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"merged {summary['ingredients']} ingredients of {spec.model!r} with {spec.merge.method} into "
            f"{args.output}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
            f"{spec.dtype}, {summary['seconds']} s"
        )
        if "tokenizer" in summary:
            print(f"the blend's tokenizer ({spec.tokenizer.source if spec.tokenizer else ''}): {summary['tokenizer']}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from tureen.core.devices import resolve_device
    from tureen.plots import PlotUnavailable, plot_profile
    from tureen.profile import profile, render
    from tureen.spec import load_spec

    spec = load_spec(args.spec)
    output = Path(args.plot or f"{spec.model}-profile.png")
    if not output.parent.is_dir():
        raise SoupError(f"--plot: folder {output.parent} does not exist")
    result = profile(spec, resolve_device(args.device), tuple(args.between) if args.between else None, args.points, args.split)
    if not args.json:
        print(render(result))
    written: Path | None = None
    try:
        written = plot_profile(result, output)
    except PlotUnavailable as exc:
        if args.plot:  # asked for by name: not having it is an error; by default the tables are enough
            raise
        print(f"tureen: note: no plot: {exc}", file=sys.stderr)
    if args.json:
        print(json.dumps({**result.document(), "plot": str(written) if written else None}))
    elif written is not None:
        print(f"\nplot written to {written}")
    return 0


def _spec(args: argparse.Namespace) -> int:
    if args.spec_command == "show":
        return ops.show_spec(args)
    import yaml

    from tureen.mergekit_config import from_mergekit, missing_paths
    from tureen.spec import spec_document

    path = Path(args.config)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SoupError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SoupError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise SoupError(f"{path}: expected a mapping at the top level")
    model = args.model or re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)
    spec, notes = from_mergekit(config, model, source=str(path))
    document = spec_document(spec)
    text = json.dumps(document, indent=2) if args.json else yaml.safe_dump(document, sort_keys=False)
    header = f"# Converted by `tureen spec from-mergekit {path.name}`. Add `architecture` to serve it.\n"
    if args.output:
        Path(args.output).write_text(("" if args.json else header) + text)
    else:
        print(("" if args.json else header) + text, end="")
    for note in [*notes, *missing_paths(spec, Path(args.output).parent if args.output else Path.cwd())]:
        print(f"tureen: note: {note}", file=sys.stderr)
    return 0
