"""`tureen profile` as users run it: divergence tables checked against torch, sweep, calibration, the PNG."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import digits_spec, write_ingredients, write_spec
from tureen.demo.models import DigitsMLP

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = {
    "net.0": ["net.0.weight", "net.0.bias"],
    "net.2": ["net.2.weight", "net.2.bias"],
    "net.4": ["net.4.weight", "net.4.bias"],
}


def tureen(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUREEN_STORE": str(cwd / "store")}  # never the user's own store
    command = [sys.executable, "-m", "tureen", "--log-level", "warning", "profile", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def tables(stdout: str) -> dict[str, list[list[str]]]:
    """Each titled block of the output (``per tensor:`` ...) as rows of cells, header dropped;
    cells are separated by two spaces or more (names such as ``(uniform mean)`` hold one)."""
    found = {}
    for block in stdout.split("\n\n"):
        lines = block.splitlines()
        if len(lines) > 2 and lines[0].endswith(":"):
            found[lines[0]] = [re.split(r"\s{2,}", line.strip()) for line in lines[2:] if not line.startswith("note:")]
    return found


def expected_divergence(
    states: dict[str, dict[str, torch.Tensor]], pairs: list[tuple[str, str]]
) -> dict[tuple[str, ...], tuple[float, float]]:
    """Cosine and ||a - b|| / ||b|| in float64 per tensor, per layer (concatenated) and whole model."""
    scopes = (
        {key: [key] for key in next(iter(states.values()))} | LAYERS | {"model": [k for keys in LAYERS.values() for k in keys]}
    )
    out = {}
    for scope, keys in scopes.items():
        for a, b in pairs:
            x = torch.cat([states[a][k].double().flatten() for k in keys])
            y = torch.cat([states[b][k].double().flatten() for k in keys])
            cosine = float(x @ y / (x.norm() * y.norm()))
            out[(scope, a, b)] = (cosine, float((x - y).norm() / y.norm()))
    return out


def assert_divergence(found: dict[str, list[list[str]]], expected: dict[tuple[str, ...], tuple[float, float]]) -> None:
    rows = {tuple(r[:3]): r[3:] for r in found["per tensor:"] + found["per layer:"]}
    rows |= {("model", *r[:2]): r[2:] for r in found["whole model:"]}
    assert set(rows) == set(expected)
    for key, (cosine, relative) in expected.items():
        assert float(rows[key][0]) == pytest.approx(cosine, abs=2e-6), key
        assert float(rows[key][1]) == pytest.approx(relative, abs=2e-6), key


def scores(state: dict[str, torch.Tensor], pixels: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Accuracy and NLL of DigitsMLP(hidden=8) with ``state``, computed here without Tureen."""
    model = DigitsMLP(hidden=8)
    model.load_state_dict({k: t.float() for k, t in state.items()})
    with torch.no_grad():
        logits = model(pixels)["logits"]
    return float((logits.argmax(1) == labels).double().mean()), float(torch.nn.functional.cross_entropy(logits, labels))


