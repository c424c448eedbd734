"""The gate in front of every route of `imagegen serve`: a small ASGI layer that answers a request before
any route runs, and before the app reads one byte of its body, when the request is not for this server.

FastAPI reads a body in full before it runs a route's dependencies, so a check made in a route comes
after the upload is on disk. Everything here looks only at the request line and its headers, in order:
1. Host: the Host header must name the server: an IP address, or a name it answers to ("localhost"; off
   loopback also the bound name, this machine's names when bound to 0.0.0.0, and each --allow-host). A
   page whose domain rebinds to 127.0.0.1 sends its own name there, so it is refused with 403; an IP
   address cannot be rebound, so it is always accepted (Jupyter's rule).
2. Cross-site: a POST that the browser marks `Sec-Fetch-Site: cross-site`, or whose Origin is not the
   server's own, is refused with 403. Any web page may send a form or text POST without CORS's consent.
3. The token (from the X-Imagegen-Token header or the cookie the page gets): required by the routes that
   change anything, and off loopback by every route but /health. 401 without it, 403 when wrong. The page's
   first load with `?token=` sets the cookie (HttpOnly, SameSite=Strict) and redirects to the clean address,
   so the token neither stays in the history nor needs to be typed, and images and event streams carry it.
4. The body: 413 when Content-Length is over the route's cap, and the same when a chunked body passes the
   cap while it is read; 408 when it is not all read within the route's deadline.
5. At most MAX_IN_FLIGHT requests at once (an event stream counts while it is open); the next gets 503.
Every answer carries `nosniff` and a Content-Security-Policy: the page's own (its script, style and
images from this origin only), and for the run folders' files (/files/, HTML a run wrote) `sandbox`, so
such a page runs in an origin of its own and cannot call the API with the user's cookie.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_HEADER = "X-Imagegen-Token"
TOKEN_COOKIE = "imagegen_token"
OPEN_PATHS = ("/health",)                             # never need the token
CHANGING_PATHS = ("/api/upload", "/api/train", "/api/train/cancel")   # POSTs that always need it
MAX_IN_FLIGHT = 64
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob: data:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
FILES_CSP = "sandbox"

# The largest body each route takes, and how long reading it may take. A JSON body is a few hundred
# bytes; an image route takes two files of at most 2 MiB (common.MAX_UPLOAD_BYTES); an upload one zip.
SMALL_BODY, SMALL_DEADLINE_S = 64 << 10, 15.0
IMAGE_BODY, IMAGE_DEADLINE_S = 5 << 20, 30.0
ZIP_BODY, ZIP_DEADLINE_S = (64 << 20) + (64 << 10), 300.0   # jobs.MAX_ZIP_BYTES and the form's own bytes
BODY_LIMITS = {"/api/upload": (ZIP_BODY, ZIP_DEADLINE_S), "/api/inpaint": (IMAGE_BODY, IMAGE_DEADLINE_S),
               "/api/sketch": (IMAGE_BODY, IMAGE_DEADLINE_S), "/api/translate": (IMAGE_BODY, IMAGE_DEADLINE_S)}


@dataclass(frozen=True)
class Policy:
    """What the gate lets through. `hosts`: the names the Host header may carry besides IP addresses
    (lower case, no port); "*" in it accepts any (behind a proxy that checks it). `token`: None = no token (loopback only).
    `token_everywhere`: every route but OPEN_PATHS needs the token (a server reachable off loopback)."""
    hosts: frozenset = frozenset(LOOPBACK)
    token: str | None = None
    token_everywhere: bool = False

    def needs_token(self, method: str, path: str) -> bool:
        if self.token is None or path in OPEN_PATHS:
            return False
        return self.token_everywhere or (method == "POST" and path in CHANGING_PATHS)


def host_name(value: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'; '' for a value that is no host."""
    value = value.strip().lower()
    if value.startswith("["):
        name, closed, rest = value[1:].partition("]")
        return name if closed and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else ""
    name, _, port = value.partition(":")
    return name if name and (not port or port.isdigit()) else ""


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def cookie_name(scope) -> str:
    """The token cookie's name, with the server's port in it: browsers keep one jar for every port of a
    host, so two servers on one machine would otherwise overwrite each other's cookie."""
    server = scope.get("server") or ("", 0)
    return f"{TOKEN_COOKIE}_{server[1] or 0}"


