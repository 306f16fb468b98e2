"""hub.py: local folders vs hub ids, the safetensors check, and failing fast when the hub is out of reach."""

import socket
import time
from types import SimpleNamespace

import pytest

from idefics_cli import hub
from idefics_cli.errors import IdeficsError


@pytest.mark.parametrize("name, local", [("HuggingFaceM4/idefics2-8b", False), ("./m", True), ("/abs/m", True),
                                         ("~/m", True), ("a/b/c", True), ("org/name", False)])
def test_looks_local(name, local):
    assert hub.looks_local(name) is local


def test_check_local_model_refuses_what_is_not_a_safetensors_model(tmp_path):
    with pytest.raises(IdeficsError, match="does not exist"):
        hub.check_local_model(str(tmp_path / "missing"))
    with pytest.raises(IdeficsError, match="no config.json"):
        hub.check_local_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(IdeficsError, match="no .safetensors") as err:
        hub.check_local_model(str(tmp_path))
    assert err.value.code == "model_error"
    (tmp_path / "model.safetensors").write_bytes(b"")
    hub.check_local_model(str(tmp_path))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connecting is refused


def test_uncached_hub_id_without_hub_fails_in_seconds(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub.probe_endpoint(constants.ENDPOINT, timeout=1.0) is not None  # says why: unreachable
    assert hub.is_cached("org/never-downloaded", None) is False
    start = time.monotonic()
    with pytest.raises(IdeficsError, match="not in the local cache") as err:
        hub.local_only(SimpleNamespace(model="org/never-downloaded", revision=None, offline=False))
    assert err.value.code == "model_error" and time.monotonic() - start < 5


def test_offline_and_local_folders_never_touch_the_network(monkeypatch):
    monkeypatch.setattr(hub, "probe_endpoint", lambda *a, **k: pytest.fail("probed the network"))
    assert hub.local_only(SimpleNamespace(model="org/x", revision=None, offline=True)) is True
    assert hub.local_only(SimpleNamespace(model="./folder", revision=None, offline=False)) is True
