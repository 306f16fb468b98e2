"""GET /metrics over real HTTP: parsed with prometheus-client's own parser, counters moving by what was served.

One server (127.0.0.1, ephemeral port, API key; the sharp tiny model, float32 CPU): two answers about the same
image (the second is prefilled from the prefix cache) and one bad request, between two scrapes.
"""

from __future__ import annotations

import pytest
from conftest import make_image

httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")
from test_serve import KEY, Server, data_url, image_message  # noqa: E402 - after the skips: the serve extra

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(sharp_model):
    srv = Server(sharp_model, "--api-key", KEY)
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, "\n".join(srv.lines)


def scrape(server) -> dict:
    r = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_need_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server.url}/metrics", headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # open, and not counted


def test_counters_move_by_what_was_served(server):
    before = scrape(server)
    messages = [image_message(data_url(make_image(96, 64, seed=7)), "What is this?")]
    usages = []
    with httpx.Client(timeout=120, headers=AUTH) as client:
        for _ in range(2):
            r = client.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 6})
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
        r = client.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "temperature": 9})
        assert r.status_code == 400
    after = scrape(server)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("idefics_requests_total", status="200") == 2
    assert moved("idefics_requests_total", status="400") == 1
    assert moved("idefics_requests_total", status="401") == 0  # /metrics' own 401s are not API requests
    assert moved("idefics_generated_tokens_total") == sum(u["completion_tokens"] for u in usages) > 0
    assert moved("idefics_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    # the repeated image was not decoded again (its prefix was cached); the bad request was refused before any was
    assert moved("idefics_pages_rendered_total") == 1
    assert moved("idefics_time_to_first_token_seconds_count") == 2
    assert moved("idefics_time_to_first_token_seconds_sum") > 0
    assert moved("idefics_time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert moved("idefics_time_per_output_token_seconds_count") == 2
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0  # the second answer's prefix came from the cache
    assert moved("idefics_prefix_cache_hits_total") == 1 and moved("idefics_prefix_cache_misses_total") == 1
    assert after[("idefics_prefix_cache_bytes", ())] > 0
    assert after[("idefics_queue_length", ())] == 0 and after[("idefics_running_rows", ())] == 0
