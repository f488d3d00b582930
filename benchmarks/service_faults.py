"""Load and fault checks of the running service: deadlines, overload, Redis killed and frozen.

Starts the real service (uvicorn subprocess, ``ZSI_DEMO=true``: tiny random-init models,
so the figures are about the service, not the models) and, for the Redis phase, a
private ``redis-server`` on a free port that the script kills, restarts and freezes.
Each phase prints a status-code histogram and the counts that matter:

- ``deadline``: many clients against ``ZSI_REQUEST_TIMEOUT_S=0.25``; every answer must be
  200 / 503 / 504 JSON, never a 500 or a plain-text body.
- ``overload``: a queue of 4 waiting requests and many clients; refusals must be 503 JSON
  with ``Retry-After``.
- ``redis``: inspections and product writes while Redis is up, SIGKILLed, restarted and
  SIGSTOPped (frozen); writes during the outage must be refused (503), never accepted and
  lost: after Redis is back every accepted product must read back. A product read before
  the outage must still be served during it. ``/health`` latency is sampled throughout.

Usage::

    python benchmarks/service_faults.py [--seconds 20] [--phases deadline overload redis]

Prints figures; it asserts nothing (tests/service/* hold the pass/fail checks). Exit code
1 when a phase saw a server error (5xx other than 503/504), a non-JSON error body or a
lost write, so that it can gate a release script.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_pool(n: int, size: tuple[int, int] = (160, 120), seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Answer(NamedTuple):
    status: int
    is_json: bool
    retry_after: bool
    seconds: float


def call(
    port: int, method: str, path: str, body: bytes | None = None, ctype: str = "", timeout: float = 60.0
) -> Answer:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": ctype} if ctype else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        is_json = resp.getheader("content-type", "").startswith("application/json")
        if is_json:
            try:
                json.loads(data)
            except ValueError:
                is_json = False
        return Answer(
            resp.status, is_json, resp.getheader("retry-after") is not None, time.perf_counter() - t0
        )
    except OSError:
        return Answer(0, False, False, time.perf_counter() - t0)  # 0 = connection error / client timeout
    finally:
        conn.close()


class Tally:
    """Answers of one kind of request: status histogram, error-body checks, 200 latencies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_status: collections.Counter[int] = collections.Counter()
        self.non_json_errors = 0
        self.no_retry_after_503 = 0
        self.latencies: list[float] = []

    def add(self, a: Answer) -> None:
        with self.lock:
            self.by_status[a.status] += 1
            if a.status >= 400 and not a.is_json:
                self.non_json_errors += 1
            if a.status == 503 and not a.retry_after:
                self.no_retry_after_503 += 1
            if a.status == 200:
                self.latencies.append(a.seconds)

    @property
    def server_errors(self) -> int:
        return (
            sum(n for s, n in self.by_status.items() if s >= 500 and s not in (503, 504)) + self.by_status[0]
        )

    def line(self) -> str:
        total = sum(self.by_status.values())
        hist = ", ".join(f"{s or 'conn-error'}: {n}" for s, n in sorted(self.by_status.items()))
        lat = ""
        if self.latencies:
            p50, p99 = np.percentile(self.latencies, [50, 99])
            lat = f"; 200 latency p50 {p50:.3f} s, p99 {p99:.3f} s"
        return (
            f"{total} requests ({hist}); server errors (5xx not 503/504, or no answer): {self.server_errors}; "
            f"non-JSON error bodies: {self.non_json_errors}; 503 without Retry-After: "
            f"{self.no_retry_after_503}{lat}"
        )


@contextmanager
def service(workdir: Path, **env: str) -> Iterator[int]:
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ZSI_") and k != "REDIS_URL"}
    environ.update(
        {
            "ZSI_DEMO": "true",
            "ZSI_DEVICE": "cpu",
            "ZSI_DATA_DIR": str(workdir / "data"),
            "ZSI_WEIGHTS_DIR": str(workdir / "weights"),
            "ZSI_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            **env,
        }
    )
    log = (workdir / "uvicorn.log").open("wb")
    cmd = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=workdir, env=environ, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while call(port, "GET", "/ready", timeout=2).status != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"service did not start: {(workdir / 'uvicorn.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_clients(n: int, seconds: float, work: Callable[[int], None]) -> None:
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            work(i)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def inspect_work(
    port: int, pool: list[bytes], tally: Tally, product: str = "bottle"
) -> Callable[[int], None]:
    counter = iter(range(10**9))

    def work(_: int) -> None:
        img = pool[next(counter) % len(pool)]
        tally.add(call(port, "POST", f"/inspect?product={product}", img, "image/png"))

    return work


def phase_deadline(args: argparse.Namespace, pool: list[bytes]) -> int:
    with (
        tempfile.TemporaryDirectory() as d,
        service(
            Path(d), ZSI_REQUEST_TIMEOUT_S="0.25", ZSI_RESULT_CACHE="false", ZSI_QUEUE_SIZE="256"
        ) as port,
    ):
        tally = Tally()
        health = Tally()
        stop = threading.Event()
        prober = threading.Thread(target=probe_health, args=(port, health, stop), daemon=True)
        prober.start()
        run_clients(args.clients, args.seconds, inspect_work(port, pool, tally))
        stop.set()
        prober.join()
    print(
        f"[deadline] {args.clients} clients x {args.seconds:.0f} s, ZSI_REQUEST_TIMEOUT_S=0.25: {tally.line()}"
    )
    print(f"[deadline] /health during load: {health_line(health)}")
    return tally.server_errors + tally.non_json_errors


