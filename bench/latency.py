"""What a request costs Tureen on top of the model: measured side by side in one run.

    python bench/latency.py [--requests 2000] [--batch 1] [--hidden 128]

Rows, each the median (and p99) of --requests sequential calls on loopback:
  bare forward     the blend's module called directly under inference_mode
  gRPC echo        a bare grpc server that returns the request bytes (the transport floor)
  tureen, stub     ModelInfer with a prebuilt request through the generated stub
  tureen, client   tritonclient.grpc's infer(), as applications call it

"server's own work" = tureen (stub) - gRPC echo - bare forward: decode, checks, metrics,
statistics and encode. Server and client share this process, as they do for the echo row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
import tritonclient.grpc as grpcclient
import yaml
from safetensors.torch import save_file
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tureen.app import App, Settings
from tureen.demo.models import DigitsMLP
from tureen.spec import load_spec


def timed(call: Callable[[], object], count: int) -> tuple[float, float]:
    for _ in range(min(200, count)):
        call()
    samples = []
    for _ in range(count):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return statistics.median(samples) / 1e6, samples[int(0.99 * (len(samples) - 1))] / 1e6


def echo_server() -> tuple[grpc.Server, int]:
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main() -> None:
    parser = argparse.ArgumentParser(description="Tureen's per-request overhead against a bare forward and a bare gRPC echo.")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="tureen-bench-"))
    ingredients = []
    for i in range(3):
        torch.manual_seed(i)
        save_file(DigitsMLP(hidden=args.hidden).state_dict(), str(folder / f"ft-{i}.safetensors"))
        ingredients.append({"name": f"ft-{i}", "path": f"ft-{i}.safetensors"})
    document = {
        "apiVersion": "tureen/v1",
        "model": "digits",
        "architecture": {"factory": "tureen.demo.models:mlp", "kwargs": {"hidden": args.hidden}},
        "ingredients": ingredients,
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(document))
    settings = Settings(host="127.0.0.1", grpc_port=0, http_port=None, metrics_port=0, device="cpu")
    app = App([load_spec(folder / "spec.yaml")], settings)
    app.start()
    app.build_all()
    echo, echo_port = echo_server()
    try:
        x = np.random.default_rng(0).uniform(0, 16, size=(args.batch, 64)).astype(np.float32)
        blend = app.repository.active("digits")
        tensor = torch.from_numpy(x)
        forward = timed(lambda: blend.forward({"pixels": tensor}), args.requests)

        request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="pixels", datatype="FP32", shape=list(x.shape))
        payload = request.SerializeToString()
        with grpc.insecure_channel(f"127.0.0.1:{echo_port}") as channel:
            call = channel.unary_unary("/bench.Echo/Echo", _registered_method=True)
            echo_row = timed(lambda: call(payload), args.requests)
        with grpc.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stub_row = timed(lambda: stub.ModelInfer(request), args.requests)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
            infer_input = grpcclient.InferInput("pixels", list(x.shape), "FP32")
            infer_input.set_data_from_numpy(x)
            client_row = timed(lambda: client.infer("digits", [infer_input]), args.requests)
    finally:
        echo.stop(0)
        app.stop(0)

    print(
        f"DigitsMLP hidden={args.hidden}, batch {args.batch}, {args.requests} sequential requests, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'path':<18}{'p50 ms':>10}{'p99 ms':>10}")
    for name, (p50, p99) in (
        ("bare forward", forward),
        ("gRPC echo", echo_row),
        ("tureen, stub", stub_row),
        ("tureen, client", client_row),
    ):
        print(f"{name:<18}{p50:>10.3f}{p99:>10.3f}")
    own = stub_row[0] - echo_row[0] - forward[0]
    print(f"server's own work per request (p50): {own:.3f} ms = {own / echo_row[0]:.2f}x a bare gRPC echo")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
