"""docker/nginx.conf (the load balancer of docker/compose.scale.yml): which requests are retried
on another replica, body limits that agree with the service's, and nginx's own errors in the
service's JSON error shape.

Checked statically by parsing the file; where an ``nginx`` binary is installed (or ``NGINX_BIN``
names one), also live, in front of two small local upstream servers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "docker/nginx.conf"
MIB = 1024 * 1024


# ------------------------------------------------------------------ a small nginx config parser
@dataclass
class Block:
    name: str
    args: list[str]
    directives: list[tuple[str, list[str]]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def get(self, name: str) -> list[list[str]]:
        return [a for n, a in self.directives if n == name]

    def one(self, name: str) -> list[str] | None:
        found = self.get(name)
        assert len(found) <= 1, f"{name} set {len(found)} times in {self.name} {self.args}"
        return found[0] if found else None


def tokens(text: str) -> Iterator[str]:
    """Words, quoted strings (quotes removed, may hold braces), ``{``, ``}`` and ``;``."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in "{};":
            yield c
            i += 1
        elif c in "'\"":
            j = text.index(c, i + 1)
            yield "\0" + text[i + 1 : j]  # marked as quoted
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "{};":
                j += 1
            yield text[i:j]
            i = j


def parse(text: str) -> Block:
    root = Block("root", [])
    stack = [root]
    words: list[str] = []
    for tok in tokens(text):
        if tok == ";":
            stack[-1].directives.append((words[0], [w.lstrip("\0") for w in words[1:]]))
            words = []
        elif tok == "{":
            blk = Block(words[0], [w.lstrip("\0") for w in words[1:]])
            stack[-1].blocks.append(blk)
            stack.append(blk)
            words = []
        elif tok == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(tok)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return root


ROOT = parse(CONF.read_text(encoding="utf-8"))
(SERVER,) = [b for b in ROOT.blocks if b.name == "server"]
LOCATIONS = [b for b in SERVER.blocks if b.name == "location"]


def location_for(path: str) -> Block:
    """The location nginx picks for ``path``: exact, else regexes in order unless the longest
    prefix is ``^~``, else the longest prefix."""
    for loc in LOCATIONS:
        if loc.args[0] == "=" and loc.args[1] == path:
            return loc
    prefixes = [
        loc
        for loc in LOCATIONS
        if (len(loc.args) == 1 or loc.args[0] == "^~") and path.startswith(loc.args[-1])
    ]
    best = max(prefixes, key=lambda loc: len(loc.args[-1]), default=None)
    if best is None or best.args[0] != "^~":
        for loc in LOCATIONS:
            if loc.args[0] in ("~", "~*"):
                flags = re.IGNORECASE if loc.args[0] == "~*" else 0
                if re.search(loc.args[1], path, flags):
                    return loc
    assert best is not None, f"no location for {path}"
    return best


def inherited(loc: Block, name: str) -> list[str] | None:
    """A directive's value in ``loc``, else the server's (nginx's inheritance for these)."""
    value = loc.one(name)
    return value if value is not None else SERVER.one(name)


def size_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, value
    return int(m.group(1)) * {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}[m.group(2).lower()]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


SETTINGS = Settings.model_fields
MAX_IMAGE = int(SETTINGS["max_image_bytes"].default)
MAX_REFS = int(SETTINGS["max_reference_images"].default)
SLACK = MIB  # the service's multipart slack (service/app.py ServiceMiddleware._limit)


# ------------------------------------------------------------------ static checks
def test_post_inspect_is_retried_on_another_replica() -> None:
    """Inspection changes nothing: a POST that met a replica still loading (503), a dead one, or a
    broken connection is sent again to another replica (nginx needs ``non_idempotent`` for POST)."""
    loc = location_for("/inspect")
    nu = inherited(loc, "proxy_next_upstream")
    assert nu is not None and {"error", "http_502", "http_503", "non_idempotent"} <= set(nu)
    tries = inherited(loc, "proxy_next_upstream_tries")
    assert tries is not None and 2 <= int(tries[0]) <= 5  # bounded
    assert loc.one("proxy_pass") == ["http://zeroshot_api"]


