"""``anomaly-inspect weights``: download, progress, resume, checksums, no network.

Every test talks to a local HTTP server on 127.0.0.1 serving small generated
files; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from models.weights import FileSpec, check_file, load_manifest
from service import fetch
from service.fetch import ChecksumError, FetchError, NetworkError, download_file

REPO = Path(__file__).resolve().parents[2]
CLI_MAIN = "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class FileServer:
    """Serves ``files`` (path -> bytes) with HTTP Range support; records every request."""

    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    #: one entry per coming request: send the full headers but only this many body bytes, then
    #: drop the connection (a flaky network); requests after the list is used up are served whole
    drops: list[int] = field(default_factory=list)
    #: drop with a TCP reset (the client sees ECONNRESET) instead of an orderly close
    reset: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            state.requests.append((self.path, rng))
            body = state.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            if rng and state.honour_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if state.drops:
                cut = state.drops.pop(0)
                self.wfile.write(body[start : start + cut])
                self.wfile.flush()
                self.close_connection = True
                if state.reset:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body[start:])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


def blob(n: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes (not compressible, not all equal)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_manifest(path: Path, weights: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"weights": weights}), encoding="utf-8")
    return path


@pytest.fixture
def two_entries(server: FileServer, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A manifest with one single-file entry and one directory entry, served locally."""
    data = {
        "ckpt/model-a.pt": blob(300_000, 1),
        "tok/config.json": b'{"hidden_size": 8}',
        "tok/model.safetensors": blob(70_000, 2),
    }
    server.files.update(data)
    m = write_manifest(
        tmp_path / "manifest.json",
        {
            "model-a": {
                "file": "ckpt/model-a.pt",
                "url": server.url("ckpt/model-a.pt"),
                "size": len(data["ckpt/model-a.pt"]),
                "sha256": sha256(data["ckpt/model-a.pt"]),
                "licence": "test",
                "used_by": ["winclip"],
            },
            "tok": {
                "file": "tok",
                "is_dir": True,
                "url": server.url("tok/"),
                "files": {
                    "config.json": {"url": server.url("tok/config.json"), "size": 18},
                    "model.safetensors": {
                        "url": server.url("tok/model.safetensors"),
                        "size": 70_000,
                        "sha256": sha256(data["tok/model.safetensors"]),
                    },
                },
                "licence": "test",
                "used_by": ["saa_plus"],
            },
        },
    )
    return m, data


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = fetch.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ whole command


