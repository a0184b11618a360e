"""Generation: time to first token and tokens/s of a served LLM soup against a bare
``model.generate`` of the same weights, at concurrency 1 and 8, in one run.

    python bench/generate.py [--models demo,100m] [--tokens 64] [--requests 8] [--demo-dir DIR]

``demo`` is the soup ``tureen serve --demo llm`` serves (its four fine-tunes, trained first if
the demo's cache is empty); ``100m`` is a generated Llama of about 100M parameters (random
weights, a byte-level BPE tokenizer trained on the standard library's source) with two
fine-tunes written as ingredients. Each uniform soup is served by ``tureen serve`` in a process
of its own. Clients stream ``/v2/models/{m}/generate_stream`` (greedy, ``ignore_eos``,
``--tokens`` tokens each) from threads of this process: c=1 runs ``--requests`` requests one
after another, c=8 runs eight closed-loop clients of ``--requests`` requests each. The floor is
``model.generate`` on the merged weights in this process while the server is idle: first-token
time is a ``max_new_tokens=1`` call, throughput a batch of 1 and a batch of 8 prompts; both
sides use ``--cpu-threads`` torch threads (default: the server's own default, the cores less
one, which leaves a core to the serving loop). Printed:
TTFT p50 and aggregate tokens/s per point, and the issue's two ratios (TTFT c=1 served/bare
<= 1.2; tokens/s c=8/c=1 served >= 3).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"100m": (768, 2048, 12, 12, 8192)}
"""Generated models: name -> (hidden, intermediate, layers, heads, vocab)."""
PROMPT = "class JSONDecoder(object):\n    def __init__(self, *, object_hook=None, parse_float=None"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_model(demo_dir: Path | None) -> Path:
    """The LLM demo's uniform soup spec (training the demo first when its cache is empty)."""
    from tureen.demo import llm

    return llm.prepare(demo_dir or llm.default_cache_dir())