def test_golden_image_uploads_are_not_resent_after_reaching_a_replica() -> None:
    """Uploads (up to 32 x 20 MiB, encoded by the model) and calibrations (a model pass per image) are
    retried only where nginx could not hand them to a replica at all; once sent, the replica's answer
    (503 JSON included) goes back."""
    for path in (
        "/products/bottle/references",
        "/products/bottle/references/",
        "/products/bottle/calibrate",
    ):
        loc = location_for(path)
        nu = inherited(loc, "proxy_next_upstream")
        assert nu is not None and "non_idempotent" not in nu and "error" in nu
        assert loc.one("proxy_pass") == ["http://zeroshot_api"]
    other = inherited(location_for("/products/bottle"), "proxy_next_upstream")
    assert other is not None and "non_idempotent" not in other


@pytest.mark.parametrize(
    "path,limit",
    [
        ("/inspect", MAX_IMAGE + SLACK),
        ("/products/bottle/references", MAX_IMAGE * MAX_REFS + SLACK),
        ("/products/bottle/calibrate", MAX_IMAGE * MAX_REFS + SLACK),
        ("/products/bottle", MAX_IMAGE + SLACK),
    ],
)
def test_body_limits_let_the_service_answer_its_own_413(path: str, limit: int) -> None:
    """nginx's body cap is at least the service's (settings defaults), so an over-limit upload
    gets the service's precise JSON 413, and nothing the service accepts is refused by nginx."""
    loc = location_for(path)
    value = inherited(loc, "client_max_body_size")
    assert value is not None and size_bytes(value[0]) >= limit, (path, value, limit)
    # ... and not wildly above it: nginx buffers the body before the service can refuse it
    assert size_bytes(value[0]) <= 2 * limit


def test_read_timeout_outlasts_the_service_deadline() -> None:
    """The service answers a request at its deadline itself (504 JSON, ZSI_REQUEST_TIMEOUT_S, 120 s
    in the cpu profile): nginx must not give up first and retry a slow inspection elsewhere."""
    compose = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    deadlines = [float(x) for x in re.findall(r"ZSI_REQUEST_TIMEOUT_S:-([\d.]+)", compose)]
    deadlines.append(float(SETTINGS["request_timeout_s"].default))
    for path in ("/inspect", "/products/bottle/references"):
        value = inherited(location_for(path), "proxy_read_timeout")
        assert value is not None and seconds(value[0]) > max(deadlines)


def json_error_pages() -> dict[int, tuple[int, dict[str, Any]]]:
    """status -> (status answered, JSON body) for every ``error_page`` of the server."""
    named = {loc.args[0]: loc for loc in LOCATIONS if loc.args[0].startswith("@")}
    out = {}
    for args in SERVER.get("error_page"):
        *codes, target = args
        loc = named[target]
        assert loc.one("default_type") == ["application/json"], target
        ret = loc.one("return")
        assert ret is not None and len(ret) == 2, target
        for code in codes:
            out[int(code)] = (int(ret[0]), json.loads(ret[1]))
    return out


def test_nginx_errors_have_the_service_error_shape() -> None:
    pages = json_error_pages()
    assert {400, 413, 500, 502, 503, 504} <= set(pages)
    for code, (status, body) in pages.items():
        assert status == (400 if code == 494 else code)
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
    assert pages[413][1]["error"]["code"] == "payload_too_large"  # the service's own code for 413
    # the API's own answers pass through untouched (its 503 carries Retry-After and details)
    assert SERVER.one("proxy_intercept_errors") in (None, ["off"])
    for loc in LOCATIONS:
        assert loc.one("proxy_intercept_errors") in (None, ["off"])
        assert not loc.get("error_page"), "error_page in a location would drop the server's"


def test_load_balancer_health_is_json() -> None:
    loc = location_for("/lb-health")
    ret = loc.one("return")
    assert ret is not None and ret[0] == "200" and json.loads(ret[1]) == {"status": "ok"}
    assert loc.one("default_type") == ["application/json"]


def test_retry_policy_is_documented() -> None:
    doc = (REPO / "docs/deploy.md").read_text(encoding="utf-8")
    assert "non_idempotent" in doc and "POST /inspect" in doc
    assert "/references" in doc and "client_max_body_size" in doc