def test_fetch_downloads_single_and_directory_entries_with_progress(
    two_entries: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, data = two_entries
    wd = tmp_path / "weights"
    rc, out, err = run_cli(["--manifest", str(manifest), "fetch", "model-a", "tok", "--dir", str(wd)], capsys)
    assert rc == 0, err
    for rel, body in data.items():
        assert (wd / rel).read_bytes() == body
    assert not list(wd.rglob("*.part"))
    # progress bar on stderr for each file, ending at 100%
    assert "ckpt/model-a.pt" in err and "tok/model.safetensors" in err and "100%" in err
    assert "model-a:" in out and "verified" in out
    assert "size only" in out  # tok/config.json has no published digest: said so, not hidden


def test_fetch_again_is_a_no_op(
    two_entries: tuple[Path, dict[str, bytes]],
    server: FileServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest, _ = two_entries
    wd = tmp_path / "weights"
    assert run_cli(["--manifest", str(manifest), "fetch", "model-a", "--dir", str(wd)], capsys)[0] == 0
    n = len(server.requests)
    rc, out, _ = run_cli(["--manifest", str(manifest), "fetch", "model-a", "--dir", str(wd)], capsys)
    assert rc == 0 and "already present" in out
    assert len(server.requests) == n


def test_fetch_by_method_uses_the_manifest_used_by(
    two_entries: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, _ = two_entries
    wd = tmp_path / "weights"
    rc, _, err = run_cli(
        ["--manifest", str(manifest), "fetch", "--method", "saa_plus", "--dir", str(wd), "--quiet"], capsys
    )
    assert rc == 0, err
    assert (wd / "tok/model.safetensors").is_file() and not (wd / "ckpt").exists()
    assert err == ""  # --quiet: no progress bar


def test_unknown_name_is_a_usage_error(
    two_entries: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, _ = two_entries
    rc, _, err = run_cli(["--manifest", str(manifest), "fetch", "nope", "--dir", str(tmp_path)], capsys)
    assert rc == 2 and "unknown weights nope" in err and "model-a" in err


# ------------------------------------------------------------------ progress and resume


def test_progress_callback_reaches_the_total(server: FileServer, tmp_path: Path) -> None:
    body = blob(200_000, 3)
    server.files["f.bin"] = body
    spec = FileSpec(path="f.bin", url=server.url("f.bin"), size=len(body), sha256=sha256(body))
    seen: list[tuple[int, int | None]] = []
    res = download_file(spec, tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert res.status == "downloaded" and res.verified and res.bytes_downloaded == len(body)
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == len(body)
    assert {t for _, t in seen} == {len(body)}


def test_resume_continues_a_partial_download_with_a_range_request(server: FileServer, tmp_path: Path) -> None:
    body = blob(250_000, 4)
    server.files["big.pt"] = body
    spec = FileSpec(path="w/big.pt", url=server.url("big.pt"), size=len(body), sha256=sha256(body))
    part = tmp_path / "w" / "big.pt.part"
    part.parent.mkdir()
    part.write_bytes(body[:100_000])  # an interrupted earlier download
    seen: list[int] = []
    res = download_file(spec, tmp_path, progress=lambda d, t: seen.append(d))
    assert server.requests == [("/big.pt", "bytes=100000-")]
    assert res.resumed_from == 100_000 and res.bytes_downloaded == 150_000
    assert seen[0] == 100_000 and seen[-1] == len(body)
    assert (tmp_path / "w/big.pt").read_bytes() == body and not part.exists()


def test_resume_through_the_command_line_says_so(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = blob(120_000, 5)
    server.files["c.pt"] = body
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "c": {
                "file": "c.pt",
                "url": server.url("c.pt"),
                "sha256": sha256(body),
                "licence": "t",
                "used_by": [],
            }
        },
    )
    wd = tmp_path / "weights"
    wd.mkdir()
    (wd / "c.pt.part").write_bytes(body[:50_000])
    rc, out, err = run_cli(["--manifest", str(manifest), "fetch", "c", "--dir", str(wd)], capsys)
    assert rc == 0, err
    assert "resumed at" in out and (wd / "c.pt").read_bytes() == body


def test_server_ignoring_range_restarts_from_zero(server: FileServer, tmp_path: Path) -> None:
    body = blob(90_000, 6)
    server.files["x.pt"] = body
    server.honour_range = False
    spec = FileSpec(path="x.pt", url=server.url("x.pt"), size=len(body), sha256=sha256(body))
    (tmp_path / "x.pt.part").write_bytes(body[:40_000])
    res = download_file(spec, tmp_path)
    assert res.resumed_from == 0 and res.bytes_downloaded == len(body)
    assert (tmp_path / "x.pt").read_bytes() == body


def test_complete_partial_file_is_verified_without_downloading(server: FileServer, tmp_path: Path) -> None:
    body = blob(10_000, 7)
    server.files["y.pt"] = body
    spec = FileSpec(path="y.pt", url=server.url("y.pt"), size=len(body), sha256=sha256(body))
    (tmp_path / "y.pt.part").write_bytes(body)
    res = download_file(spec, tmp_path)
    assert res.status == "downloaded" and res.bytes_downloaded == 0
    assert server.requests == []
    assert (tmp_path / "y.pt").read_bytes() == body


def test_partial_file_of_unknown_size_that_is_complete_gets_416_and_is_kept(
    server: FileServer, tmp_path: Path
) -> None:
    body = blob(5_000, 8)
    server.files["z.pt"] = body
    spec = FileSpec(path="z.pt", url=server.url("z.pt"), sha256=sha256(body))  # size unknown
    (tmp_path / "z.pt.part").write_bytes(body)
    res = download_file(spec, tmp_path)
    assert res.verified and (tmp_path / "z.pt").read_bytes() == body


# ------------------------------------------------------------------ dropped connections


def test_dropped_connection_resumes_with_a_range_request_in_the_same_run(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(fetch, "_sleep", slept.append)
    body = blob(200_000, 20)
    server.files["d.pt"] = body
    server.drops = [70_000]  # the first answer stops after 70 kB
    spec = FileSpec(path="d.pt", url=server.url("d.pt"), size=len(body), sha256=sha256(body))
    res = download_file(spec, tmp_path)
    assert server.requests == [("/d.pt", None), ("/d.pt", "bytes=70000-")]
    assert res.verified and res.retries == 1 and res.bytes_downloaded == len(body)
    assert (tmp_path / "d.pt").read_bytes() == body and not (tmp_path / "d.pt.part").exists()
    assert slept == [fetch.BACKOFF_S]


def test_retries_back_off_then_the_partial_file_is_kept_for_the_next_run(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(fetch, "_sleep", slept.append)
    body = blob(150_000, 21)
    server.files["k.pt"] = body
    server.drops = [40_000, 10_000, 10_000, 10_000]
    spec = FileSpec(path="k.pt", url=server.url("k.pt"), size=len(body), sha256=sha256(body))
    with pytest.raises(fetch.IncompleteDownload, match="kept") as info:
        download_file(spec, tmp_path, retries=3, backoff=0.5)
    assert not isinstance(info.value, ChecksumError)
    assert slept == [0.5, 1.0, 2.0]  # exponential backoff between the retries
    part = tmp_path / "k.pt.part"
    assert part.read_bytes() == body[:70_000]  # kept, not deleted as a "size mismatch"
    assert not (tmp_path / "k.pt").exists()
    # the next run resumes where this one stopped
    res = download_file(spec, tmp_path)
    assert res.resumed_from == 70_000 and res.verified
    assert server.requests[-1] == ("/k.pt", "bytes=70000-")
    assert (tmp_path / "k.pt").read_bytes() == body


def test_reset_connection_is_retried_too(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch, "_sleep", lambda s: None)
    body = blob(400_000, 25)
    server.files["r.pt"] = body
    server.drops, server.reset = [100_000, 50_000], True
    spec = FileSpec(path="r.pt", url=server.url("r.pt"), size=len(body), sha256=sha256(body))
    res = download_file(spec, tmp_path)
    assert res.verified and res.retries == 2 and len(server.requests) == 3
    assert (tmp_path / "r.pt").read_bytes() == body


def test_dropped_connection_without_content_length_check_uses_the_manifest_size(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short file whose size the manifest knows is an interrupted download, not a wrong file."""
    monkeypatch.setattr(fetch, "_sleep", lambda s: None)
    body = blob(60_000, 22)
    server.files["n.pt"] = body[:25_000]  # the server has only part of it (e.g. a mirror mid-sync)
    spec = FileSpec(path="n.pt", url=server.url("n.pt"), size=len(body), sha256=sha256(body))
    with pytest.raises(fetch.IncompleteDownload):
        download_file(spec, tmp_path, retries=1)
    assert (tmp_path / "n.pt.part").read_bytes() == body[:25_000]


def test_cli_keeps_the_partial_download_and_says_how_to_resume(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = blob(120_000, 23)
    server.files["c.pt"] = body
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "c": {
                "file": "c.pt",
                "url": server.url("c.pt"),
                "size": len(body),
                "sha256": sha256(body),
                "licence": "t",
                "used_by": [],
            }
        },
    )
    wd = tmp_path / "weights"
    server.drops = [30_000]
    argv = ["--manifest", str(manifest), "fetch", "c", "--dir", str(wd), "--quiet"]
    rc, _, err = run_cli([*argv, "--retries", "0"], capsys)
    assert rc == 1
    assert "kept" in err and str(wd / "c.pt.part") in err and "run the same command again" in err
    assert (wd / "c.pt.part").stat().st_size == 30_000
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert "resumed at 30.0 kB" in out and (wd / "c.pt").read_bytes() == body


# ------------------------------------------------------------------ mirror / base URL


def test_mirror_base_url_is_tried_first_under_the_manifest_path(
    two_entries: tuple[Path, dict[str, bytes]],
    server: FileServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest, data = two_entries
    server.files["plant-mirror/ckpt/model-a.pt"] = data["ckpt/model-a.pt"]
    wd = tmp_path / "weights"
    argv = ["--manifest", str(manifest), "fetch", "model-a", "--dir", str(wd), "--quiet"]
    rc, _, err = run_cli([*argv, "--mirror", server.url("plant-mirror/")], capsys)
    assert rc == 0, err
    assert server.requests == [("/plant-mirror/ckpt/model-a.pt", None)]  # the official URL not needed
    assert (wd / "ckpt/model-a.pt").read_bytes() == data["ckpt/model-a.pt"]


def test_mirror_from_the_environment_and_a_local_folder(
    two_entries: tuple[Path, dict[str, bytes]],
    server: FileServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest, data = two_entries
    usb = tmp_path / "usb"  # a copied weights folder (air-gapped plant)
    (usb / "ckpt").mkdir(parents=True)
    (usb / "ckpt/model-a.pt").write_bytes(data["ckpt/model-a.pt"])
    monkeypatch.setenv("ZSI_WEIGHTS_MIRROR", str(usb))
    wd = tmp_path / "weights"
    rc, out, err = run_cli(["--manifest", str(manifest), "fetch", "model-a", "--dir", str(wd)], capsys)
    assert rc == 0, err
    assert "verified" in out and server.requests == []
    assert (wd / "ckpt/model-a.pt").read_bytes() == data["ckpt/model-a.pt"]
    # a file the mirror lacks: falls through to the manifest URL, not reported as "no network"
    rc, _, err = run_cli(["--manifest", str(manifest), "fetch", "tok", "--dir", str(wd), "--quiet"], capsys)
    assert rc == 0, err
    assert [p for p, _ in server.requests] == ["/tok/config.json", "/tok/model.safetensors"]


def test_mirror_and_manifest_options_are_documented() -> None:
    parser = fetch.build_parser()
    top = parser.format_help()
    assert "--manifest" in top
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    fetch_help = sub.choices["fetch"].format_help()
    assert "--mirror" in fetch_help and "ZSI_WEIGHTS_MIRROR" in fetch_help and "--retries" in fetch_help
    doc = (REPO / "docs/deploy.md").read_text(encoding="utf-8")
    assert "--mirror" in doc and "ZSI_WEIGHTS_MIRROR" in doc


# ------------------------------------------------------------------ units


def test_one_size_unit_everywhere(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = blob(2_500_000, 24)
    server.files["u.pt"] = body
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "u": {
                "file": "u.pt",
                "url": server.url("u.pt"),
                "size": len(body),
                "sha256": sha256(body),
                "licence": "t",
                "used_by": [],
            }
        },
    )
    rc, out, err = run_cli(["--manifest", str(manifest), "fetch", "u", "--dir", str(tmp_path / "w")], capsys)
    assert rc == 0, err
    assert "downloaded 2.5 MB" in out
    assert "2.50M/2.50M" in err  # the progress bar counts in the same (decimal) megabytes
    assert "2.38" not in out + err and "MiB" not in out + err and "KB" not in out + err
    assert fetch._human(1_500) == "1.5 kB" and fetch._human(2_564_550_879) == "2.6 GB"


# ------------------------------------------------------------------ checksums


def test_checksum_mismatch_is_refused_and_nothing_is_installed(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = blob(64_000, 9)
    server.files["bad.pt"] = body
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "bad": {
                "file": "bad.pt",
                "url": server.url("bad.pt"),
                "size": len(body),
                "sha256": "0" * 64,
                "licence": "t",
                "used_by": [],
            }
        },
    )
    wd = tmp_path / "weights"
    rc, _, err = run_cli(["--manifest", str(manifest), "fetch", "bad", "--dir", str(wd)], capsys)
    assert rc == 1
    assert "does not match" in err and "NOT installed" in err and "0" * 64 in err
    assert not (wd / "bad.pt").exists() and not (wd / "bad.pt.part").exists()


def test_sha256_prefix_md5_and_git_blob_sha1_are_checked(server: FileServer, tmp_path: Path) -> None:
    body = blob(33_333, 10)
    server.files["p.pt"] = body
    git = hashlib.sha1(f"blob {len(body)}\0".encode() + body).hexdigest()
    good = FileSpec(
        path="p.pt",
        url=server.url("p.pt"),
        sha256_prefix=sha256(body)[:8],
        md5=hashlib.md5(body).hexdigest(),
        git_blob_sha1=git,
    )
    res = download_file(good, tmp_path)
    assert res.verified
    chk = check_file(tmp_path / "p.pt", good)
    assert set(chk.checked) == {"sha256_prefix", "md5", "git_blob_sha1"}
    for wrong in (
        FileSpec(path="q.pt", url=server.url("p.pt"), sha256_prefix="deadbeef"),
        FileSpec(path="q.pt", url=server.url("p.pt"), md5="0" * 32),
        FileSpec(path="q.pt", url=server.url("p.pt"), git_blob_sha1="0" * 40),
        FileSpec(path="q.pt", url=server.url("p.pt"), size=len(body) - 1),
    ):
        with pytest.raises(ChecksumError):
            download_file(wrong, tmp_path)
        assert not (tmp_path / "q.pt").exists() and not (tmp_path / "q.pt.part").exists()


def test_git_blob_sha1_matches_git_hash_object(tmp_path: Path) -> None:
    git = subprocess.run(["git", "--version"], capture_output=True, check=False)
    if git.returncode != 0:
        pytest.skip("git not installed")
    f = tmp_path / "f.bin"
    f.write_bytes(blob(12_345, 11))
    expected = subprocess.run(
        ["git", "hash-object", str(f)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert check_file(f, FileSpec(path="f.bin", url="", git_blob_sha1=expected)).verified


def test_corrupt_partial_file_is_refused_then_fetched_cleanly(server: FileServer, tmp_path: Path) -> None:
    body = blob(80_000, 12)
    server.files["r.pt"] = body
    spec = FileSpec(path="r.pt", url=server.url("r.pt"), size=len(body), sha256=sha256(body))
    (tmp_path / "r.pt.part").write_bytes(b"\0" * 30_000)  # garbage from somewhere else
    with pytest.raises(ChecksumError):
        download_file(spec, tmp_path)
    assert not (tmp_path / "r.pt.part").exists()
    assert download_file(spec, tmp_path).verified  # the next try starts from zero


def test_wrong_file_in_place_is_replaced(server: FileServer, tmp_path: Path) -> None:
    body = blob(20_000, 13)
    server.files["s.pt"] = body
    spec = FileSpec(path="s.pt", url=server.url("s.pt"), size=len(body), sha256=sha256(body))
    (tmp_path / "s.pt").write_bytes(b"truncated")
    assert download_file(spec, tmp_path).status == "downloaded"
    assert (tmp_path / "s.pt").read_bytes() == body


# ------------------------------------------------------------------ errors and mirrors


def test_no_network_is_reported_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    manifest = write_manifest(
        tmp_path / "m.json",
        {
            "w": {
                "file": "w.pt",
                "url": f"http://127.0.0.1:{port}/w.pt",
                "sha256": "0" * 64,
                "licence": "t",
                "used_by": [],
            }
        },
    )
    wd = tmp_path / "weights"
    rc, _, err = run_cli(
        ["--manifest", str(manifest), "fetch", "w", "--dir", str(wd), "--timeout", "5"], capsys
    )
    assert rc == 3
    assert "no network" in err and "refused" in err
    assert "copy that weights directory" in err and "/weights" in err
    assert not (wd / "w.pt").exists()


def test_network_error_type(tmp_path: Path) -> None:
    spec = FileSpec(path="a", url=f"http://127.0.0.1:{closed_port()}/a")
    with pytest.raises(NetworkError):
        download_file(spec, tmp_path, timeout=5)


def test_http_error_is_not_called_a_network_problem(server: FileServer, tmp_path: Path) -> None:
    spec = FileSpec(path="a", url=server.url("missing.pt"))
    with pytest.raises(FetchError, match="HTTP 404") as info:
        download_file(spec, tmp_path)
    assert not isinstance(info.value, NetworkError)


def test_mirror_is_tried_when_the_main_url_fails(server: FileServer, tmp_path: Path) -> None:
    body = blob(10_000, 14)
    server.files["mirror/m.pt"] = body
    spec = FileSpec(
        path="m.pt",
        url=f"http://127.0.0.1:{closed_port()}/m.pt",
        mirrors=(server.url("gone.pt"), server.url("mirror/m.pt")),
        sha256=sha256(body),
    )
    assert download_file(spec, tmp_path).verified
    assert [p for p, _ in server.requests] == ["/gone.pt", "/mirror/m.pt"]


# ------------------------------------------------------------------ list and verify


def test_verify_reports_ok_mismatch_and_missing(
    two_entries: tuple[Path, dict[str, bytes]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ZSI_METHODS", raising=False)
    manifest, data = two_entries
    wd = tmp_path / "weights"
    base = ["--manifest", str(manifest), "verify", "--dir", str(wd)]
    # nothing named: the weights of ZSI_METHODS (default winclip) are required; all missing -> 4
    rc, out, _ = run_cli(base, capsys)
    assert rc == fetch.EXIT_MISSING == 4 and "MISSING   model-a" in out and "tok" not in out.split("\n")[0]
    rc, out, _ = run_cli([*base, "model-a"], capsys)
    assert rc == 4 and "MISSING" in out
    rc, out, _ = run_cli([*base, "--all"], capsys)
    assert rc == 4 and out.count("MISSING ") == 3
    assert (
        run_cli(["--manifest", str(manifest), "fetch", "--all", "--dir", str(wd), "--quiet"], capsys)[0] == 0
    )
    rc, out, _ = run_cli([*base, "--all"], capsys)
    assert rc == 0 and out.count("OK ") == 2 and "UNCHECKED" in out  # config.json: size only
    (wd / "tok/config.json").unlink()
    rc, out, _ = run_cli(base, capsys)
    assert rc == 0  # winclip needs only model-a
    monkeypatch.setenv("ZSI_METHODS", "winclip,saa_plus")
    rc, out, _ = run_cli(base, capsys)
    assert rc == 4 and "MISSING   tok" in out
    (wd / "ckpt/model-a.pt").write_bytes(data["ckpt/model-a.pt"][:-1] + b"x")
    rc, out, _ = run_cli(base, capsys)
    assert rc == fetch.EXIT_FAILED == 1 and "MISMATCH  model-a" in out  # a bad file outranks a missing one


def test_list_json_of_the_real_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(["list", "--json", "--dir", str(tmp_path)], capsys)
    assert rc == 0
    doc = json.loads(out)
    names = {w["name"] for w in doc["weights"]}
    assert {"openclip-vit-b-16-plus-240-laion400m_e31", "sam-vit-h", "bert-base-uncased"} <= names
    assert not any(w["present"] for w in doc["weights"])
    assert all(w["licence"] for w in doc["weights"])


def test_list_human_readable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam/sam_vit_b_01ec64.pth").write_bytes(b"x")
    rc, out, _ = run_cli(["list", "--dir", str(tmp_path)], capsys)
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("sam-vit-b"))
    assert "present" in line and "(optional)" in line
    assert "2.6 GB" in out  # SAM vit_h size, from the manifest


def test_default_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZSI_WEIGHTS_DIR", str(tmp_path / "w"))
    args = fetch.build_parser().parse_args(["list"])
    assert args.dir == tmp_path / "w"


def test_runs_as_a_module_and_through_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for cmd in (
        [sys.executable, "-m", "service.fetch", "list", "--json"],
        [sys.executable, "-c", CLI_MAIN, "weights", "list", "--json"],
    ):
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["weights"]) == len(
            load_manifest(REPO / "models/weights_manifest.json")
        )


@pytest.mark.parametrize(
    ("method", "name"),
    [("musc", "openclip-vit-l-14-336-openai"), ("anomalydino", "timm-vit-small-patch14-dinov2")],
)
def test_every_method_can_be_named_with_method(
    method: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--method`` accepts every registered method (the manifest's ``used_by`` says which files)."""
    rc, out, err = run_cli(["verify", "--method", method, "--dir", str(tmp_path)], capsys)
    assert "invalid choice" not in err
    assert rc != 0 and name in out + err  # nothing fetched into tmp_path: reported missing