def write_model(work: Path, name: str) -> Path:
    """Two fine-tunes of a generated Llama in work/NAME-ft{0,1} and their spec."""
    import transformers

    from tureen.demo.llm import END, byte_level_bpe, save_tokenizer

    hidden, intermediate, layers, heads, vocab = SIZES[name]
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    tokenizer = byte_level_bpe([p.read_text(encoding="utf-8", errors="replace") for p in sources], vocab)
    end = tokenizer.token_to_id(END)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        eos_token_id=end,
        bos_token_id=end,
    )
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
        folder = work / f"{name}-ft{seed}"
        model.save_pretrained(folder)
        save_tokenizer(tokenizer, folder)
    spec = {
        "apiVersion": "tureen/v1",
        "model": name,
        "architecture": {"huggingface": f"{name}-ft0", "task": "causal-lm"},
        "ingredients": [{"name": f"ft{i}", "path": f"{name}-ft{i}"} for i in (0, 1)],
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def stream_once(port: int, model: str, tokens: int) -> tuple[float, float, int]:
    """(seconds to the first event, seconds to the end, tokens) of one streamed generation."""
    body = {"text_input": PROMPT, "parameters": {"max_tokens": tokens, "temperature": 0, "ignore_eos": True}}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", f"/v2/models/{model}/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:  # a model still building answers 503
        raise RuntimeError(f"{response.status}: {response.read().decode()}")
    first = None
    for line in response:
        if line.startswith(b"data: "):
            first = first or time.perf_counter() - started
            if b'"error"' in line:
                raise RuntimeError(line.decode())
    total = time.perf_counter() - started
    connection.close()
    return first or total, total, tokens


def served(port: int, model: str, clients: int, requests: int, tokens: int) -> tuple[float, float]:
    """(TTFT p50 seconds, aggregate tokens/s) of ``clients`` closed-loop clients."""
    firsts: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(requests):
            first, _, _ = stream_once(port, model, tokens)
            with lock:
                firsts.append(first)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return statistics.median(firsts), clients * requests * tokens / elapsed


def bare(spec_path: Path, tokens: int, repeats: int) -> dict[str, float]:
    """model.generate on the uniform average of the spec's ingredients, in this process."""
    import transformers
    from safetensors.torch import load_file

    spec = yaml.safe_load(spec_path.read_text())
    folder = spec_path.parent
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / spec["architecture"]["huggingface"]).eval()
    states = [load_file(str(folder / ref["path"] / "model.safetensors")) for ref in spec["ingredients"]]
    model.load_state_dict({k: sum(state[k] for state in states) / len(states) for k in states[0]}, strict=False)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder / spec["architecture"]["huggingface"])
    ids = torch.tensor([tokenizer.encode(PROMPT)])

    def run(batch: int, new: int) -> float:
        prompt = ids.repeat(batch, 1)
        started = time.perf_counter()
        with torch.inference_mode():
            mask = torch.ones_like(prompt)
            model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - started

    for _ in range(4):  # the first calls on fresh weights run several times slower (first touch of their pages)
        run(1, 2)
        run(8, 2)
    first = statistics.median(run(1, 1) for _ in range(repeats))
    one = statistics.median(tokens / run(1, tokens) for _ in range(max(1, repeats // 4)))
    eight = statistics.median(8 * tokens / run(8, tokens) for _ in range(max(1, repeats // 4)))
    return {"ttft": first, "c1": one, "c8": eight, "parameters": sum(p.numel() for p in model.parameters())}


def bench(work: Path, name: str, args: argparse.Namespace) -> dict[str, float]:
    spec = demo_model(args.demo_dir) if name == "demo" else write_model(work, name)
    model = yaml.safe_load(spec.read_text())["model"]
    port = free_port()
    command = [sys.executable, "-m", "tureen", "--log-level", "warning", "serve", "--host", "127.0.0.1", "--spec", str(spec)]
    command += ["--grpc-port", "0", "--metrics-port", "0", "--http-port", str(port), "--store", str(work / f"store-{name}")]
    command += ["--cpu-threads", str(args.cpu_threads)]
    log = open(work / f"{name}-server.log", "wb")  # noqa: SIM115 (closed with the server)
    server = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                stream_once(port, model, 2)
                break
            except (OSError, http.client.HTTPException, RuntimeError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server for {name} did not start") from None
                time.sleep(0.5)
        stream_once(port, model, args.tokens)  # warm-up
        floor = bare(spec, args.tokens, args.requests)
        ttft1, rate1 = served(port, model, 1, args.requests, args.tokens)
        ttft8, rate8 = served(port, model, 8, args.requests, args.tokens)
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    print(f"{name}: {floor['parameters'] / 1e6:.1f}M parameters, {args.tokens} tokens per request", flush=True)
    return {"ttft1": ttft1, "rate1": rate1, "ttft8": ttft8, "rate8": rate8, **{f"bare_{k}": v for k, v in floor.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,100m", help=f"comma-separated, of demo, {', '.join(SIZES)}")
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="torch threads of the server and of the bare loop alike (default: the server's own, the cores less one)",
    )
    parser.add_argument("--demo-dir", type=Path, help="the LLM demo's cache (default: tureen serve --demo llm's)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tureen-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.cpu_threads)
    results = {name: bench(work, name, args) for name in args.models.split(",")}
    columns = ["TTFT p50 c=1 ms", "bare first token ms", "TTFT p50 c=8 ms", "tokens/s c=1", "tokens/s c=8"]
    columns += ["bare tokens/s batch 1", "bare tokens/s batch 8"]
    print("\n| model | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['ttft1'] * 1e3:.1f} | {r['bare_ttft'] * 1e3:.1f} | {r['ttft8'] * 1e3:.1f} | {r['rate1']:.0f} | "
            f"{r['rate8']:.0f} | {r['bare_c1']:.0f} | {r['bare_c8']:.0f} |"
        )
    print()
    for name, r in results.items():
        print(f"{name}: TTFT c=1 served / bare first token (target <= 1.2): {r['ttft1'] / r['bare_ttft']:.2f}")
        print(f"{name}: tokens/s c=8 / c=1 served (target >= 3): {r['rate8'] / r['rate1']:.2f}")
        print(f"{name}: tokens/s c=1 served / bare batch 1: {r['rate1'] / r['bare_c1']:.2f}")
        print(f"{name}: tokens/s c=8 served / bare batch 8: {r['rate8'] / r['bare_c8']:.2f}")


if __name__ == "__main__":
    main()