# ------------------------------------------------------------------ live, where nginx is installed
def nginx_binary() -> str | None:
    return os.environ.get("NGINX_BIN") or shutil.which("nginx") or shutil.which("/usr/sbin/nginx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Upstream:
    status: int
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    httpd: ThreadingHTTPServer | None = None


def start_upstream(status: int) -> Upstream:
    up = Upstream(status)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            up.seen.append((self.command, self.path))
            body = json.dumps({"upstream": up.port, "status": up.status}).encode()
            if up.status != 200:
                body = json.dumps({"error": {"code": "loading", "message": "still loading"}}).encode()
            self.send_response(up.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")  # no idle keepalive: a stopped server is gone
            self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

    up.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    up.port = up.httpd.server_address[1]
    threading.Thread(target=up.httpd.serve_forever, daemon=True).start()
    return up


@pytest.fixture
def live_nginx(tmp_path: Path) -> Iterator[tuple[str, Upstream, Upstream]]:
    binary = nginx_binary()
    if binary is None:
        pytest.skip("no nginx binary (install nginx or set NGINX_BIN) for the live check")
    loading, ready = start_upstream(503), start_upstream(200)
    port = free_port()
    conf = CONF.read_text(encoding="utf-8")
    conf = conf.replace(
        "server api:8000",
        f"server 127.0.0.1:{loading.port} max_fails=0;\n    server 127.0.0.1:{ready.port}",
        1,
    )
    conf = re.sub(r"listen\s+8000\s*;", f"listen 127.0.0.1:{port};", conf)
    (tmp_path / "logs").mkdir()
    main = tmp_path / "nginx.conf"
    main.write_text(
        "daemon off;\nmaster_process off;\nerror_log stderr warn;\npid nginx.pid;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n access_log off;\n client_body_temp_path {tmp_path}/body;\n"
        f" proxy_temp_path {tmp_path}/proxy;\n fastcgi_temp_path {tmp_path}/fastcgi;\n"
        f" uwsgi_temp_path {tmp_path}/uwsgi;\n scgi_temp_path {tmp_path}/scgi;\n"
        f" include {tmp_path}/site.conf;\n}}\n",
        encoding="utf-8",
    )
    (tmp_path / "site.conf").write_text(conf, encoding="utf-8")
    proc = subprocess.Popen(
        [binary, "-p", str(tmp_path), "-c", str(main)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"nginx did not start: {out}")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", loading, ready
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for up in (loading, ready):
            assert up.httpd is not None
            up.httpd.shutdown()
            up.httpd.server_close()


def test_live_retries_body_limits_and_json_errors(live_nginx: tuple[str, Upstream, Upstream]) -> None:
    httpx = pytest.importorskip("httpx")
    base, loading, ready = live_nginx
    with httpx.Client(base_url=base, timeout=20) as client:
        # POST /inspect: whichever replica nginx picks, the answer comes from the ready one
        codes = [client.post("/inspect", content=b"img").status_code for _ in range(6)]
        assert codes == [200] * 6
        assert ("POST", "/inspect") in loading.seen  # it was tried there, and resent
        # golden-image uploads: never resent once a replica got them; its 503 JSON comes back
        n_before = len(loading.seen) + len(ready.seen)
        answers = [client.post("/products/p/references", content=b"g") for _ in range(6)]
        assert len(loading.seen) + len(ready.seen) - n_before == 6
        assert {r.status_code for r in answers} <= {200, 503}
        for r in answers:
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "loading"  # the service's body, untouched
        # too large for nginx: JSON 413, not nginx's HTML page
        big = client.post("/inspect", content=b"\0" * (MAX_IMAGE * 2 + SLACK))
        assert big.status_code == 413 and big.headers["content-type"].startswith("application/json")
        assert big.json()["error"]["code"] == "payload_too_large"
        # a body the service accepts passes nginx
        ok = client.post("/inspect", content=b"\0" * MAX_IMAGE)
        assert ok.status_code == 200
        health = client.get("/lb-health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        # no replica answers: JSON 502
        for up in (loading, ready):
            assert up.httpd is not None
            up.httpd.shutdown()
            up.httpd.server_close()
        gone = client.get("/health")
        assert gone.status_code == 502 and gone.json()["error"]["code"] == "upstream_unavailable"