def write_split(folder: Path, name: str, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(rows, 64, generator=generator) * 16
    labels = torch.randint(0, 10, (rows,), generator=generator)
    save_file({"pixels": pixels, "labels": labels}, str(folder / f"{name}.safetensors"))
    return pixels, labels


def test_profile_with_a_base_reports_divergence_sweep_calibration_and_a_plot(tmp_path: Path) -> None:
    fine_tunes = write_ingredients(tmp_path, 3)
    base = write_ingredients(tmp_path, 1, prefix="base")["base-0"]
    val = write_split(tmp_path, "val", 150, seed=1)
    test = write_split(tmp_path, "test", 120, seed=2)
    splits = {"val": {"path": "val.safetensors"}, "test": {"path": "test.safetensors"}}
    document = digits_spec(["base-0", *fine_tunes], merge={"method": "task_arithmetic", "base": "base-0"})
    spec = write_spec(tmp_path, {**document, "evaluation": {"splits": splits}})

    result = tureen(tmp_path, str(spec), "--points", "5")
    assert result.returncode == 0, result.stderr
    assert "divergence reference: the base 'base-0'" in result.stdout
    found = tables(result.stdout)
    states = {"base-0": base, **fine_tunes}
    pairs = [(name, "base-0") for name in fine_tunes] + list(itertools.combinations(fine_tunes, 2))
    assert_divergence(found, expected_divergence(states, pairs))

    # task arithmetic with lambda 1: base + the sum of the task vectors; not uniform, so the uniform soup is there too
    soup = {k: base[k] + sum(s[k] - base[k] for s in fine_tunes.values()) for k in base}
    uniform = {k: sum(s[k] for s in fine_tunes.values()) / 3 for k in base}
    calibration = {(r[0], r[1]): [float(v) for v in r[2:]] for r in found["calibration:"]}
    assert set(calibration) == {(m, s) for m in [*states, "soup", "uniform soup"] for s in ("val", "test")}
    for name, state in {**states, "soup": soup, "uniform soup": uniform}.items():
        for split, (pixels, labels) in (("val", val), ("test", test)):
            accuracy, nll = scores(state, pixels, labels)
            assert calibration[(name, split)][0] == pytest.approx(accuracy, abs=6e-5), (name, split)
            assert calibration[(name, split)][1] == pytest.approx(nll, rel=1e-4, abs=6e-5), (name, split)

    # the default sweep runs from the base to the soup on the selected (first) split
    assert "sweep on 'val': alpha 0 = base-0, alpha 1 = soup:" in result.stdout
    sweep = found["sweep on 'val': alpha 0 = base-0, alpha 1 = soup:"]
    assert [row[0] for row in sweep] == ["0.000", "0.250", "0.500", "0.750", "1.000"]
    for row, state in ((sweep[0], base), (sweep[-1], soup)):  # the ends are the two models themselves
        assert [float(v) for v in row[1:3]] == pytest.approx(scores(state, *val), abs=6e-5)
    halfway = scores({k: (base[k] + soup[k]) / 2 for k in base}, *val)
    assert float(sweep[2][1]) == pytest.approx(halfway[0], abs=6e-5)

    plot = tmp_path / "digits-profile.png"  # the default: MODEL-profile.png in the current directory
    assert f"plot written to {plot.name}" in result.stdout
    data = plot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_profile_between_two_ingredients_as_json(tmp_path: Path) -> None:
    fine_tunes = write_ingredients(tmp_path, 3)
    write_split(tmp_path, "val", 100, seed=3)
    test = write_split(tmp_path, "test", 100, seed=4)
    splits = {"val": {"path": "val.safetensors"}, "test": {"path": "test.safetensors"}}
    spec = write_spec(tmp_path, digits_spec(list(fine_tunes), evaluation={"splits": splits}))
    out = tmp_path / "plots" / "between.png"
    out.parent.mkdir()
    result = tureen(
        tmp_path, str(spec), "--between", "ft-2", "ft-0", "--points", "3", "--split", "test", "--json", "--plot", str(out)
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["plot"] == str(out) and out.read_bytes().startswith(PNG_MAGIC)
    assert document["reference"] == "(uniform mean)" and document["base"] is None
    sweep = document["sweep"]
    assert (sweep["start"], sweep["end"], sweep["split"], sweep["alphas"]) == ("ft-2", "ft-0", "test", [0.0, 0.5, 1.0])
    for end, name in ((sweep["scores"][0], "ft-2"), (sweep["scores"][-1], "ft-0")):
        assert [end["accuracy"], end["nll"]] == pytest.approx(scores(fine_tunes[name], *test), abs=6e-5)
    assert "uniform soup" not in document["scores"]  # the linear soup already is the uniform one
    assert set(document["scores"]["soup"]["val"]) == {"accuracy", "nll", "ece"}
    overall = {(r["left"], r["right"]): r for r in document["overall"]}
    x = torch.cat([t.double().flatten() for t in fine_tunes["ft-0"].values()])
    y = torch.cat([t.double().flatten() for t in fine_tunes["ft-1"].values()])
    assert overall[("ft-0", "ft-1")]["cosine"] == pytest.approx(float(x @ y / (x.norm() * y.norm())), rel=1e-9)
    assert overall[("ft-0", "ft-1")]["relative_l2"] == pytest.approx(float((x - y).norm() / y.norm()), rel=1e-9)
    assert len(document["tensors"]) == 6 * 6 and len(document["layers"]) == 3 * 6  # 3 vs the mean + 3 pairs


def test_profile_without_evaluation_reports_divergence_only(tmp_path: Path) -> None:
    fine_tunes = write_ingredients(tmp_path, 2)
    spec = write_spec(tmp_path, digits_spec(list(fine_tunes)))
    result = tureen(tmp_path, str(spec), "--plot", "divergence.png")
    assert result.returncode == 0, result.stderr
    assert "the uniform mean of the ingredients (the spec has no merge.base)" in result.stdout
    assert "note: no sweep or calibration: the spec has no evaluation section" in result.stdout
    found = tables(result.stdout)
    assert "calibration:" not in found and not any(title.startswith("sweep") for title in found)
    mean = {k: (fine_tunes["ft-0"][k] + fine_tunes["ft-1"][k]) / 2 for k in fine_tunes["ft-0"]}
    pairs = [("ft-0", "(uniform mean)"), ("ft-1", "(uniform mean)"), ("ft-0", "ft-1")]
    assert_divergence(found, expected_divergence({**fine_tunes, "(uniform mean)": mean}, pairs))
    assert (tmp_path / "divergence.png").read_bytes().startswith(PNG_MAGIC)


def test_profile_errors_are_one_line(tmp_path: Path) -> None:
    fine_tunes = write_ingredients(tmp_path, 2)
    spec = write_spec(tmp_path, digits_spec(list(fine_tunes)))
    result = tureen(tmp_path, str(spec), "--between", "ft-0", "ft-9")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "tureen: error: --between: no ingredient named 'ft-9' (ingredients: ft-0, ft-1)"
    ]
    assert not (tmp_path / "digits-profile.png").exists()


def test_without_matplotlib_the_tables_still_print_unless_a_plot_is_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tureen.cli import main

    fine_tunes = write_ingredients(tmp_path, 2)
    spec = str(write_spec(tmp_path, digits_spec(list(fine_tunes))))
    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if matplotlib were not installed
    monkeypatch.chdir(tmp_path)
    assert main(["--log-level", "warning", "profile", spec]) == 0
    out, err = capsys.readouterr()
    assert "whole model:" in out and "tureen: note: no plot: plotting needs matplotlib: pip install 'tureen[plot]'" in err
    assert main(["--log-level", "warning", "profile", spec, "--plot", "x.png"]) == 1
    assert capsys.readouterr().err.strip().endswith("tureen: error: plotting needs matplotlib: pip install 'tureen[plot]'")
    assert not list(tmp_path.glob("*.png"))
