"""``anomaly-inspect weights``: download, progress, resume, checksums, no network.

Every test talks to a local HTTP server on 127.0.0.1 serving small generated
files; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
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
    two_entries: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, data = two_entries
    wd = tmp_path / "weights"
    rc, out, _ = run_cli(["--manifest", str(manifest), "verify", "--dir", str(wd)], capsys)
    assert rc == 0 and out.count("MISSING") == 3  # nothing asked for explicitly: report only
    rc, out, _ = run_cli(["--manifest", str(manifest), "verify", "model-a", "--dir", str(wd)], capsys)
    assert rc == 1 and "MISSING" in out
    assert (
        run_cli(["--manifest", str(manifest), "fetch", "--all", "--dir", str(wd), "--quiet"], capsys)[0] == 0
    )
    rc, out, _ = run_cli(["--manifest", str(manifest), "verify", "--dir", str(wd)], capsys)
    assert rc == 0 and out.count("OK") == 2 and "UNCHECKED" in out  # config.json: size only
    (wd / "ckpt/model-a.pt").write_bytes(data["ckpt/model-a.pt"][:-1] + b"x")
    rc, out, _ = run_cli(["--manifest", str(manifest), "verify", "--dir", str(wd)], capsys)
    assert rc == 1 and "MISMATCH  model-a" in out


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
