"""A causal-LM soup served as an LLM: text in, generated text out, over every protocol.

The soup is two tiny random Llama fine-tunes with a byte-level BPE tokenizer trained on the
standard library's json package; greedy generations are checked against transformers'
``model.generate`` on the hand-averaged weights.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from helpers import llama_with_tokens, running_app, sample, scrape, text_llama, write_spec
from tureen.spec import load_spec

transformers = pytest.importorskip("transformers", reason="the tureen[hf] extra is not installed")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

PROMPT = "def loads(s, *, cls=None"


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Any]]:
    """(app, the reference model with the soup's weights, its tokenizer), served once for the module."""
    folder = tmp_path_factory.mktemp("llm")
    states = text_llama(folder)
    document = {
        "apiVersion": "tureen/v1",
        "model": "tiny",
        "architecture": {"huggingface": "ft-0", "task": "causal-lm"},
        "ingredients": [{"name": "ft-0", "path": "ft-0"}, {"name": "ft-1", "path": "ft-1"}],
    }
    spec = load_spec(write_spec(folder, document))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder / "ft-0").eval()
    reference.load_state_dict({k: (states[0][k].double() + states[1][k].double()).div(2).float() for k in states[0]})
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder / "ft-0")
    with running_app([spec]) as app:
        yield app, reference, tokenizer


def greedy(reference: Any, tokenizer: Any, prompt: str, tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def text_inputs(prompt: str, **scalars: Any) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    for name, value in scalars.items():
        kind = {bool: ("BOOL", np.bool_), int: ("INT32", np.int32), float: ("FP32", np.float32)}[type(value)]
        tensor = grpcclient.InferInput(name, [1], kind[0])
        tensor.set_data_from_numpy(np.array([value], dtype=kind[1]))
        inputs.append(tensor)
    return inputs


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def events(raw: bytes) -> list[Any]:
    return [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_greedy_text_over_grpc_equals_model_generate(llm: tuple[Any, Any, Any]) -> None:
    app, reference, tokenizer = llm
    expected = greedy(reference, tokenizer, PROMPT, 12)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        result = client.infer("tiny", text_inputs(PROMPT, max_tokens=12), parameters={"temperature": 0.0})
        alone = client.infer(
            "tiny", text_inputs(PROMPT), parameters={"temperature": 0.0, "max_tokens": 12, "exclude_input_in_output": True}
        )
    assert result.as_numpy("text_output")[0].decode() == PROMPT + expected  # the prompt first, as Triton's vLLM backend
    assert alone.as_numpy("text_output")[0].decode() == expected
    assert alone.get_response().model_version == "1"


def test_streamed_text_over_grpc_arrives_in_chunks_with_a_final_flag(llm: tuple[Any, Any, Any]) -> None:
    app, reference, tokenizer = llm
    expected = greedy(reference, tokenizer, PROMPT, 20)
    responses: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(
            "tiny",
            text_inputs(PROMPT, stream=True),
            parameters={"temperature": 0.0, "max_tokens": 20},
            enable_empty_final_response=True,
        )
        pieces, finals = [], []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None
            response = result.get_response()
            finals.append(response.parameters["triton_final_response"].bool_param)
            if finals[-1]:
                break
            pieces.append(result.as_numpy("text_output")[0].decode())
        client.stop_stream()
    assert "".join(pieces) == expected
    assert len(pieces) > 1 and finals == [False] * len(pieces) + [True]


def test_the_generate_extension_answers_and_streams(llm: tuple[Any, Any, Any]) -> None:
    app, reference, tokenizer = llm
    expected = greedy(reference, tokenizer, PROMPT, 10)
    body = {"text_input": PROMPT, "max_tokens": 10, "parameters": {"temperature": 0, "exclude_input_in_output": True}}
    status, raw = post(app.http_port, "/v2/models/tiny/generate", body)
    assert status == 200, raw
    assert json.loads(raw) == {"model_name": "tiny", "model_version": "1", "text_output": expected}
    status, raw = post(app.http_port, "/v2/models/tiny/versions/1/generate_stream", body)
    chunks = events(raw)
    assert status == 200 and len(chunks) > 1
    assert "".join(c["text_output"] for c in chunks) == expected


def test_both_openai_routes_answer_and_stream_with_usage(llm: tuple[Any, Any, Any]) -> None:
    app, reference, tokenizer = llm
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    expected = greedy(reference, tokenizer, PROMPT, 8)
    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) and completion.usage.completion_tokens == 8
    assert completion.system_fingerprint == "tiny-v1"
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected

    messages = [{"role": "user", "content": "parse this"}]
    chat_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_chat = greedy(reference, tokenizer, chat_prompt, 8)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == expected_chat and chat.choices[0].message.role == "assistant"
    pieces = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_chat
    assert chunks[-1].usage.completion_tokens == 8


def test_a_seeded_sample_is_deterministic(llm: tuple[Any, Any, Any]) -> None:
    app, _, _ = llm
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="none")

    def draw(seed: int) -> str:
        answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return answer.choices[0].text

    assert draw(7) == draw(7)
    assert len({draw(seed) for seed in range(4)}) > 1


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"beams": 2}, "beams"),
        ({"max_tokens": 600}, "max_tokens"),
    ],
    ids=["negative-max-tokens", "nan-temperature", "zero-top-p", "unknown", "past-the-context"],
)
def test_bad_sampling_parameters_are_refused_by_name(llm: tuple[Any, Any, Any], parameters: dict, field: str) -> None:
    app, _, _ = llm
    with (
        grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client,
        pytest.raises(InferenceServerException, match=rf"parameters\.{field}") as caught,
    ):
        client.infer("tiny", text_inputs(PROMPT), parameters=parameters)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    status, raw = post(app.http_port, "/v2/models/tiny/generate", {"text_input": PROMPT, "parameters": parameters})
    assert status == 400 and f"parameters.{field}" in json.loads(raw)["error"]
    if field == "temperature":
        return  # OpenAI's client cannot send a NaN: JSON has none
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=field) as refused:
        client.completions.create(model="tiny", prompt=PROMPT, extra_body=parameters)
    assert refused.value.body["param"] == field


