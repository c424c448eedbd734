"""The gate in front of `imagegen serve` (serve/guard.py): the Host allow-list, the token checked before a
byte of the body is read, the body caps and deadline, the cross-site filter, the cookie off loopback and
the cap on open requests; over raw ASGI (counting the body bytes the app pulls) and a real server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
import warnings

import pytest

from imagegen.serve import create_app
from imagegen.serve import guard as G

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

from conftest import LOCAL, serve_process

TOKEN = "a-test-token-0123"
CHUNK = 64 << 10
MULTIPART = "multipart/form-data; boundary=xyz"
PART = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'   # a file part begins


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded")
    shutil.copytree(tiny_run, root / "gan")
    return root


def sample_png(root) -> str:
    return "/files/gan/samples/" + sorted(p.name for p in (root / "gan" / "samples").glob("*.png"))[0]


def call(app, method: str, path: str, headers: dict, chunks: int = 0, length: bool = True, query: bytes = b"",
         stall_after: int | None = None, start: bytes = b"") -> tuple[int, bytes, int]:
    """One request over raw ASGI with a body of `chunks` x 64 KiB (Content-Length given when `length`,
    else chunked): (status, body, the body bytes the app pulled). `stall_after`: the client sends that
    many chunks, then nothing; `start`: how the body begins (x after it)."""
    pulled = [0]
    left = [chunks]

    async def receive():
        if left[0] and (stall_after is None or pulled[0] < stall_after * CHUNK):
            body = (start if pulled[0] == 0 else b"").ljust(CHUNK, b"x")
            left[0] -= 1
            pulled[0] += CHUNK
            return {"type": "http.request", "body": body, "more_body": left[0] > 0}
        if left[0]:
            await asyncio.sleep(3600)                     # a client that stopped sending
        if pulled[0] == 0 and chunks == 0:
            pulled[0] = -1                                # the one empty message of a bodiless request
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)                         # waiting for a disconnect that never comes
    sent = []

    async def send(message):
        sent.append(message)

    heads = dict(headers)
    if chunks and length:
        heads["content-length"] = str(chunks * CHUNK)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in heads.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}

    async def run():
        await asyncio.wait_for(app(scope, receive, send), 20)
    asyncio.run(run())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, max(pulled[0], 0)


def test_an_upload_without_the_token_is_refused_before_its_body_is_read(served):
    app = create_app(served, log=None, token=TOKEN)
    host = {"host": "127.0.0.1:8000", "content-type": MULTIPART}
    for length in (True, False):                          # 10 MiB, announced or chunked
        status, body, pulled = call(app, "POST", "/api/upload", host, chunks=160, length=length)
        assert status == 401 and b"token" in body and pulled < 1 << 20
        assert pulled == 0
        status, _, pulled = call(app, "POST", "/api/upload", host | {G.TOKEN_HEADER: "wrong-token-000"}, chunks=160, length=length)
        assert status == 403 and pulled == 0


def test_bodies_over_their_route_cap_are_413_and_stop_being_read(served):
    app = create_app(served, log=None, token=TOKEN)
    json_head = {"host": "127.0.0.1:8000", "content-type": "application/json"}
    status, body, pulled = call(app, "POST", "/api/generate", json_head, chunks=128)       # 8 MiB announced
    assert status == 413 and pulled == 0 and b"at most" in body
    status, _, pulled = call(app, "POST", "/api/generate", json_head, chunks=128, length=False)   # 8 MiB chunked
    assert status == 413 and pulled <= G.SMALL_BODY + CHUNK
    status, _, pulled = call(app, "POST", "/api/upload", json_head | {G.TOKEN_HEADER: TOKEN, "content-type": MULTIPART},
                             chunks=(G.ZIP_BODY // CHUNK) + 1)
    assert status == 413 and pulled == 0                  # a token does not lift the cap
    status, body, _ = call(app, "POST", "/api/generate", json_head | {"content-length": "12abc"})
    assert status == 400 and b"Content-Length" in body


def test_a_body_not_sent_within_its_deadline_is_408(served, monkeypatch):
    monkeypatch.setitem(G.BODY_LIMITS, "/api/inpaint", (G.IMAGE_BODY, 0.3))
    app = create_app(served, log=None)
    t = time.perf_counter()
    status, body, pulled = call(app, "POST", "/api/inpaint", {"host": "127.0.0.1", "content-type": MULTIPART},
                                chunks=4, stall_after=1, start=PART)
    assert status == 408 and b"0.3 s" in body and pulled == CHUNK
    assert time.perf_counter() - t < 10


def test_a_foreign_host_is_403_on_every_route(served):
    app = create_app(served, log=None)
    png = sample_png(served)
    for base in ("http://evil.example", "http://evil.example:8000", "http://127.0.0.1.evil.example"):
        with TestClient(app, base_url=base) as c:
            for path in ("/api/models", png, "/"):
                r = c.get(path)
                assert r.status_code == 403 and "not served here" in r.json()["detail"], (base, path)
    for base in (LOCAL, "http://localhost:8000", "http://[::1]:8000"):
        with TestClient(app, base_url=base) as c:
            assert c.get("/api/models").status_code == 200 and c.get(png).status_code == 200
    assert call(app, "GET", "/api/models", {})[0] == 403                    # no Host header at all
    named = create_app(served, log=None, hosts=("studio.lan",))
    with TestClient(named, base_url="http://studio.lan:8000") as c:
        assert c.get("/api/models").status_code == 200
    with TestClient(named, base_url="http://localhost:8000") as c:
        assert c.get("/api/models").status_code == 403   # a name it was not given
    with TestClient(named, base_url="http://192.168.1.5:8000") as c:
        assert c.get("/api/models").status_code == 200   # an IP address cannot be rebound
    with TestClient(create_app(served, log=None, hosts=("*",)), base_url="http://anything.example") as c:
        assert c.get("/api/models").status_code == 200


def test_a_cross_site_post_is_refused(served):
    with TestClient(create_app(served, log=None), base_url=LOCAL) as c:
        form = {"files": {"image": ("a.png", b"not-a-png"), "mask": ("m.png", b"x")}, "data": {"model": "gan"}}
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": "http://127.0.0.1:9999"}):
            r = c.post("/api/inpaint", headers=headers, **form)
            assert r.status_code == 403, headers
        r = c.post("/api/generate", json={"model": "gan"}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "Origin" in r.json()["detail"]
        # the server's own page (same origin) and programs (no Origin) get through to the route
        assert c.post("/api/generate", json={"model": "gan"}, headers={"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert c.post("/api/generate", json={"model": "gan"}).status_code == 200
        assert c.get("/api/models", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200   # a GET changes nothing


def test_off_loopback_the_token_guards_every_route_and_the_page_gets_a_cookie(served):
    app = create_app(served, log=None, token=TOKEN, hosts=("studio.lan",), token_everywhere=True)
    png = sample_png(served)
    with TestClient(app, base_url="http://studio.lan:8000", follow_redirects=False) as c:
        for path in ("/api/models", png, "/", "/api/train", "/static/app.js"):
            assert c.get(path).status_code == 401, path
        assert c.post("/api/generate", json={"model": "gan"}).status_code == 401
        assert c.get("/health").status_code == 200
        assert c.get("/api/models", headers={G.TOKEN_HEADER: TOKEN}).status_code == 200
        assert c.get("/?token=wrong-token-000").status_code == 403
        r = c.get(f"/?token={TOKEN}")
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # the client keeps the cookie, as the browser does: every route now answers, the image too
        assert c.get("/api/models").status_code == 200 and c.get(png).status_code == 200
        assert c.get("/").status_code == 200
    with TestClient(app, base_url="http://studio.lan:8000") as other:
        other.cookies.set("imagegen_token_8000", "wrong-token-000")
        assert other.get("/api/models").status_code == 403


def test_open_requests_are_capped(monkeypatch):
    monkeypatch.setattr(G, "MAX_IN_FLIGHT", 2)
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = G.Guard(slow_app, G.Policy())
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"host", b"127.0.0.1")], "query_string": b""}

    async def run():
        answers = [[], [], []]

        def sender(i):
            async def send(m):
                answers[i].append(m)
            return send

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}
        held = [asyncio.create_task(gate(scope, receive, sender(i))) for i in range(2)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(gate(scope, receive, sender(2)), 5)   # the third is answered at once
        assert gate.in_flight == 2
        release.set()
        await asyncio.gather(*held)
        assert gate.in_flight == 0
        return [a[0]["status"] for a in answers]
    assert asyncio.run(run()) == [200, 200, 503]


def test_a_real_server_answers_before_the_body_and_refuses_a_foreign_host(served):
    """`imagegen serve` as started by a user: a 10 MiB upload announced without a token is answered 401
    while the client has sent its headers only; a rebinding page's Host is 403."""
    proc, port = serve_process(served, "--token", TOKEN)
    try:
        def raw(head: str) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head.encode())                  # the headers only: no byte of a body follows
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += s.recv(4096)
                length = int(answer.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(answer.split(b"\r\n\r\n", 1)[1]) < length:
                    answer += s.recv(4096)
                return answer
        answer = raw(f"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {MULTIPART}\r\n"
                     f"Content-Length: {10 << 20}\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401")
        answer = raw(f"GET /api/models HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403") and b"not served here" in answer
        answer = raw(f"GET /api/models HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        proc.terminate()
        proc.wait(10)


def test_run_files_are_sandboxed_and_the_page_has_a_policy(served, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(served / "gan", root / "gan")
    (root / "gan" / "x.html").write_text("<script>fetch('/api/upload', {method: 'POST'})</script>")
    with TestClient(create_app(root, log=None), base_url=LOCAL) as c:
        r = c.get("/files/gan/x.html")
        assert r.status_code == 200 and r.headers["content-security-policy"] == "sandbox"
        assert r.headers["x-content-type-options"] == "nosniff"
        page = c.get("/")
        assert "script-src" not in page.headers["content-security-policy"]          # default-src 'self' covers it
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert c.get("/static/app.js").headers["x-content-type-options"] == "nosniff"
