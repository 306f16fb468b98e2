"""hub.py: local folders vs hub ids, the safetensors check, and failing fast when the hub is out of reach."""

import os
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
    assert hub.cached_snapshot("org/never-downloaded", None) is None
    start = time.monotonic()
    with pytest.raises(IdeficsError, match="not in the local cache") as err:
        hub.local_only(SimpleNamespace(model="org/never-downloaded", revision=None, offline=False))
    assert err.value.code == "model_error" and time.monotonic() - start < 5


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf"])
def test_a_probe_timeout_that_is_no_number_of_seconds_is_the_default(monkeypatch, tmp_path, value):
    """IDEFICS_PROBE_TIMEOUT as the other seconds variables: a value that is no positive number is the default
    (1.5 s), not a `cannot load ...: could not convert string to float` nor `no answer within -1 s`."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("IDEFICS_PROBE_TIMEOUT", value)
    with pytest.raises(IdeficsError) as err:
        hub.local_only(SimpleNamespace(model="org/never-downloaded", revision=None, offline=False))
    assert err.value.code == "model_error"
    assert "not in the local cache and the hub cannot be reached" in err.value.message
    assert "within" not in err.value.message  # refused at once: a real timeout, not one that was already over


def test_offline_and_local_folders_never_touch_the_network(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "probe_endpoint", lambda *a, **k: pytest.fail("probed the network"))
    assert hub.local_only(SimpleNamespace(model="./folder", revision=None, offline=False)) is True
    with pytest.raises(IdeficsError) as err:  # offline and not cached: says so, at once
        hub.local_only(SimpleNamespace(model="org/x", revision=None, offline=True))
    assert err.value.code == "model_error"
    assert err.value.message == "org/x is not in the local cache (offline)"


COMMANDS = {
    "ask": ["ask", "{png}", "What is it?"],
    "chat": ["chat", "{png}"],
    "crops": ["crops", "{png}", "--out", "{tmp}/sheet.png"],
    "doctor": ["doctor"],
    "transcribe": ["transcribe", "{png}", "--out", "{tmp}/out.jsonl"],
    "transcribe-ray": ["transcribe", "{png}", "--out", "{tmp}/ray.jsonl", "--engine", "ray"],
    "quantize": ["quantize", "{tmp}/nf4"],
}


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "offline"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_fails_fast_on_a_model_that_is_not_cached(tmp_path, command, offline):
    """One fast path: a default (hub) model that is not cached fails with one line before torch is imported,
    without retries; offline, it says the model is not in the local cache, not that the hub is unreachable."""
    from conftest import make_image, run_traced

    make_image(80, 60).save(tmp_path / "p.png")
    args = [a.format(png=tmp_path / "p.png", tmp=tmp_path) for a in COMMANDS[command]]
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_OFFLINE": "1" if offline else "0",
           "IDEFICS_MODEL": ""}
    res, imported = run_traced(*args, *(["--offline"] if offline else []),
                               tmp_path=tmp_path, env=env, input=b"")
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 5, lines
    assert len(lines) == 1 and lines[0].startswith("error [model_error]: HuggingFaceM4/idefics2-8b is not in the "
                                                   "local cache"), lines
    assert ("hub cannot be reached" in lines[0]) is not offline
    assert imported == [] and res.stdout == b""
    assert not [name for name in os.listdir(tmp_path) if name.startswith((".idefics-quantize", "nf4"))]


NO_NETWORK = ("import sys\n"
              "def _audit(event, args):\n"
              "    if event == 'socket.connect':\n"
              "        sys.stderr.write(f'NETWORK ATTEMPT {args[1]}\\n')\n"
              "        raise OSError('network disabled by test')\n"
              "sys.addaudithook(_audit)\n")


ASK = ["ask", "{png}", "What is it?", "--device", "cpu", "--quant", "none", "--max-new-tokens", "2"]


@pytest.mark.parametrize("command, offline", [
    (ASK, True),
    (["crops", "{png}", "--out", "{tmp}/sheet.png"], True),
    (["doctor", "--json", "--device", "cpu"], True),
    (ASK, False),
], ids=["ask-offline", "crops-offline", "doctor-offline", "ask-online"])
def test_a_cached_hub_model_loads_without_a_single_connection(tmp_path, tiny_model, command, offline):
    """A cached hub model is read from its snapshot folder: no connection, online or with `--offline` alone (the
    hub's own HF_HUB_OFFLINE unset: offline travels in the options, not through the process environment)."""
    from conftest import make_image, run_idefics
    from test_doctor import fake_cache

    cache = tmp_path / "hf" / "hub"
    fake_cache(str(cache), "acme/tiny-idefics2", tiny_model)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    make_image(80, 60).save(tmp_path / "p.png")
    args = [a.format(png=tmp_path / "p.png", tmp=tmp_path) for a in command]
    env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache),
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "PYTHONPATH": str(guard), "IDEFICS_MODEL": ""}
    res = run_idefics(*args, *(["--offline"] if offline else []), "--model", "acme/tiny-idefics2", env=env,
                      timeout=300)
    assert res.returncode == 0 and b"NETWORK ATTEMPT" not in res.stderr, res.stderr.decode()[-2000:]
    assert res.stdout