class BodyRefused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class Guard:
    """The ASGI middleware (app.add_middleware(Guard, policy=...))."""

    def __init__(self, app, policy: Policy) -> None:
        self.app, self.policy, self.in_flight = app, policy, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":                     # no websockets here
            return await send({"type": "websocket.close", "code": 1008})
        refusal = self.check(scope)
        if refusal is not None:
            return await answer(send, *refusal)
        if self.in_flight >= MAX_IN_FLIGHT:
            return await answer(send, 503, f"busy: {MAX_IN_FLIGHT} requests open; retry shortly", {"Retry-After": "1"})
        self.in_flight += 1
        try:
            await self.limited(scope, receive, send)
        finally:
            self.in_flight -= 1

    def check(self, scope) -> tuple | None:
        """(status, detail[, headers]) when the request is refused from its head alone, else None."""
        headers = request_headers(scope)
        policy, method, path = self.policy, scope["method"], scope["path"]
        hosts = headers.get("host", [])
        host = hosts[0] if len(hosts) == 1 else ""
        name = host_name(host)
        if "*" not in policy.hosts and name not in policy.hosts and not is_address(name):
            shown = (host or "missing or repeated")[:80]
            # The names allowed are not listed: a rebinding page can read this answer.
            return 403, (f"Host {shown!r} is not served here; start imagegen serve with --allow-host NAME to "
                         "answer to another name")
        if method not in ("GET", "HEAD", "OPTIONS"):
            site = first(headers, "sec-fetch-site")
            origin = first(headers, "origin")
            if site == "cross-site":
                return 403, "a cross-site request: this server takes POSTs from its own page and from programs only"
            if origin is not None and not same_origin(origin, host):
                return 403, f"Origin {origin[:80]!r} is not this server's: cross-origin POSTs are refused"
        if path == "/" and method == "GET" and policy.token is not None:
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            if given:        # the address imagegen serve printed: set the cookie, then the clean address
                if not secrets.compare_digest(given[0].encode(), policy.token.encode()):
                    return 403, "wrong token"
                cookie = f"{cookie_name(scope)}={policy.token}; Path=/; HttpOnly; SameSite=Strict"
                return 303, "signed in", {"Location": "/", "Set-Cookie": cookie, "Cache-Control": "no-store"}
        if policy.needs_token(method, path):
            given = first(headers, TOKEN_HEADER.lower()) or cookie_token(headers, cookie_name(scope))
            if not given:
                return 401, (f"this needs the server's token in the {TOKEN_HEADER} header, or open the address "
                             "imagegen serve printed (with ?token=...)")
            if not secrets.compare_digest(given.encode(), policy.token.encode()):
                return 403, "wrong token"
        length = first(headers, "content-length")
        cap, _ = body_limits(path)
        if length is not None:
            if not length.isdigit():
                return 400, f"Content-Length {length[:40]!r} is not a byte count"
            if int(length) > cap:
                return 413, f"a body of {int(length)} bytes; {path} takes at most {cap}"
        return None

    async def limited(self, scope, receive, send) -> None:
        """The app, with its body counted against the route's cap and read within its deadline. A refusal
        while reading replaces the app's own answer (FastAPI turns an error in reading into a 400)."""
        cap, deadline_s = body_limits(scope["path"])
        state = {"read": 0, "done": False, "refused": None, "started": False}
        deadline = time.monotonic() + deadline_s

        async def counted_receive():
            if state["done"]:                          # after the body: only the disconnect an answer waits for
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                state["refused"] = BodyRefused(408, f"the body was not sent within {deadline_s:g} s")
                raise state["refused"] from None
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["read"] > cap:
                    state["refused"] = BodyRefused(413, f"a body of over {cap} bytes; {scope['path']} takes at most {cap}")
                    raise state["refused"]
            return message

        async def guarded_send(message):
            if state["refused"] is not None:
                if not state["started"]:
                    state["started"] = True
                    await answer(send, state["refused"].status, state["refused"].detail, {"Connection": "close"})
                return                                 # the app's own answer to the refused body is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
                csp = FILES_CSP if scope["path"].startswith("/files/") else PAGE_CSP
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff"),
                                                  (b"content-security-policy", csp.encode())]}
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyRefused:
            pass
        if state["refused"] is not None and not state["started"]:
            await answer(send, state["refused"].status, state["refused"].detail, {"Connection": "close"})


def body_limits(path: str) -> tuple[int, float]:
    """(the largest body in bytes, the seconds to send it in) of a route: BODY_LIMITS, else the small ones."""
    return BODY_LIMITS.get(path, (SMALL_BODY, SMALL_DEADLINE_S))


def request_headers(scope) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in scope.get("headers", []):
        out.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return out


def first(headers: dict, name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def cookie_token(headers: dict, name: str) -> str | None:
    for value in headers.get("cookie", []):
        try:
            jar = SimpleCookie(value)
        except CookieError:
            continue
        if name in jar:
            return jar[name].value
    return None


def same_origin(origin: str, host: str) -> bool:
    """An Origin header ('http://127.0.0.1:8000') names the server the request reached (its Host header)."""
    parts = urlsplit(origin.strip())
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


async def answer(send, status: int, detail: str, headers: dict | None = None) -> None:
    """One JSON answer {"detail": ...}, as the routes' own refusals are."""
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
