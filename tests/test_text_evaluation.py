"""Evaluation splits of text for LLM soups: perplexity on ``{"text"}`` rows and multiple choice
scored by log-likelihood (lm-evaluation-harness's way), read from ``.jsonl`` files.

The soups are tiny Llamas with a BPE tokenizer trained on the standard library's ``json``
package; the texts and questions come from other standard-library modules (real text). Each
expected number is computed here with transformers on the hand-averaged weights, one text
window or one choice at a time without padding, and compared with what the served version
reports over the operator API and on /metrics.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import tritonclient.grpc as grpcclient
from tureen_client import SoupClient, SoupClientError

from helpers import running_app, sample, scrape, text_llama, write_spec
from tureen.spec import load_spec

transformers = pytest.importorskip("transformers")

CONTEXT = 512  # text_llama's max_position_embeddings


def texts() -> list[str]:
    """A long text (several context windows), a short one and one of a single character."""
    source = Path(functools.__file__).read_text()
    return [source[:4000], source[5000:5300], "x"]


def questions() -> list[dict[str, Any]]:
    """Assignments of ``re``'s source: which right-hand side belongs to the left-hand side."""
    lines = [m.groups() for m in re.finditer(r"^\s*(\w+) = (\S[^\n]{3,40})$", Path(re.__file__).read_text(), re.M)][:9]
    rows = []
    for i, (left, right) in enumerate(lines):
        others = [lines[(i + k) % len(lines)][1] for k in (1, 2)]
        choices = [*others[: i % 3], right, *others[i % 3 :]]
        prompt = f"{left} =" + (" " if i % 4 == 0 else "")  # some with a trailing space the harness moves
        rows.append({"prompt": prompt, "choices": choices, "answer": i % 3 if i % 2 else right})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def soup(task: str, model: str, splits: dict[str, str | dict[str, str]], **evaluation: Any) -> dict[str, Any]:
    sets = {n: {"path": p} if isinstance(p, str) else p for n, p in splits.items()}
    return {
        "apiVersion": "tureen/v1",
        "model": model,
        "architecture": {"huggingface": "ft-0", "task": "causal-lm"},
        "ingredients": [{"name": "ft-0", "path": "ft-0"}, {"name": "ft-1", "path": "ft-1"}],
        "evaluation": {"task": task, "splits": sets, **evaluation},
    }


def reference_model(folder: Path, states: list[dict[str, torch.Tensor]]) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "ft-0").eval()
    model.load_state_dict({k: (states[0][k].double() + states[1][k].double()).div(2).float() for k in states[0]})
    return model


