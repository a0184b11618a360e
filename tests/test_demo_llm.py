"""`tureen serve --demo llm`: trained once on the standard library, then served as an LLM."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from helpers import serve_process

pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

SPLITS = ("test-asyncio", "test-email", "test-json-http", "test-unittest")


def test_the_llm_demo_trains_once_then_serves_its_greedy_soup_as_an_llm(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo-llm"
    for run in ("first", "cached"):
        # The issue asks for a first run under 3 minutes on 2 cores; machines differ (2.7 to 5.5 minutes seen), and the timeout only guards a hang.
        with serve_process(["--demo", "llm", "--demo-dir", str(demo_dir)], timeout=900) as (_process, _grpc, _metrics, lines):
            log = "".join(lines)
            assert ("first run, a" in log) == (run == "first") and ("reusing" in log) == (run == "cached"), run
            http_port = int(re.search(r"HTTP/REST \(KServe v2\) on [\d.]+:(\d+)", log).group(1))
            for split in SPLITS:  # the ingredients alone, both soups and the ensemble, each a perplexity
                row = re.search(rf"demo llm:   {split} +((?:[\d.]+ +){{6}}[\d.]+)\n", log)
                assert row is not None, split
                assert all(1.0 < float(value) < 2048 for value in row.group(1).split())  # better than a uniform guess
            quiz = re.search(r"demo llm:   next-line +((?:[\d.]+ +){5}[\d.]+)\n", log)  # fine-tunes and both soups
            assert quiz is not None and all(0.0 <= float(value) <= 1.0 for value in quiz.group(1).split())
            assert re.search(r"the greedy soup kept [a-z, -]+ \(val perplexity [\d.]+\)", log)
            assert f"served on 127.0.0.1:{http_port}" in log  # how to call it

            body = json.dumps({"text_input": "def __init__(self", "parameters": {"max_tokens": 12, "temperature": 0}})
            url = f"http://127.0.0.1:{http_port}/v2/models/stdlib/generate"
            done = subprocess.run(["curl", "-sf", url, "-d", body], capture_output=True, text=True, timeout=60, check=True)
            answer = json.loads(done.stdout)
            assert answer["model_version"] == "2" and answer["text_output"].startswith("def __init__(self")
            assert len(answer["text_output"]) > len("def __init__(self")

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
            completion = client.completions.create(model="stdlib", prompt="class ", max_tokens=12, temperature=0)
            assert completion.usage.completion_tokens == 12 and completion.system_fingerprint == "stdlib-v2"
            assert completion.choices[0].text == answer_for(client, "class ")


def answer_for(client: object, prompt: str) -> str:
    """The same greedy completion again: decoding is deterministic."""
    return client.completions.create(model="stdlib", prompt=prompt, max_tokens=12, temperature=0).choices[0].text  # type: ignore[attr-defined]
