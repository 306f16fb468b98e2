"""transport.py: server URLs, the server's error objects as the CLI's errors, Retry-After, server-sent events.

The HTTP itself runs against real servers in tests/test_client.py and tests/test_serve.py (a full queue's 503).
"""

from __future__ import annotations

import io
import json

import pytest
from conftest import make_image

from idefics_cli.errors import UsageError
from idefics_cli.remote.transport import Overloaded, ServerLoading, Transport, events, normalize_url, retry_after


def test_server_urls_are_normalized_and_checked():
    assert normalize_url("127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert normalize_url(" http://localhost:8000/v1/ ") == "http://localhost:8000"
    assert normalize_url("https://h.example/idefics/") == "https://h.example/idefics"
    # a user name and password are not sent (the API key is): not kept, so no error message prints them
    assert normalize_url("https://bob:hunter2@h.example:8443/idefics") == "https://h.example:8443/idefics"
    for bad in ("ftp://h:1", "http://", "http://h:notaport", "not a url", "http://h.example/a b", "http://h\x00:1",
                "http://[::1", "[::1:8000"):  # an IPv6 address not closed: urlsplit's ValueError
        with pytest.raises(UsageError):
            normalize_url(bad)


def test_a_url_with_a_space_is_a_usage_error_in_the_cli(cli, tmp_path):
    make_image(64, 48).save(tmp_path / "p.png")
    result = cli("ask", tmp_path / "p.png", "hi", "--server", "not a url")
    assert result.exit_code == 2 and result.stderr.startswith("error [usage]: --server"), result.stderr


def test_an_api_key_no_header_can_carry_is_a_usage_error(cli, tmp_path):
    make_image(64, 48).save(tmp_path / "p.png")
    for key in ("secret\r", "a\nb", "ключ"):  # \r: a key file saved on Windows, read with $(cat key.txt)
        result = cli("ask", tmp_path / "p.png", "hi", "--server", "127.0.0.1:9", "--api-key", key)
        assert result.exit_code == 2 and result.stderr.startswith("error [usage]: the API key"), (key, result.stderr)
        assert len(result.stderr.splitlines()) == 1
    assert Transport("127.0.0.1:9", "s3cret clé-_.~+/=").api_key == "s3cret clé-_.~+/="  # Latin-1: the server's too


def test_https_to_a_plain_http_server_says_to_try_http():
    import socket
    import threading

    from idefics_cli.errors import IdeficsError

    with socket.create_server(("127.0.0.1", 0)) as listener:
        def answer():  # what uvicorn says to a TLS hello
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(IdeficsError) as err:
            Transport(url).json("GET", "/v1/models")
    assert err.value.code == "model_error" and err.value.message == (
        f"cannot reach the idefics server at {url}: it does not speak TLS (https): is it http://?"), err.value.message


def body(code, message="m") -> bytes:
    return json.dumps({"error": {"message": message, "type": "t", "code": code, "param": None}}).encode()


def test_error_objects_keep_the_clis_codes():
    http = Transport("127.0.0.1:9")
    cases = [
        (400, body("usage", "max_tokens\ntoo big"), None, "usage"),
        (400, body("corrupt"), None, "corrupt"),
        (503, body("out_of_memory"), None, "out_of_memory"),
        (503, body("loading"), ServerLoading, "model_error"),
        (503, body("overloaded"), Overloaded, "model_error"),
        (429, b"<html>Too Many Requests</html>", Overloaded, "model_error"),  # a gateway's rate limit: retried
        (413, body("request_too_large"), UsageError, "usage"),
        (413, b"<html><title>413 Request Entity Too Large</title></html>", UsageError, "usage"),  # nginx's 1 MiB
        (401, body("invalid_api_key"), None, "model_error"),
        (500, body("internal"), None, "model_error"),
        (502, b"<html>bad gateway</html>", None, "model_error"),
        (400, body(["usage"]), None, "model_error"),  # a code of another type: no TypeError (unhashable)
        (400, body({"code": "usage"}), None, "model_error"),
        (502, b"[" * 100_000, None, "model_error"),  # nested past Python's recursion limit
    ]
    for status, raw, cls, code in cases:
        err = http.error(status, raw)
        assert err.code == code, (status, raw, err.code)
        if cls is not None:
            assert isinstance(err, cls), (status, raw, type(err))
        assert "\n" not in err.message
    assert "refused the API key" in http.error(401, b"").message and "IDEFICS_API_KEY" in http.error(401, b"").hint
    assert "http://127.0.0.1:9" in http.error(502, b"").message


def test_retry_after_is_bounded():
    assert [retry_after(v) for v in ("1", "0", "3600", None, "soon")] == [1.0, 0.1, 10.0, 1.0, 1.0]
    assert [retry_after(v) for v in ("nan", "inf", "-inf")] == [1.0, 10.0, 0.1]  # time.sleep(nan) raises


def test_server_sent_events_end_at_done():
    stream = io.BytesIO(b': comment\n\ndata: {"a": 1}\n\ndata:{"b": 2}\n\ndata: [DONE]\n\ndata: {"c": 3}\n\n')
    assert list(events(stream)) == [{"a": 1}, {"b": 2}]
    assert list(events(io.BytesIO(b'data: {"a": 1}\n\n'))) == [{"a": 1}]  # a stream cut before [DONE]


def test_the_idle_bound_of_a_stream_is_per_block_of_its_upload_not_the_whole(monkeypatch):
    """A request body that takes longer than the bound to go out (a slow link) is sent: only a block that makes no
    progress for the bound would give the answer up. Small socket buffers, so the upload is paced by the reader."""
    import socket
    import threading
    import time

    size, connect = 4 * 2**20, socket.create_connection

    def small_buffers(*args, **kwargs):
        sock = connect(*args, **kwargs)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**16)
        return sock

    monkeypatch.setattr(socket, "create_connection", small_buffers)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2**16)

        def answer():  # 64 KiB every 10 ms: about a second for the body
            conn, _ = listener.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(2**16)
                got = len(head.partition(b"\r\n\r\n")[2])
                while got < size:
                    got += len(conn.recv(2**16))
                    time.sleep(0.01)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: [DONE]\n\n")

        threading.Thread(target=answer, daemon=True).start()
        start = time.monotonic()
        conn, resp = Transport(f"http://127.0.0.1:{listener.getsockname()[1]}").send(
            "POST", "/v1/chat/completions", b"x" * size, timeout=0.5, stream=True)
        assert resp.status == 200 and list(events(resp)) == []
        conn.close()
    assert time.monotonic() - start > 0.5  # longer than the bound, as a whole