def log_probs(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def prefix(tokenizer: Any) -> list[int]:
    """What each text and prompt starts with: this tokenizer has no BOS, so its end token."""
    assert tokenizer.bos_token_id is None
    return [tokenizer.convert_tokens_to_ids("<|end|>")]


def hand_perplexity(model: Any, tokenizer: Any, rows: list[str]) -> tuple[float, int]:
    """exp(mean NLL) over every token of every text, in windows overlapping by one."""
    nll, count = 0.0, 0
    for text in rows:
        ids = prefix(tokenizer) + tokenizer.encode(text)
        for start in range(0, max(1, len(ids) - 1), CONTEXT - 1):
            window = ids[start : start + CONTEXT]
            if len(window) < 2:
                continue
            lp = log_probs(model, window)
            nll -= float(sum(lp[t, window[t + 1]] for t in range(len(window) - 1)))
            count += len(window) - 1
    return math.exp(nll / count), count


def hand_choices(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    correct = correct_norm = 0
    nll = 0.0
    for row in rows:
        answer = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        sums = []
        for choice in row["choices"]:
            prompt, continuation = row["prompt"].rstrip(), row["prompt"][len(row["prompt"].rstrip()) :] + " " + choice
            context, whole = (prefix(tokenizer) + tokenizer.encode(text) for text in (prompt, prompt + continuation))
            lp = log_probs(model, whole)
            sums.append(float(sum(lp[t - 1, whole[t]] for t in range(len(context), len(whole)))))
        scores = torch.tensor(sums, dtype=torch.float64)
        correct += int(int(scores.argmax()) == answer)
        lengths = torch.tensor([len(c) for c in row["choices"]], dtype=torch.float64)
        correct_norm += int(int((scores / lengths).argmax()) == answer)
        nll -= float(torch.log_softmax(scores, 0)[answer])
    return {"accuracy": correct / len(rows), "accuracy_norm": correct_norm / len(rows), "nll": nll / len(rows)}


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    folder = tmp_path_factory.mktemp("text-eval")
    states = text_llama(folder)
    write_jsonl(folder / "text.jsonl", [{"text": t} for t in texts()])
    write_jsonl(folder / "choices.jsonl", questions())
    return folder, states


def scores_of(soups: SoupClient, model: str) -> dict[str, dict[str, float]]:
    (version,) = soups.versions(model)
    assert version["state"] == "active", version
    return {split: scores["metrics"] for split, scores in version["evaluation"].items()}


def test_perplexity_and_multiple_choice_scores_equal_a_hand_computation_with_transformers(
    kitchen: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    folder, states = kitchen
    # A split may have a task of its own: questions beside text, in batches smaller than a question.
    both = {"text": "text.jsonl", "questions": {"path": "choices.jsonl", "task": "multiple-choice"}}
    lm = load_spec(write_spec(folder, soup("language-modeling", "lm", both, batch_size=2), "lm.yaml"))
    mc = load_spec(write_spec(folder, soup("multiple-choice", "mc", {"choices": "choices.jsonl"}, batch_size=7), "mc.yaml"))
    model = reference_model(folder, states)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder / "ft-0")
    perplexity, tokens = hand_perplexity(model, tokenizer, texts())
    assert tokens > 2 * CONTEXT, "the long text must span several windows"
    expected = hand_choices(model, tokenizer, questions())
    with running_app([lm, mc]) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        served_lm, served_mc = scores_of(soups, "lm")["text"], scores_of(soups, "mc")["choices"]
        beside_text = scores_of(soups, "lm")["questions"]
        page = scrape(app)
    assert beside_text == pytest.approx(served_mc, rel=1e-6)
    assert served_lm["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert served_lm["nll"] == pytest.approx(math.log(perplexity), rel=1e-4)
    assert set(served_mc) == {"accuracy", "accuracy_norm", "nll"}
    for metric, value in expected.items():
        assert served_mc[metric] == pytest.approx(value, rel=1e-4, abs=1e-6), metric
    assert sample(page, "tureen_eval_perplexity", model="lm", version="1", split="text") == pytest.approx(perplexity, rel=1e-4)
    gauge = sample(page, "tureen_eval_accuracy_norm", model="mc", version="1", split="choices")
    assert gauge == pytest.approx(expected["accuracy_norm"])


def test_a_learned_soup_trains_on_multiple_choice_and_a_greedy_one_searches_on_text(
    kitchen: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    folder, _ = kitchen
    learned = soup("multiple-choice", "mc", {"choices": "choices.jsonl"}, batch_size=7)
    learned["merge"] = {"method": "learned", "parameters": {"steps": 3}}
    greedy = soup("language-modeling", "lm", {"text": "text.jsonl"})
    greedy["merge"] = {"method": "greedy"}
    specs = [load_spec(write_spec(folder, learned, "learned.yaml")), load_spec(write_spec(folder, greedy, "greedy.yaml"))]
    with running_app(specs) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        for model, metric in (("mc", "accuracy"), ("lm", "perplexity")):
            (version,) = soups.versions(model)
            log = json.loads(version["resolution_json"])["log"]
            assert version["state"] == "active" and log["metric"] == metric, version
            assert log["best"] == pytest.approx(version["evaluation"][next(iter(version["evaluation"]))]["metrics"][metric])
        history = json.loads(soups.versions("mc")[0]["resolution_json"])["log"]["history"]
        assert [point["step"] for point in history] == [0, 1, 2, 3]


BAD_ROWS = {
    "not-json": ('{"text": "a"}\n{"text": \n', "language-modeling", "line 2 is not JSON"),
    "no-text": ('{"body": "a b c"}\n', "language-modeling", "row 1 has no string 'text'"),
    "no-answer": ('{"prompt": "p", "choices": ["a", "b"]}\n', "multiple-choice", "'answer' must be"),
    "far-answer": ('{"prompt": "p", "choices": ["a", "b"], "answer": 2}\n', "multiple-choice", "0 to 1"),
    "one-choice": ('{"prompt": "p", "choices": ["a"], "answer": 0}\n', "multiple-choice", "two or more"),
    "empty": ("\n\n", "multiple-choice", "the evaluation set is empty"),
}


def test_text_splits_that_cannot_be_scored_are_refused_by_split_and_row_and_the_soup_keeps_serving(
    kitchen: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    folder, _ = kitchen
    serving = load_spec(write_spec(folder, soup("language-modeling", "tiny", {"text": "text.jsonl"}), "tiny.yaml"))
    for name, (content, _, _) in BAD_ROWS.items():
        (folder / f"{name}.jsonl").write_text(content)
    with (
        running_app([serving], ingredient_roots=(str(folder),)) as app,
        SoupClient(f"127.0.0.1:{app.grpc_port}") as soups,
        grpcclient.InferenceServerClient(f"127.0.0.1:{app.grpc_port}") as client,
    ):
        for name, (_, task, fragment) in BAD_ROWS.items():
            with pytest.raises(SoupClientError) as caught:
                soups.push(write_spec(folder, soup(task, "tiny", {name: f"{name}.jsonl"}), f"{name}.yaml"), wait=True)
            message = str(caught.value)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, message
            assert f"evaluation.splits.{name}" in message and fragment in message, message
        # Problems the spec shows by itself are refused before anything is stored.
        refusals = [
            ("multiple-choice", {"c": "choices.jsonl"}, "evaluation.task"),
            ("classification", {"c": {"path": "choices.jsonl", "task": "multiple-choice"}}, "evaluation.splits.c.task"),
            ("language-modeling", {"c": "text.jsonl"}, "evaluation.splits.c.path"),
        ]
        for task, splits, field in refusals:
            document = soup(task, "tiny", splits)
            document["architecture"] = {"factory": "tureen.demo.models:DigitsMLP"}
            with pytest.raises(SoupClientError) as caught:
                soups.push(write_spec(folder, document, "factory.yaml"))
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in str(caught.value), str(caught.value)
        with pytest.raises(SoupClientError) as caught:
            soups.push(write_spec(folder, soup("multiple-choice", "tiny", {"c": "c.safetensors"}), "tensors.yaml"))
        assert "evaluation.splits.c.path: multiple-choice reads .jsonl" in str(caught.value)
        mixed = soup(
            "language-modeling", "tiny", {"q": {"path": "choices.jsonl", "task": "multiple-choice"}}, metric="perplexity"
        )
        with pytest.raises(SoupClientError) as caught:
            soups.push(write_spec(folder, mixed, "mixed.yaml"))
        assert "evaluation.metric: the selected split 'q' is multiple-choice" in str(caught.value), str(caught.value)
        versions = soups.versions("tiny")
        assert versions[0]["state"] == "active" and len(versions) == 1 + len(BAD_ROWS)
        assert client.get_model_metadata("tiny").versions == ["1"]


def test_a_tokenizer_that_frames_every_encoding_with_special_tokens_scores_the_same(
    kitchen: tuple[Path, list[dict[str, torch.Tensor]]],
) -> None:
    """A post-processor adding a BOS and an EOS to every encoding: the choice's tokens are still
    those beyond the prompt's, and no appended EOS is scored."""
    import shutil

    folder, _ = kitchen
    framed = folder / "framed"
    for name in ("ft-0", "ft-1"):
        shutil.copytree(folder / name, framed / name, dirs_exist_ok=True)
        document = json.loads((framed / name / "tokenizer.json").read_text())
        end = next(t["id"] for t in document["added_tokens"] if t["content"] == "<|end|>")
        special, text = {"SpecialToken": {"id": "<|end|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}
        document["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [special, text, special],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|end|>": {"id": "<|end|>", "ids": [end], "tokens": ["<|end|>"]}},
        }
        (framed / name / "tokenizer.json").write_text(json.dumps(document))
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(framed / "ft-0")
    assert tokenizer.encode("a")[0] == tokenizer.encode("a")[-1] == end  # framed indeed
    both = {"text": str(folder / "text.jsonl"), "questions": {"path": str(folder / "choices.jsonl"), "task": "multiple-choice"}}
    specs = [
        load_spec(write_spec(folder, soup("language-modeling", "plain", both), "plain.yaml")),
        load_spec(write_spec(framed, soup("language-modeling", "framed", both), "framed.yaml")),
    ]
    with running_app(specs) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        plain, framed_scores = scores_of(soups, "plain"), scores_of(soups, "framed")
    for split in ("text", "questions"):
        assert framed_scores[split] == pytest.approx(plain[split], rel=1e-5), split
