"""`idefics pull` (hub.pull): fails fast and cleanly without a network; offline it reports the cached copy."""

from __future__ import annotations

import os
import time

import huggingface_hub.constants
import pytest
from conftest import run_idefics
from test_doctor import fake_cache


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "http://10.255.255.1"])  # refused; unroutable
def test_unreachable_hub_is_one_line_exit_5_fast(endpoint):
    start = time.monotonic()
    proc = run_idefics("pull", "acme/some-model", timeout=60,
                       env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "IDEFICS_PROBE_TIMEOUT": "2"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 5
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert len(err.strip().splitlines()) == 1 and err.startswith("error [model_error]: ")
    assert "hub" in err and acme_or_endpoint(err, endpoint)
    assert "Traceback" not in err
    assert elapsed < 20  # probe (2 s) + interpreter start; never minutes of retries


def test_offline_cached_prints_the_snapshot(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's own switch: pull only looks in the cache
    commit = fake_cache(str(tmp_path), "acme/tiny-idefics2", tiny_model)
    result = cli("pull", "acme/tiny-idefics2")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip().endswith(f"snapshots/{commit}")

    result = cli("pull", "acme/never-pulled")
    assert result.exit_code == 5
    assert result.stdout == "" and "HF_HUB_OFFLINE is set" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("drop", ["model.safetensors", "processor_config.json"])
def test_offline_partly_cached_is_not_reported_pulled(cli, tiny_model, tmp_path, monkeypatch, drop):
    """A snapshot missing its weights (or processor) is no pulled model: `ask --offline` would fail on it."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = fake_cache(str(tmp_path), "acme/half-pulled", tiny_model)
    os.remove(os.path.join(tmp_path, "models--acme--half-pulled", "snapshots", commit, drop))
    result = cli("pull", "acme/half-pulled")
    assert result.exit_code == 5 and result.stdout == "", result.stdout
    assert result.stderr.startswith("error [model_error]: acme/half-pulled is only partly in the local cache")
    assert len(result.stderr.strip().splitlines()) == 1


def test_local_path_is_a_usage_error(cli, tmp_path):
    result = cli("pull", str(tmp_path))
    assert result.exit_code == 2 and "local path" in result.stderr


@pytest.mark.parametrize("model", ["bad//id", "a b/c", "owner/name/extra", "owner/", "a/b..c"])
def test_a_name_that_is_no_hub_id_is_a_usage_error(cli, model, monkeypatch):
    """Said before any request, not as a local path or a cache miss."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("pull", model)
    assert result.exit_code == 2 and result.stderr.startswith(f"error [usage]: '{model}' is not a hub id"), \
        result.stderr


def acme_or_endpoint(err: str, endpoint: str) -> bool:
    """The line names what failed: the endpoint (unreachable) or the model (an interceptor answered junk)."""
    return endpoint in err or "acme/some-model" in err
