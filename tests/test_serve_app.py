"""The ASGI app before the model is ready: health, refusals, keys and CORS (in-process, no model loaded)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from idefics_cli.serve.app import ServerState, build_app  # noqa: E402
from idefics_cli.serve.config import ServeConfig  # noqa: E402


def client(**config) -> TestClient:
    # no `with`: the lifespan (which would load the model) does not run, the state stays "loading"
    return TestClient(build_app(ServeConfig(**config), ServerState()))


def test_not_ready_until_loaded():
    c = client()
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "loading"
    assert c.get("/v1/models").status_code == 503


def test_keys_are_checked_before_anything_else():
    c = client(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                    {"Authorization": "Bearer s3cret-and-more"}):
        r = c.post("/v1/chat/completions", content=b"{", headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "authentication_error",
                                     "code": "invalid_api_key", "param": None}
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 503  # loading
    assert c.get("/health").status_code == 503  # open without a key


def test_cors_only_when_asked():
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = client().options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client(cors="https://app.example").options("/v1/chat/completions", headers=preflight)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = client(cors="https://app.example").options("/v1/chat/completions",
                                                   headers={**preflight, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