def phase_overload(args: argparse.Namespace, pool: list[bytes]) -> int:
    with (
        tempfile.TemporaryDirectory() as d,
        service(Path(d), ZSI_QUEUE_SIZE="4", ZSI_MAX_BATCH="2", ZSI_RESULT_CACHE="false") as port,
    ):
        tally = Tally()
        run_clients(args.clients // 2, args.seconds, inspect_work(port, pool, tally))
    print(f"[overload] {args.clients // 2} clients x {args.seconds:.0f} s, queue of 4: {tally.line()}")
    return tally.server_errors + tally.non_json_errors + tally.no_retry_after_503


def probe_health(port: int, tally: Tally, stop: threading.Event) -> None:
    while not stop.is_set():
        tally.add(call(port, "GET", "/health", timeout=30))
        time.sleep(0.1)


def health_line(t: Tally) -> str:
    if not t.latencies:
        return f"no 200 answers ({dict(t.by_status)})"
    return f"{len(t.latencies)} probes, max {max(t.latencies) * 1000:.0f} ms, failed {t.server_errors}"


class PrivateRedis:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            # appendfsync always: what Redis acknowledged survives its SIGKILL, as a deployment's
            # persistent Redis would (docker-compose.yml); the service must not lose it either
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


def phase_redis(args: argparse.Namespace, pool: list[bytes]) -> int:
    binary = shutil.which("redis-server")
    if binary is None:
        print("[redis] skipped: no redis-server on PATH (Debian package redis-server)")
        return 0
    redis_dir = Path(tempfile.mkdtemp(prefix="zsi-faults-redis-"))
    redis = PrivateRedis(binary, redis_dir)
    redis.start()
    third = args.seconds / 3
    accepted: list[str] = []
    writes = Tally()
    reads_kept = Tally()
    inspects = Tally()
    health = Tally()
    counter = iter(range(10**9))
    try:
        with (
            tempfile.TemporaryDirectory() as d,
            service(
                Path(d),
                ZSI_REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
                ZSI_RESULT_CACHE="false",
                ZSI_REDIS_RETRY_S="1",
            ) as port,
        ):
            body = json.dumps({"object_name": "fault part", "threshold": 0.5}).encode()
            assert call(port, "PUT", "/products/kept-part", body, "application/json").status == 201
            assert call(port, "GET", "/products/kept-part").status == 200  # read once while Redis is up

            def writer(_: int) -> None:
                pid = f"fault-{next(counter)}"
                a = call(port, "PUT", f"/products/{pid}", body, "application/json")
                writes.add(a)
                if a.status == 201:
                    accepted.append(pid)
                reads_kept.add(call(port, "GET", "/products/kept-part"))
                time.sleep(0.05)

            def timeline() -> None:
                time.sleep(third)
                redis.kill()  # outage: SIGKILL
                time.sleep(third / 2)
                redis.start()  # back, from its append-only file
                time.sleep(third / 4)
                redis.signal(signal.SIGSTOP)  # frozen: connections hang until the socket timeout
                time.sleep(third / 4)
                redis.signal(signal.SIGCONT)

            stop = threading.Event()
            threads = [
                threading.Thread(target=timeline, daemon=True),
                threading.Thread(target=probe_health, args=(port, health, stop), daemon=True),
                threading.Thread(target=run_clients, args=(1, args.seconds, writer), daemon=True),
            ]
            for t in threads:
                t.start()
            run_clients(8, args.seconds, inspect_work(port, pool, inspects))
            stop.set()
            for t in threads:
                t.join()
            time.sleep(1.5)  # past ZSI_REDIS_RETRY_S: the service talks to Redis again
            lost = [p for p in accepted if call(port, "GET", f"/products/{p}").status != 200]
    finally:
        redis.kill()
        shutil.rmtree(redis_dir, ignore_errors=True)
    print(
        f"[redis] Redis up {third:.0f} s, SIGKILL {third / 2:.0f} s, restarted (AOF), SIGSTOP {third / 4:.0f} s"
    )
    print(f"[redis] inspections, 8 clients: {inspects.line()}")
    print(f"[redis] product writes: {writes.line()}")
    print(f"[redis] accepted writes: {len(accepted)}, lost after Redis came back: {len(lost)}")
    print(f"[redis] reads of a product read before the outage: {reads_kept.line()}")
    print(f"[redis] /health: {health_line(health)}")
    return inspects.server_errors + inspects.non_json_errors + writes.server_errors + len(lost)


PHASES = {"deadline": phase_deadline, "overload": phase_overload, "redis": phase_redis}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each phase")
    ap.add_argument(
        "--clients", type=int, default=64, help="clients of the deadline phase (half for overload)"
    )
    ap.add_argument("--phases", nargs="+", choices=sorted(PHASES), default=list(PHASES))
    args = ap.parse_args()
    pool = png_pool(32)
    bad = 0
    for name in args.phases:
        bad += PHASES[name](args, pool)
    print(f"problems: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