def test_a_prompt_longer_than_the_context_is_refused(llm: tuple[Any, Any, Any]) -> None:
    app, _, _ = llm
    status, raw = post(app.http_port, "/v2/models/tiny/generate", {"text_input": PROMPT * 100})
    assert status == 400 and "text_input: the prompt is" in json.loads(raw)["error"]


def test_token_metrics_count_prompt_and_generated_tokens(llm: tuple[Any, Any, Any]) -> None:
    app, _, tokenizer = llm
    before = scrape(app)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="none")
    for tokens in (3, 5):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=tokens, temperature=0)
    after = scrape(app)

    def grew(name: str) -> float:
        return sample(after, name, model="tiny", version="1") - (sample(before, name, model="tiny", version="1") or 0)

    assert grew("tureen_generation_tokens_total") == 8
    assert grew("tureen_prompt_tokens_total") == 2 * len(tokenizer.encode(PROMPT))
    assert grew("tureen_time_to_first_token_seconds_count") == 2
    assert grew("tureen_inter_token_latency_seconds_count") == 2 + 4
    assert sample(after, "tureen_requests_running", model="tiny", version="1") == 0


def test_a_stream_whose_client_goes_away_stops_generating(llm: tuple[Any, Any, Any]) -> None:
    app, _, _ = llm
    before = scrape(app)
    connection = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=30)
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 480, "temperature": 0, "ignore_eos": True}}
    connection.request("POST", "/v2/models/tiny/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # generating
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = scrape(app)  # the stream counts the cancel at once, the loop drops the row at its next step
        counted = sample(after, "tureen_request_failure_total", model="tiny", version="1", reason="cancelled")
        if counted and sample(after, "tureen_requests_running", model="tiny", version="1") == 0:
            break
        time.sleep(0.05)
    cancelled = sample(after, "tureen_request_failure_total", model="tiny", version="1", reason="cancelled")
    made = sample(after, "tureen_generation_tokens_total", model="tiny", version="1") - (
        sample(before, "tureen_generation_tokens_total", model="tiny", version="1") or 0
    )
    assert cancelled == (sample(before, "tureen_request_failure_total", model="tiny", version="1", reason="cancelled") or 0) + 1
    assert 1 <= made < 480  # it stopped well before max_tokens
    assert sample(after, "tureen_requests_running", model="tiny", version="1") == 0


def test_generations_started_before_a_swap_finish_on_their_blend(tmp_path: Path) -> None:
    states = text_llama(tmp_path, seeds=(0, 1, 2))
    document = {
        "apiVersion": "tureen/v1",
        "model": "tiny",
        "architecture": {"huggingface": "ft-0", "task": "causal-lm"},
        "ingredients": [{"name": f"ft-{i}", "path": f"ft-{i}"} for i in range(3)],
        "merge": {"weights": {"ft-0": 1.0, "ft-1": 1.0, "ft-2": 0.0}},
    }
    first = load_spec(write_spec(tmp_path, document, "v1.yaml"))
    second = load_spec(
        write_spec(tmp_path, {**document, "merge": {"weights": {"ft-0": 0.0, "ft-1": 1.0, "ft-2": 1.0}}}, "v2.yaml")
    )
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "ft-0")
    expected = {}
    for version, (a, b) in (("1", (0, 1)), ("2", (1, 2))):
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ft-0").eval()
        reference.load_state_dict({k: (states[a][k].double() + states[b][k].double()).div(2).float() for k in states[0]})
        expected[version] = greedy(reference, tokenizer, PROMPT, 120)
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 120, "temperature": 0, "exclude_input_in_output": True}}
    with running_app([first]) as app, ThreadPoolExecutor(8) as pool:
        early = [pool.submit(post, app.http_port, "/v2/models/tiny/generate", body) for _ in range(4)]
        time.sleep(0.2)
        app.controller.push(second, "test", wait=True)
        late = [pool.submit(post, app.http_port, "/v2/models/tiny/generate", body) for _ in range(2)]
        answers = [json.loads(f.result()[1]) for f in early + late]
    assert all(a["text_output"] == expected[a["model_version"]] for a in answers), answers
    assert [a["model_version"] for a in answers[4:]] == ["2", "2"]
    assert "1" in {a["model_version"] for a in answers[:4]}


