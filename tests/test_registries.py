"""The records behind names: merge methods, searches and evaluation metrics, each in one table."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

import pytest
from prometheus_client import generate_latest

from tureen.core.search import SEARCH_REGISTRY, lookup_search
from tureen.errors import SpecInvalid
from tureen.merge.methods import DECLARATIONS, METHODS, SEARCHES
from tureen.merge.registry import REGISTRY, resolve
from tureen.observability.prometheus import PrometheusObserver
from tureen.spec import METRICS, TASK_METRICS, Metric, Task, parse_spec
from tureen.spec.rules import merge_references


def document(names: list[str], **merge: Any) -> dict[str, Any]:
    return {
        "apiVersion": "tureen/v1",
        "model": "m",
        "ingredients": [{"name": n, "path": f"/x/{n}.safetensors"} for n in names],
        "merge": merge,
    }


@pytest.mark.parametrize("record", METHODS, ids=lambda record: record.decl.name)
def test_every_method_record_has_a_function_of_one_job_and_a_paper_link(record: Any) -> None:
    function = resolve(record.function)
    assert list(inspect.signature(function).parameters) == ["job"]
    assert REGISTRY[record.decl.name].combine is function and REGISTRY[record.decl.name].record is record
    link = urlparse(record.paper)
    assert link.scheme == "https" and link.netloc and link.path not in ("", "/"), record.paper


def test_method_names_are_unique_and_the_declarations_are_the_records_own() -> None:
    assert len({record.decl.name for record in METHODS}) == len(METHODS) == len(REGISTRY)
    assert all(DECLARATIONS[record.decl.name] is record.decl for record in METHODS)
    assert not set(DECLARATIONS) & set(SEARCHES)
    assert {name for name, method in REGISTRY.items() if method.elementwise} == {"linear", "task_arithmetic"}


def test_a_function_reference_that_does_not_resolve_is_refused_by_name() -> None:
    with pytest.raises(ImportError, match=r"'tureen\.merge\.combine:tiez' does not exist"):
        resolve("tureen.merge.combine:tiez")


@pytest.mark.parametrize("record", [r for r in METHODS if r.decl.exact_models is not None], ids=lambda r: r.decl.name)
@pytest.mark.parametrize("extra", [-1, 1])
def test_a_spec_with_another_number_of_models_than_the_exact_count_is_refused_on_ingredients(record: Any, extra: int) -> None:
    count = record.decl.exact_models + extra
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(document([f"m{i}" for i in range(count)], method=record.decl.name))
    assert f"ingredients: {record.decl.name} interpolates exactly " in str(caught.value)
    assert f"(the base counts), got {count}" in str(caught.value)
    parse_spec(document([f"m{i}" for i in range(record.decl.exact_models)], method=record.decl.name))


def test_the_exact_count_is_read_from_the_declaration_not_from_the_method_name() -> None:
    merge = parse_spec(document(["a", "b"], method="multislerp")).merge
    triple = replace(DECLARATIONS["multislerp"], exact_models=3)
    assert merge_references(merge, DECLARATIONS["multislerp"], ["a", "b"]) == []
    assert merge_references(merge, triple, ["a", "b"]) == [
        ("ingredients", "multislerp interpolates exactly three models (the base counts), got 2")
    ]


def test_every_search_pairs_its_declaration_with_the_function_that_runs_it() -> None:
    assert set(SEARCH_REGISTRY) == set(SEARCHES)
    for name, search in SEARCH_REGISTRY.items():
        assert search.decl is SEARCHES[name] and search.decl.search and callable(search.run)
        module, _, function = search.record.function.partition(":")
        assert search.run.__module__ == module and search.run.__name__ == function
        assert search.record.paper.startswith("https://")
        assert lookup_search(name) is search
    with pytest.raises(ValueError, match=r"unknown search 'grid' \(known: greedy, learned\)"):
        lookup_search("grid")


def test_the_metric_table_is_what_the_spec_accepts_and_prometheus_exports() -> None:
    assert typing.get_args(Metric) == tuple(METRICS)
    assert set(TASK_METRICS) == set(typing.get_args(Task))
    assert all(task in TASK_METRICS for metric in METRICS.values() for task in metric.tasks)
    observer = PrometheusObserver()
    assert list(observer.eval_scores) == list(observer.ingredient_scores) == list(METRICS)
    page = generate_latest(observer.registry).decode()
    for name, metric in METRICS.items():
        assert f"# HELP tureen_eval_{name} Held-out {metric.help} of each blend version, per evaluation split.\n" in page


def test_reading_a_spec_loads_no_torch() -> None:
    code = "import sys, tureen.spec, tureen.merge.methods; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
