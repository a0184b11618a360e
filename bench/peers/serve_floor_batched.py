"""The batched floor: ``serve_floor.py`` with the least a dynamic batcher needs (delay 0: each batch
takes every request queued while the last one ran, one forward, rows split back), and nothing
else: no accounting, no metrics, no checks. What no batched Python server of the same model beats.

    python serve_floor_batched.py --weights DIR --port P [--server aio|threads]

``aio``: grpc.aio on uvloop, the batcher on the event loop and the forward on one worker thread
(Tureen's model). ``threads``: grpcio's thread-pool server (16 threads), each handler queueing its
request for one batching thread. Either way the forward runs with ``--torch-threads`` threads
(default 1: the other core receives meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from models import MODELS
from serve_floor import Floor
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

warnings.filterwarnings("ignore", "The given NumPy array is not writable")


class Batched(Floor):
    """Inputs in, a forward per batch, each request's rows out."""

    def forward(self, model: str, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        with torch.inference_mode():
            result = self.modules[model](torch.cat(inputs))
        rows, start = [], 0
        for x in inputs:
            rows.append({name: tensor[start : start + x.shape[0]] for name, tensor in result.items()})
            start += x.shape[0]
        return rows

    @staticmethod
    def decode(request: pb.ModelInferRequest) -> torch.Tensor:
        _, features, _ = MODELS[request.model_name]
        raw = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        return torch.from_numpy(raw.reshape(int(request.inputs[0].shape[0]), features))

    @staticmethod
    def encode(request: pb.ModelInferRequest, result: dict[str, torch.Tensor]) -> pb.ModelInferResponse:
        reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for output in MODELS[request.model_name][2]:
            reply.outputs.add(name=output, datatype="FP32", shape=list(result[output].shape))
            reply.raw_output_contents.append(result[output].numpy().tobytes())
        return reply


class OnTheLoop(Batched):
    def __init__(self, work: Path, threads: int) -> None:
        super().__init__(work)
        self.queued: list[tuple[str, torch.Tensor, asyncio.Future[dict[str, torch.Tensor]]]] = []
        self.busy = False
        self.worker = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        done = asyncio.get_running_loop().create_future()
        self.queued.append((request.model_name, self.decode(request), done))
        if not self.busy:
            self.busy = True
            asyncio.get_running_loop().create_task(self.drain())
        return self.encode(request, await done)

    async def drain(self) -> None:
        while self.queued:
            model = self.queued[0][0]
            batch = [entry for entry in self.queued if entry[0] == model]
            self.queued = [entry for entry in self.queued if entry[0] != model]
            rows = await asyncio.get_running_loop().run_in_executor(self.worker, self.forward, model, [e[1] for e in batch])
            for (_, _, done), result in zip(batch, rows, strict=True):
                done.set_result(result)
        self.busy = False


class OnAThread(Batched):
    def __init__(self, work: Path, threads: int) -> None:
        super().__init__(work)
        self.queued: queue.Queue[tuple[str, torch.Tensor, Future[dict[str, torch.Tensor]]]] = queue.Queue()
        threading.Thread(target=self.run, args=(threads,), daemon=True).start()

    def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        done: Future[dict[str, torch.Tensor]] = Future()
        self.queued.put((request.model_name, self.decode(request), done))
        return self.encode(request, done.result())

    def run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        while True:
            taken = [self.queued.get()]
            while not self.queued.empty():
                taken.append(self.queued.get_nowait())
            for model in dict.fromkeys(entry[0] for entry in taken):
                batch = [entry for entry in taken if entry[0] == model]
                for (_, _, done), result in zip(batch, self.forward(model, [e[1] for e in batch]), strict=True):
                    done.set_result(result)


async def serve_on_the_loop(work: Path, port: int, threads: int) -> None:
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(OnTheLoop(work, threads), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True, help="the folder of the merged weights")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=("aio", "threads"), default="aio")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    if args.server == "aio":
        import uvloop

        uvloop.run(serve_on_the_loop(args.weights, args.port, args.torch_threads))
    else:
        server = grpc.server(ThreadPoolExecutor(max_workers=16))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(OnAThread(args.weights, args.torch_threads), server)
        server.add_insecure_port(f"127.0.0.1:{args.port}")
        server.start()
        server.wait_for_termination()