def test_a_generation_that_arrives_mid_batch_joins_it_and_both_equal_model_generate(llm: tuple[Any, Any, Any]) -> None:
    app, reference, tokenizer = llm
    other = "class JSONDecodeError(ValueError):"
    expected = {PROMPT: greedy(reference, tokenizer, PROMPT, 300), other: greedy(reference, tokenizer, other, 10)}
    finished: list[str] = []

    def generate(prompt: str, tokens: int) -> str:
        body = {"text_input": prompt, "parameters": {"max_tokens": tokens, "temperature": 0, "exclude_input_in_output": True}}
        status, raw = post(app.http_port, "/v2/models/tiny/generate", body)
        assert status == 200, raw
        finished.append(prompt)
        return json.loads(raw)["text_output"]

    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(generate, PROMPT, 300)
        time.sleep(0.05)  # the long one is generating: the short one joins its batch
        short = pool.submit(generate, other, 10)
        assert long.result() == expected[PROMPT] and short.result() == expected[other]
    assert finished == [other, PROMPT]  # the short one did not wait for the long one's batch to end


def test_openai_defaults_null_fields_and_a_chat_that_runs_to_the_end_of_the_context(llm: tuple[Any, Any, Any]) -> None:
    app, _, _ = llm
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="none")
    plain = client.completions.create(
        model="tiny", prompt=PROMPT, temperature=0, extra_body={"stop": None, "logprobs": None, "user": "someone"}
    )
    assert plain.usage.completion_tokens == 16  # OpenAI's default for completions
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "go"}],
        temperature=0,
        extra_body={"ignore_eos": True, "logprobs": False},
    )
    assert chat.choices[0].finish_reason == "length" and chat.usage.total_tokens == 512  # the whole context


def test_a_stream_without_an_empty_final_response_flags_its_last_text(llm: tuple[Any, Any, Any]) -> None:
    app, reference, tokenizer = llm
    expected = greedy(reference, tokenizer, PROMPT, 6)
    responses: queue.Queue[Any] = queue.Queue()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("tiny", text_inputs(PROMPT, stream=True), parameters={"temperature": 0.0, "max_tokens": 6})
        client.async_stream_infer("tiny", text_inputs(PROMPT), parameters={"temperature": 0.0, "max_tokens": 6})
        pieces, whole = [], None
        while whole is None:
            result, error = responses.get(timeout=60)
            assert error is None and result.as_numpy("text_output") is not None  # every response carries text
            text = result.as_numpy("text_output")[0].decode()
            final = result.get_response().parameters["triton_final_response"].bool_param
            if pieces and pieces[-1][1]:  # the streamed one ended: this is the one-shot answer
                whole = (text, final)
            else:
                pieces.append((text, final))
        client.stop_stream()
    assert "".join(text for text, _ in pieces) == expected and [f for _, f in pieces][-1] is True
    assert not any(f for _, f in pieces[:-1])
    assert whole == (PROMPT + expected, True)


def test_a_text_request_that_cannot_be_decoded_is_counted_against_its_model(llm: tuple[Any, Any, Any]) -> None:
    app, _, _ = llm

    def refused() -> float:
        return sample(scrape(app), "tureen_request_failure_total", model="tiny", version="1", reason="invalid_argument") or 0

    before = refused()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client:
        bad = [*text_inputs(PROMPT), grpcclient.InferInput("sampling_parameters", [1], "BYTES")]
        bad[-1].set_data_from_numpy(np.array([b"{not json"], dtype=np.object_))
        with pytest.raises(InferenceServerException, match="sampling_parameters: not JSON"):
            client.infer("tiny", bad)
    status, _ = post(app.http_port, "/v2/models/tiny/generate", {"text_input": 7})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2)
    assert status == 400 and refused() == before + 3


