"""Secure by default: what a pushed spec may run and read, who may call the admin API, and limits.

Real servers on free ports of 127.0.0.1, called with ``tureen_client`` (PushSpec) and with
``tritonclient.grpc`` (``load_model``, Triton's repository RPC), as users call them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from safetensors.torch import save_file
from tritonclient.utils import InferenceServerException
from tureen_client import SoupClient, SoupClientError

from archs import Mixed
from helpers import digits_spec, infer, random_state, running_app, sample, scrape, serve_process, write_ingredients, write_spec
from tureen.app import App
from tureen.core.access import Access, networks
from tureen.core.policy import SpecPolicy, factory_allowed
from tureen.core.store import SpecStore
from tureen.errors import PermissionDenied, Unauthenticated
from tureen.spec import load_spec, parse_spec
from tureen.transport.grpc.auth import peer_address

PIXELS = np.random.default_rng(0).uniform(0, 16, size=(4, 64)).astype(np.float32)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The start-up spec's folder (so an ingredient root), with two ingredients and the spec."""
    folder = tmp_path / "root"
    write_ingredients(folder, 2)
    write_spec(folder, absolute(digits_spec(["ft-0", "ft-1"]), folder))
    return folder


def absolute(document: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The document with each ingredient path made absolute in ``folder`` (a pushed spec's paths are the server's)."""
    return {**document, "ingredients": [{**i, "path": str(folder / i["path"])} for i in document["ingredients"]]}


@pytest.fixture
def app(root: Path, request: pytest.FixtureRequest) -> Iterator[App]:
    settings = getattr(request, "param", {})
    spec_file = root / "spec.yaml"
    with running_app([load_spec(spec_file)], sources=[str(spec_file)], **settings) as served:
        yield served


def evil_specs(marker: Path, root: Path) -> dict[str, dict[str, Any]]:
    """The issue's two specs: a shell command as the architecture, and as an evaluation split's factory."""
    ingredient = [{"name": "a", "path": str(root / "ft-0.safetensors")}]
    return {
        "architecture": {
            "apiVersion": "tureen/v1",
            "model": "evil",
            "architecture": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
            "ingredients": ingredient,
        },
        "evaluation": {
            **digits_spec(["a"], model="evil"),
            "ingredients": ingredient,
            "evaluation": {"splits": {"val": {"factory": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"}}}},
        },
    }


def push_refusal(address: str, document: dict[str, Any], via: str) -> tuple[str, str]:
    """(status name, message) of a push that must fail, over PushSpec or tritonclient's load_model."""
    if via == "PushSpec":
        with SoupClient(address) as soups, pytest.raises(SoupClientError) as caught:
            soups.push(document, wait=True)
        return caught.value.code.name, str(caught.value)
    client = grpcclient.InferenceServerClient(address)
    try:
        with pytest.raises(InferenceServerException) as refused:
            client.load_model(document["model"], config=json.dumps(document))
    finally:
        client.close()
    return str(refused.value.status()).removeprefix("StatusCode."), str(refused.value.message())


def stored_versions(app: App, model: str) -> list[int]:
    return app.store.version_numbers(model) if model in app.store.models() else []


@pytest.mark.parametrize("via", ["PushSpec", "load_model"])
@pytest.mark.parametrize("where", ["architecture", "evaluation"])
def test_a_pushed_spec_cannot_run_code_the_operator_did_not_allow(app: App, root: Path, via: str, where: str) -> None:
    marker = root.parent / "pwned"
    document = evil_specs(marker, root)[where]
    code, message = push_refusal(f"127.0.0.1:{app.grpc_port}", document, via)
    field = "architecture.factory" if where == "architecture" else "evaluation.splits.val.factory"
    factory = "os:system" if where == "architecture" else "subprocess:getoutput"
    assert code == "PERMISSION_DENIED"
    assert f"{field}: '{factory}' is not allowed in a pushed spec" in message
    assert f"--allow-factory '{factory}'" in message
    assert not marker.exists()
    assert stored_versions(app, "evil") == []  # refused before it was stored


@pytest.mark.parametrize("app", [{"allow_factories": ("os:system", "subprocess:getoutput")}], indirect=True)
@pytest.mark.parametrize("where", ["architecture", "evaluation"])
def test_allow_factory_lets_the_operator_run_exactly_that(app: App, root: Path, where: str) -> None:
    """The refusal is the check, not a blanket block: once allowed, the command runs (and the
    build then fails on what it returned)."""
    marker = root.parent / "pwned"
    code, message = push_refusal(f"127.0.0.1:{app.grpc_port}", evil_specs(marker, root)[where], "PushSpec")
    assert code != "PERMISSION_DENIED", message
    assert marker.exists()


@pytest.mark.parametrize("app", [{"allow_factories": ("archs:*",)}], indirect=True)
def test_an_allowed_pattern_allows_its_module_only(app: App, root: Path) -> None:
    address = f"127.0.0.1:{app.grpc_port}"
    save_file(random_state(Mixed(), seed=3), str(root / "mixed.safetensors"))
    mixed = {"apiVersion": "tureen/v1", "model": "mixed", "ingredients": [{"name": "m", "path": str(root / "mixed.safetensors")}]}
    with SoupClient(address) as soups:
        assert soups.push({**mixed, "architecture": {"factory": "archs:mixed"}}, wait=True)["state"] == "active"
    for factory in ("os:system", "archs:torch.load", "archsx:mixed"):  # another module; an import of it; a prefix
        code, message = push_refusal(address, {**mixed, "architecture": {"factory": factory}}, "PushSpec")
        assert code == "PERMISSION_DENIED" and f"'{factory}' is not allowed" in message and "archs:*" in message
    assert stored_versions(app, "mixed") == [1]


def outside_paths(root: Path) -> dict[str, str]:
    """Three ways out of the root, each to a real, readable checkpoint or file."""
    outside = root.parent / "outside"
    write_ingredients(outside, 1, prefix="ft")
    (root / "link.safetensors").symlink_to(outside / "ft-0.safetensors")
    return {
        "/etc/passwd": "/etc/passwd",
        "dot-dot": f"{root}/../outside/ft-0.safetensors",
        "symlink": str(root / "link.safetensors"),
    }


@pytest.mark.parametrize("how", ["/etc/passwd", "dot-dot", "symlink"])
def test_pushed_specs_read_no_file_outside_the_ingredient_roots(app: App, root: Path, how: str) -> None:
    address = f"127.0.0.1:{app.grpc_port}"
    client = grpcclient.InferenceServerClient(address)
    before = infer(client, PIXELS)
    path = outside_paths(root)[how]
    document = absolute(digits_spec(["ft-0", "ft-1"]), root)
    document["ingredients"][1] = {"name": "ft-1", "path": path}
    code, message = push_refusal(address, document, "PushSpec")
    assert code == "PERMISSION_DENIED"
    assert f"ingredients[1].path: '{path}' lies outside the ingredient roots ({root})" in message
    assert "--ingredient-root" in message
    after = infer(client, PIXELS)
    client.close()
    assert after[0] == before[0] == 1
    np.testing.assert_array_equal(after[1], before[1])  # the serving blend answers identically
    assert stored_versions(app, "digits") == [1]


def test_evaluation_sets_and_configs_are_confined_too_and_a_root_flag_opens_a_folder(root: Path) -> None:
    outside = outside_paths(root)["dot-dot"]
    document = absolute(digits_spec(["ft-0", "ft-1"]), root)
    spec_file = root / "spec.yaml"
    with running_app([load_spec(spec_file)], sources=[str(spec_file)]) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        for extra, field in (
            ({"evaluation": {"splits": {"val": {"path": outside}}}}, "evaluation.splits.val.path"),
            ({"architecture": {"huggingface": str(root.parent / "outside"), "task": "causal-lm"}}, "architecture.huggingface"),
        ):
            with pytest.raises(SoupClientError) as caught:
                soups.push({**document, **extra})
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and f"{field}: " in str(caught.value)
    opened = {"ingredient_roots": (str(root.parent / "outside"),)}
    with running_app([load_spec(spec_file)], sources=[str(spec_file)], **opened) as app:
        document["ingredients"][1] = {"name": "ft-1", "path": outside}
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
            assert soups.push(document, wait=True)["state"] == "active"


def test_a_server_with_no_specs_and_no_roots_reads_no_file_for_a_pushed_spec(tmp_path: Path) -> None:
    write_ingredients(tmp_path, 1)
    with running_app([]) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups, pytest.raises(SoupClientError) as caught:
        soups.push(absolute(digits_spec(["ft-0"]), tmp_path))
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "this server reads no files for pushed specs; start it with --ingredient-root DIR" in str(caught.value)


def test_errors_about_unreadable_files_never_quote_their_bytes(app: App, root: Path) -> None:
    secret = 'HUN"TER2-do-not-echo'  # a quote inside: no quoting rule can be what keeps it out
    header = json.dumps({"w": secret, "v": {"dtype": secret, "shape": [1], "data_offsets": [0, 4]}}).encode()
    (root / "text.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (root / "text.pt").write_text("cSECRETMODULE\nSECRETNAME\n")  # pickle's GLOBAL opcode: torch would name them
    (root / "sharded").mkdir()
    (root / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../ft-0.safetensors"}}))
    with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        for name in ("text.safetensors", "text.pt", "sharded"):
            document = {**digits_spec(["x"]), "ingredients": [{"name": "x", "path": str(root / name)}]}
            with pytest.raises(SoupClientError) as caught:
                soups.push(document, wait=True)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, str(caught.value)
            message = str(caught.value)
            assert not any(leak in message for leak in ("HUN", "TER2", "SECRET", "../", "ft-0")), message


def test_admin_calls_from_loopback_by_default_and_refused_from_outside_the_allowed_peers(root: Path) -> None:
    spec_file = root / "spec.yaml"
    document = absolute(digits_spec(["ft-0", "ft-1"], merge={"weights": {"ft-0": 1.0, "ft-1": 3.0}}), root)
    with running_app([load_spec(spec_file)], sources=[str(spec_file)]) as app, SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        assert soups.push(document, wait=True)["version"] == "2"  # no token, a loopback peer: served
    narrowed = {"admin_allow_from": ("127.0.0.2/32",)}
    with running_app([load_spec(spec_file)], sources=[str(spec_file)], **narrowed) as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with SoupClient(address) as soups, pytest.raises(SoupClientError) as caught:
            soups.push(document, wait=True)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "admin calls from 127.0.0.1 are refused" in str(caught.value) and "--admin-token-file" in str(caught.value)
        client = grpcclient.InferenceServerClient(address)
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_repository_index()  # Triton's repository RPCs are admin calls too
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        assert infer(client, PIXELS)[0] == 1  # inference stays open
        client.close()
        assert stored_versions(app, "digits") == [1]


def test_with_a_token_the_token_decides(root: Path) -> None:
    spec_file = root / "spec.yaml"
    with running_app([load_spec(spec_file)], sources=[str(spec_file)], admin_token="s3cret") as app:
        address = f"127.0.0.1:{app.grpc_port}"
        with SoupClient(address) as soups, pytest.raises(SoupClientError) as caught:
            soups.versions("digits")  # loopback is not enough once there is a token
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        with SoupClient(address, token="s3cret") as soups:
            assert [v["version"] for v in soups.versions("digits")] == ["1"]
    both = {"admin_token": "s3cret", "admin_allow_from": ("127.0.0.2/32",)}
    with running_app([load_spec(spec_file)], sources=[str(spec_file)], **both) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}", token="s3cret") as soups, pytest.raises(SoupClientError) as caught:
            soups.versions("digits")  # an explicit --admin-allow-from limits token holders too
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_access_decisions_for_peers_a_test_cannot_be() -> None:
    """Peers other than loopback cannot call from this machine's tests; the decision is a pure function."""
    closed, opened = Access(), Access(open_admin=True)
    with pytest.raises(PermissionDenied, match=r"from 10\.1\.2\.3 are refused.*--admin-token-file"):
        closed.admit("admin", None, "10.1.2.3")
    opened.admit("admin", None, "10.1.2.3")
    closed.admit("admin", None, "::ffff:127.0.0.1")  # an IPv4 client of a dual-stack listener
    closed.admit("admin", None, "::1")
    closed.admit("inference", None, "10.1.2.3")
    with pytest.raises(PermissionDenied):
        closed.admit("admin", None, None)  # no IP address (a Unix socket): not loopback by address
    with pytest.raises(Unauthenticated):
        Access(admin_token="t", open_admin=True).admit("admin", "wrong", "127.0.0.1")
    Access(admin_token="t").admit("admin", "t", "10.1.2.3")
    with pytest.raises(PermissionDenied):
        Access(admin_token="t", admin_from=networks(["192.168.0.0/16"])).admit("admin", "t", "10.1.2.3")
    # What transports may skip checking altogether (the inference path without a token pays nothing).
    assert Access().open_to_all("inference") and not Access(inference_token="t").open_to_all("inference")
    assert not closed.open_to_all("admin") and opened.open_to_all("admin")
    assert not Access(open_admin=True, admin_from=networks(["10.0.0.0/8"])).open_to_all("admin")
    assert not Access(admin_token="t", open_admin=True).open_to_all("admin")
    assert peer_address("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_address("ipv6:[::ffff:10.0.0.1]:5000") == "::ffff:10.0.0.1"
    assert peer_address("unix:/tmp/socket") is None


LONG = "m" * 129


def test_size_limits_refuse_before_anything_is_stored(app: App, root: Path) -> None:
    base = absolute(digits_spec(["ft-0", "ft-1"]), root)
    many = {**base, "ingredients": [{"name": f"i{n}", "path": str(root / "ft-0.safetensors")} for n in range(257)]}
    grid = {**base, "merge": {"method": "ties", "base": "ft-0", "grid": {"density": [0.1 * n for n in range(1, 10)]}}}
    grid["merge"]["grid"]["lambda"] = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]  # 72 points
    grid["evaluation"] = {"splits": {"val": {"path": str(root / "ft-0.safetensors")}}}
    cases = [
        (
            {**base, "architecture": {"factory": "tureen.demo.models:mlp", "kwargs": {"pad": "x" * (1 << 20)}}},
            "spec_json: the spec is",
        ),
        (many, "ingredients: at most 256 entries, got 257"),
        (grid, "merge.grid: 72 combinations; at most 64"),
        ({**base, "model": LONG}, "model: names are at most 128 characters, got 129"),
    ]
    with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups:
        for document, fragment in cases:
            with pytest.raises(SoupClientError) as caught:
                soups.push(document)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and fragment in str(caught.value)
    assert app.store.models() == ["digits"] and stored_versions(app, "digits") == [1]


def test_model_names_over_128_characters_and_paths_are_refused_everywhere(app: App) -> None:
    address = f"127.0.0.1:{app.grpc_port}"
    client = grpcclient.InferenceServerClient(address)
    for call in (lambda: infer(client, PIXELS, model=LONG), lambda: client.get_model_metadata(LONG)):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT" and "at most 128 characters" in str(
            refused.value.message()
        )
    client.close()
    with SoupClient(address) as soups:
        for model in (LONG, "../../etc", "digits/../digits"):
            for call in (soups.versions, soups.spec, soups.rollback):
                with pytest.raises(SoupClientError) as caught:
                    call(model)
                assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, (model, call, caught.value)
    page = scrape(app)
    assert LONG not in page  # refused names never become labels
    assert sample(page, "tureen_request_failure_total", model="", reason="invalid_argument") >= 1


def test_serve_flags_are_checked_and_the_open_admin_flag_warns(root: Path) -> None:
    spec = str(root / "spec.yaml")
    for flags, message in (
        (["--allow-factory", "no-colon"], "--allow-factory: 'no-colon' is not module:callable"),
        (["--ingredient-root", str(root / "missing")], "--ingredient-root: "),
        (["--admin-allow-from", "10.0.0.0/33"], "--admin-allow-from: '10.0.0.0/33' is not an address or CIDR block"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "tureen", "serve", "--spec", spec, *flags, "--grpc-port", "0", "--metrics-port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    with serve_process(["--spec", spec, "--insecure-open-admin"]) as (_, _, _, lines):
        assert any("--insecure-open-admin: admin calls" in line and "WARNING" in line for line in lines)


def test_a_stored_version_pushed_elsewhere_is_held_to_this_servers_flags_when_built(root: Path) -> None:
    """A version in the store that no check of this server saw (written by an older release while
    admin calls were open, or by a replica with other flags) is checked again before it is built."""
    marker = root.parent / "pwned"
    spec_file = root / "spec.yaml"
    store = root.parent / "store"
    evil = SpecStore(store).push(parse_spec(evil_specs(marker, root)["architecture"]), pushed_by="someone, long ago")
    with running_app([load_spec(spec_file)], sources=[str(spec_file)], store=str(store)) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups, pytest.raises(SoupClientError) as caught:
            soups.activate("evil", evil.version)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED and "architecture.factory" in str(caught.value)
        assert not marker.exists()
        assert app.store.get("evil", evil.version).state == "stored"  # this replica's flags: not failed for all
    opened = {"allow_factories": ("os:system",), "store": str(store)}
    with running_app([load_spec(spec_file)], sources=[str(spec_file)], **opened) as app:
        with SoupClient(f"127.0.0.1:{app.grpc_port}") as soups, pytest.raises(SoupClientError):
            soups.activate("evil", evil.version)
        assert marker.exists()  # the check, not a blanket block


def test_start_up_files_open_themselves_and_their_spec_folders_but_never_a_whole_system(tmp_path: Path) -> None:
    write_ingredients(tmp_path / "models", 2)
    spec = parse_spec(
        {**digits_spec(["ft-0"]), "ingredients": [{"name": "a", "path": str(tmp_path / "models" / "ft-0.safetensors")}]}
    )
    policy = SpecPolicy.of([], [], [spec], ["/", tempfile.gettempdir(), str(Path.home()), str(tmp_path / "specs")])
    assert policy.roots == (Path(os.path.realpath(tmp_path / "specs")),)
    pushed = {**digits_spec(["a"]), "ingredients": [{"name": "a", "path": str(tmp_path / "models" / "ft-0.safetensors")}]}
    policy.check(parse_spec(pushed))  # the very file a start-up spec reads
    pushed["ingredients"][0]["path"] = str(tmp_path / "models" / "ft-1.safetensors")
    with pytest.raises(PermissionDenied, match=r"ingredients\[0\]\.path"):
        policy.check(parse_spec(pushed))  # its neighbour: the operator never named it


def test_globs_never_reach_private_or_dunder_names() -> None:
    assert not factory_allowed("tureen.demo.models:__init__", "tureen.demo.models:*")
    assert not factory_allowed("mycompany.models:_helper", "mycompany.models:*")
    assert factory_allowed("mycompany.models:_helper", "mycompany.models:_*")
    assert factory_allowed("mycompany.vision.nets:build", "mycompany.*:build")
    with pytest.raises(PermissionDenied, match=r"tureen\.demo\.models:__init__"):
        SpecPolicy().check(parse_spec({**digits_spec(["a"]), "architecture": {"factory": "tureen.demo.models:__init__"}}))
