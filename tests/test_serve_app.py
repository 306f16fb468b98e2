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


def test_a_page_seen_before_is_not_decoded_again_while_its_prefix_is_cached(sharp_engine, tmp_path):
    import base64
    from types import SimpleNamespace

    from conftest import make_pdf

    from idefics_cli.serve.app import _prepare
    from idefics_cli.serve.cache import PrefixCache, Seen
    from idefics_cli.serve.scheduler import Scheduler

    data = base64.b64encode(open(make_pdf(tmp_path / "r.pdf", 2), "rb").read()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": data, "pages": "2"}},
                                                      {"type": "text", "text": "What?"}]}]}
    cache = PrefixCache(1 << 30)
    state = ServerState(engine=sharp_engine, scheduler=Scheduler(sharp_engine, cache), status="ok")
    _, first = _prepare(state, body, None)
    assert len(first.images) == 1 and max(first.images[0].size) == 1960 and first.prefix is None
    key = state.scheduler._key(first)  # what the worker computes from the decoded pixels
    _, again = _prepare(state, body, None)  # seen, but nothing cached yet: decoded again, same key
    assert not isinstance(again.images[0], Seen) and again.cache_key == key and again.prefix is None
    cache.put(key, SimpleNamespace(nbytes=10, length=7))  # as the worker stores a prefilled prefix
    _, hit = _prepare(state, body, None)
    assert hit.images == [] and hit.prefix is cache.get(key) and hit.cached_tokens == 7
    assert cache.hits == 2 and cache.misses == 0  # the lookup counted once (the test's get is the second)
    state.pages.entries.clear()  # a page the memo forgot is decoded, and still finds its prefix in the scheduler
    _, fresh = _prepare(state, body, None)
    assert len(fresh.images) == 1 and fresh.prefix is None and state.scheduler._key(fresh) == key


@pytest.mark.parametrize("text", ["What is <image> here?", "<image>"])
def test_a_text_holding_the_image_token_is_a_usage_error_not_a_generation_error(sharp_engine, text):
    """The literal `<image>` in a message's text would be one more image placeholder than images (a 500 in the
    decode loop): it is refused before anything is queued, 400 `usage` naming `messages`."""
    import base64
    import io

    from conftest import make_image

    from idefics_cli.serve.app import _from_error, _prepare
    from idefics_cli.serve.cache import PrefixCache
    from idefics_cli.serve.requests import RequestError
    from idefics_cli.serve.scheduler import Scheduler

    png = io.BytesIO()
    make_image(64, 48).save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": text}]}]}
    state = ServerState(engine=sharp_engine, scheduler=Scheduler(sharp_engine, PrefixCache(0)), status="ok")
    with pytest.raises(RequestError) as caught:
        _prepare(state, body, None)
    response = _from_error(caught.value)
    assert response.status_code == 400 and caught.value.code == "usage" and caught.value.param == "messages"
    assert "<image>" in caught.value.message