def test_text_over_http_infer_equals_model_generate_with_json_and_binary_tensors(llm: tuple[Any, Any, Any]) -> None:
    app, reference, tokenizer = llm
    expected = greedy(reference, tokenizer, PROMPT, 10)
    with httpclient.InferenceServerClient(f"127.0.0.1:{app.http_port}") as client:
        answers = []
        for binary in (True, False):
            inputs = [httpclient.InferInput("text_input", [1], "BYTES"), httpclient.InferInput("max_tokens", [1], "INT32")]
            inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_), binary_data=binary)
            inputs[1].set_data_from_numpy(np.array([10], dtype=np.int32), binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("text_output", binary_data=binary)]
            result = client.infer("tiny", inputs, outputs=outputs, request_id=f"h{binary}", parameters={"temperature": 0.0})
            answers.append(result.as_numpy("text_output")[0])
            assert result.get_response()["model_version"] == "1" and result.get_response()["id"] == f"h{binary}"
        inputs[1].set_data_from_numpy(np.array([-1], dtype=np.int32))
        with pytest.raises(InferenceServerException, match="max_tokens"):
            client.infer("tiny", inputs)
    assert [a.decode() if isinstance(a, bytes) else a for a in answers] == [PROMPT + expected] * 2
    status, raw = post(
        app.http_port,
        "/v2/models/tiny/infer",
        {
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
            "parameters": {"max_tokens": 4, "stream": True},
        },
    )
    assert status == 400 and b"parameters.stream" in raw


@pytest.mark.parametrize("path", ["/v2/models/tiny/generate", "/v1/completions", "/v2/models/tiny/infer"])
def test_a_non_streamed_generation_whose_client_goes_away_stops(llm: tuple[Any, Any, Any], path: str) -> None:
    app, _, _ = llm
    cancelled = lambda page: sample(page, "tureen_request_failure_total", model="tiny", version="1", reason="cancelled") or 0  # noqa: E731
    tokens = lambda page: sample(page, "tureen_generation_tokens_total", model="tiny", version="1") or 0  # noqa: E731
    before = scrape(app)
    sampling = {"max_tokens": 480, "temperature": 0, "ignore_eos": True}
    body: dict[str, Any] = {"text_input": PROMPT, "parameters": sampling}
    if path == "/v1/completions":
        body = {"model": "tiny", "prompt": PROMPT, **sampling}
    elif path.endswith("/infer"):
        body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}], "parameters": sampling}
    connection = http.client.HTTPConnection("127.0.0.1", app.http_port, timeout=30)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and tokens(scrape(app)) == tokens(before)
        and sample(scrape(app), "tureen_requests_running", model="tiny", version="1") == 0
    ):
        time.sleep(0.01)  # wait until it generates
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    while time.monotonic() < deadline:
        after = scrape(app)
        if cancelled(after) > cancelled(before) and sample(after, "tureen_requests_running", model="tiny", version="1") == 0:
            break
        time.sleep(0.05)
    assert cancelled(after) == cancelled(before) + 1
    assert tokens(after) - tokens(before) < 480  # it stopped well before max_tokens


@pytest.mark.parametrize("tokenizer_kind", ["byte-level BPE", "word level"])
def test_chunks_decoded_a_piece_at_a_time_add_up_to_one_decode_of_every_token(tmp_path: Path, tokenizer_kind: str) -> None:
    """Multi-byte characters split over byte tokens, and a tokenizer that joins words with spaces:
    the streamed pieces never show a half character and join to exactly the whole decode."""
    from tureen.core.llm.generation import Generation
    from tureen.core.llm.sampling import SamplingParameters
    from tureen.core.llm.text import TextCodec

    if tokenizer_kind == "word level":
        llama_with_tokens(tmp_path / "ft-0", 0, [])
        text = " ".join(f"w{i % 60}" for i in range(40))
    else:
        text_llama(tmp_path, seeds=(0,))
        text = 'héllo → 世界 ✓ "naïve" ' + Path(json.__file__).read_text()[:300] + " 🍲 soupe du jour"
    codec = TextCodec.load(tmp_path / "ft-0")
    ids = codec.tokenizer.encode(text, add_special_tokens=False)

    async def pieces() -> list[str]:
        parameters = SamplingParameters.of({"max_tokens": len(ids), "ignore_eos": True})
        generation = Generation([ids[0]], parameters, codec)
        return [generation.take(token).text for token in ids]

    chunks = asyncio.run(pieces())
    assert "".join(chunks) == codec.decode(ids)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert sum(1 for chunk in chunks if chunk) > len(ids) // 3  # it streams, not one piece at the end
