"""``anomaly-inspect weights``: list, fetch and verify the official checkpoints.

    anomaly-inspect weights list [--dir DIR] [--json]
    anomaly-inspect weights fetch NAME... [--dir DIR] [--method METHOD] [--all] [--optional]
                                          [--mirror URL_OR_DIR] [--retries N]
    anomaly-inspect weights verify [NAME...] [--dir DIR] [--method METHOD] [--all]

(also ``python -m service.fetch ...``). Files come from the URLs in
``models/weights_manifest.json`` (``--manifest`` names another file of the same
schema) into the weights directory (``--dir``, default ``$ZSI_WEIGHTS_DIR`` or
``./weights``), under the manifest's relative paths.

A mirror (``--mirror`` or ``$ZSI_WEIGHTS_MIRROR``: a base URL such as
``http://mirror.plant.local/weights/``, or a local folder such as a copied
``weights/`` directory) is tried first, at ``<mirror>/<manifest path>``; the
official URLs come after it. Air-gapped plants point it at their own mirror.

A download goes to ``<file>.part``. When the connection drops mid-file, the
``.part`` file is kept and the download resumes from it with an HTTP Range
request, up to ``--retries`` times (default 5) with exponential backoff (1 s,
2 s, 4 s, ...); after that, the next run resumes it. A complete file is checked
against the manifest's size and digests and moved into place only when it
matches; a complete file that does not match is refused and deleted.

Sizes are printed in decimal units (1 kB = 1000 bytes, 1 MB = 10^6 bytes).

Exit codes:
  0  done (fetch: every file in place and checked; verify: every file asked for is
     present and matches)
  1  a file failed: HTTP error, interrupted download (partial file kept), or a
     checksum / size mismatch (verify: a file is present but does not match)
  2  bad usage (unknown name)
  3  no network: no host could be reached (fetch)
  4  verify: a file asked for is missing (and none is bad)
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from models.weights import (
    MANIFEST_PATH,
    PARTIAL_SUFFIX,
    FileSpec,
    WeightSpec,
    check_file,
    load_manifest,
    names_for_method,
)
from prompts import METHODS

USER_AGENT = "zeroshot-inspect-weights/0.1"
CHUNK = 1 << 16
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_NETWORK, EXIT_MISSING = 0, 1, 2, 3, 4
#: retries per URL after a dropped connection, and the first wait (doubled each time, capped)
RETRIES = 5
BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MIRROR_ENV = "ZSI_WEIGHTS_MIRROR"
_sleep = time.sleep  # replaced in tests

#: ``progress(done_bytes, total_bytes_or_None)``, called as data arrives
ProgressFn = Callable[[int, int | None], None]


class FetchError(RuntimeError):
    """A file could not be fetched (HTTP error, bad server answer)."""


class NetworkError(FetchError):
    """No connection to the host at all: no network, DNS failure, refused, timed out."""


class ChecksumError(FetchError):
    """The downloaded file does not match the manifest; it was deleted, not installed."""


class IncompleteDownload(FetchError):
    """The connection kept dropping mid-file; the ``.part`` file is kept for the next run."""


class _Interrupted(Exception):
    """One attempt ended before the whole file arrived (internal: retried)."""

    def __init__(self, message: str, got: int, start: int) -> None:
        super().__init__(message)
        self.got, self.start = got, start


@dataclass(frozen=True)
class FetchResult:
    path: Path
    status: str  # "downloaded" | "present"
    #: bytes received by this call (all attempts together)
    bytes_downloaded: int = 0
    #: size of the ``.part`` file this call started from (an earlier, interrupted run)
    resumed_from: int = 0
    verified: bool = False
    #: attempts repeated after a dropped connection in this call
    retries: int = 0


def default_weights_dir() -> Path:
    return Path(os.environ.get("ZSI_WEIGHTS_DIR", "weights"))


def _human(n: int | None) -> str:
    """A byte count in decimal units (kB = 1000 B, MB = 10^6 B), the unit of the progress bar too."""
    if n is None:
        return "size unknown"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def mirror_url(base: str) -> str:
    """A mirror given as a URL (kept) or a local folder (made a ``file://`` URL), ending in ``/``."""
    if urllib.parse.urlsplit(base).scheme in ("http", "https", "file", "ftp"):
        url = base
    else:
        url = Path(base).expanduser().resolve().as_uri()
    return url if url.endswith("/") else url + "/"


def with_mirrors(spec: FileSpec, mirrors: Sequence[str]) -> FileSpec:
    """``spec`` with ``<mirror>/<spec.path>`` for each mirror tried before its own URLs."""
    if not mirrors:
        return spec
    urls = [mirror_url(m) + urllib.parse.quote(spec.path) for m in mirrors]
    return dataclasses.replace(spec, url=urls[0], mirrors=(*urls[1:], *spec.urls))


def _network_reason(exc: BaseException) -> str | None:
    """A sentence when ``exc`` means the host could not be reached at all, else None."""
    reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, FileNotFoundError):  # a file:// mirror without that file
        return None
    if isinstance(reason, socket.gaierror):
        return f"the host name could not be resolved ({reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "the connection timed out"
    if isinstance(reason, OSError) and not isinstance(exc, urllib.error.HTTPError):
        return f"{reason}"
    return None


def _open(url: str, start: int, timeout: float) -> Any:
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _total_from_response(resp: Any, start: int) -> int | None:
    cr = resp.headers.get("Content-Range")  # "bytes 100-999/1000"
    if cr and "/" in cr and not cr.endswith("/*"):
        return int(cr.rsplit("/", 1)[1])
    length = resp.headers.get("Content-Length")
    return None if length is None else start + int(length)


def download_file(
    spec: FileSpec,
    weights_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    timeout: float = 30.0,
    force: bool = False,
    retries: int = RETRIES,
    backoff: float | None = None,
) -> FetchResult:
    """Fetch one file into ``weights_dir / spec.path``, resuming ``.part`` files, then verify it.

    Each URL of ``spec.urls`` is tried in turn. When a connection drops mid-file the
    ``.part`` file is kept and the same URL is asked again for the rest (HTTP Range), up to
    ``retries`` times, waiting ``backoff`` seconds (default :data:`BACKOFF_S`) before the
    first retry and twice as long before each next one (at most :data:`MAX_BACKOFF_S`).

    Raises:
        NetworkError: no host of ``spec.urls`` could be reached.
        IncompleteDownload: the file never arrived whole; its ``.part`` file is kept.
        FetchError: an HTTP error from every URL.
        ChecksumError: the whole file arrived but does not match the manifest (it is deleted).
    """
    target = Path(weights_dir) / spec.path
    part = target.with_name(target.name + PARTIAL_SUFFIX)
    if target.is_file() and not force:
        chk = check_file(target, spec)
        if chk.ok:
            return FetchResult(target, "present", verified=chk.verified)
        # a wrong or truncated file in place: fetch again, replace it only once the new one checks out
    target.parent.mkdir(parents=True, exist_ok=True)
    if force and part.exists():
        part.unlink()
    if part.exists() and spec.size is not None and part.stat().st_size > spec.size:
        part.unlink()  # larger than the file can be: not ours
    first_start: int | None = None  # where the first attempt really started (0: server ignored Range)
    wait = BACKOFF_S if backoff is None else backoff

    errors: list[str] = []
    network_errors: list[str] = []
    interrupted: list[str] = []
    received = 0
    retried = 0
    done = False
    for url in spec.urls:
        attempt = 0
        while True:
            start = _size(part)
            try:
                if spec.size is None or start < spec.size:
                    got, start = _stream(url, part, start, progress, timeout, spec.size)
                    received += got
                    first_start = start if first_start is None else first_start
                done = True
            except _Interrupted as exc:
                received += exc.got
                first_start = exc.start if first_start is None else first_start
                if attempt < retries:
                    _sleep(min(wait * 2**attempt, MAX_BACKOFF_S))
                    attempt += 1
                    retried += 1
                    continue
                interrupted.append(f"{url}: {exc}")
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and start:  # range not satisfiable: the server has nothing past `start`
                    if spec.size is None or start >= spec.size:
                        done = True  # the partial file may be complete: checked below
                    else:
                        interrupted.append(f"{url}: the server has only {_human(start)}")
                else:
                    errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
            except (urllib.error.URLError, OSError) as exc:
                why = _network_reason(exc)
                if why is None:
                    errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
                else:
                    network_errors.append(f"{url}: {why}")
            break
        if done:
            break
    if not done:
        if interrupted:
            have = _size(part)
            raise IncompleteDownload(
                f"{spec.path}: the download was interrupted ({'; '.join(interrupted + errors + network_errors)}); "
                f"{_human(have)} of {_human(spec.size)} kept in {part}: run the same command again to resume"
            )
        if network_errors and not errors:
            raise NetworkError("; ".join(network_errors))
        raise FetchError("; ".join(errors + network_errors))

    chk = check_file(part, spec)
    if not chk.ok:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{spec.path}: downloaded file does not match the manifest ({'; '.join(chk.problems)}); "
            "it was deleted and NOT installed"
        )
    os.replace(part, target)
    return FetchResult(
        target,
        "downloaded",
        bytes_downloaded=received,
        resumed_from=_size(target) if first_start is None else first_start,
        verified=chk.verified,
        retries=retried,
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _stream(
    url: str, part: Path, start: int, progress: ProgressFn | None, timeout: float, expected: int | None
) -> tuple[int, int]:
    """Append ``url`` from byte ``start`` to ``part``; returns (bytes received, offset resumed from).

    Raises :class:`_Interrupted` when the answer ends (or fails) before the
    whole file is in ``part``: the total the server announced, else ``expected`` (the manifest
    size). What was received stays in ``part``. Errors before any answer propagate as they are.
    """
    with _open(url, start, timeout) as resp:
        status = getattr(resp, "status", 200)
        if start and status != 206:  # the server ignored the Range header (or a file:// URL): start over
            start = 0
        total = _total_from_response(resp, start)
        # a short answer is an interrupted one, also where the server did not say the length
        # (the manifest's size) or says less than the manifest (a mirror still copying the file)
        need = max((n for n in (total, expected) if n is not None), default=None)
        mode = "ab" if start else "wb"
        got = 0
        with part.open(mode) as out:
            if progress:
                progress(start, total if total is not None else expected)
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    msg = f"connection lost at {_human(start + got)}: {exc!r}"
                    raise _Interrupted(msg, got, start) from exc
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
                if progress:
                    progress(start + got, total if total is not None else expected)
    if need is not None and start + got < need:
        raise _Interrupted(f"the answer ended at {_human(start + got)} of {_human(need)}", got, start)
    return got, start


# ----------------------------------------------------------------------------- CLI
class _Bar:
    """A progress bar on stderr (tqdm when it is installed, else a plain line)."""

    def __init__(self, label: str, stream: IO[str], enabled: bool) -> None:
        self.label, self.stream, self.enabled = label, stream, enabled
        self._tqdm: Any = None
        self._last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        if tqdm is not None:
            if self._tqdm is None:
                self._tqdm = tqdm(
                    total=total,
                    initial=done,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,  # decimal, like _human()
                    desc=self.label,
                    file=self.stream,
                    mininterval=0.5,
                    dynamic_ncols=True,
                )
            else:
                self._tqdm.update(done - self._tqdm.n)
            return
        now = time.monotonic()
        if now - self._last > 0.5 or (total is not None and done >= total):
            pct = f"{100 * done / total:5.1f}%" if total else ""
            print(f"\r{self.label}: {_human(done)} {pct}", end="", file=self.stream, flush=True)
            self._last = now

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def _select(args: argparse.Namespace, specs: dict[str, WeightSpec]) -> list[str]:
    names: list[str] = list(getattr(args, "names", []) or [])
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise KeyError(f"unknown weights {', '.join(unknown)}; known: {', '.join(sorted(specs))}")
    if getattr(args, "all", False):
        names += [n for n, s in specs.items() if args.optional or not s.optional]
    for method in getattr(args, "method", None) or []:
        found = names_for_method(method, include_optional=args.optional, specs=specs)
        if not found:
            raise KeyError(f"no weights are listed for method {method!r}")
        names += found
    return list(dict.fromkeys(names))


def _cmd_list(args: argparse.Namespace, specs: dict[str, WeightSpec]) -> int:
    wd = Path(args.dir)
    rows: list[dict[str, Any]] = []
    for name, s in specs.items():
        present = all((wd / p.path).is_file() for p in s.parts())
        digest = (
            "sha256"
            if all(p.sha256 for p in s.parts())
            else "partial"
            if any(p.has_digest for p in s.parts())
            else "none"
        )
        rows.append(
            {
                "name": name,
                "file": s.file,
                "size": s.total_size,
                "present": present,
                "used_by": list(s.used_by),
                "optional": s.optional,
                "licence": s.licence,
                "digest": digest,
                "url": s.url,
            }
        )
    if args.json:
        print(json.dumps({"weights_dir": str(wd), "weights": rows}, indent=2))
        return EXIT_OK
    print(f"weights directory: {wd}")
    for r in rows:
        mark = "present" if r["present"] else "missing"
        opt = " (optional)" if r["optional"] else ""
        print(
            f"  {r['name']:<42} {mark:<8} {_human(r['size']):>12}  {','.join(r['used_by'])}{opt}\n"
            f"      {r['file']}  [{r['licence']}]"
        )
    return EXIT_OK


def _cmd_fetch(args: argparse.Namespace, specs: dict[str, WeightSpec]) -> int:
    names = _select(args, specs)
    if not names:
        print("error: name the weights to fetch, or use --method METHOD or --all", file=sys.stderr)
        return EXIT_USAGE
    wd = Path(args.dir)
    mirrors = list(args.mirror or [])
    if not mirrors and os.environ.get(MIRROR_ENV, "").strip():
        mirrors = [m for m in os.environ[MIRROR_ENV].split(",") if m.strip()]
    failed: list[str] = []
    for name in names:
        for fs in specs[name].parts():
            bar = _Bar(fs.path, sys.stderr, enabled=not args.quiet)
            try:
                res = download_file(
                    with_mirrors(fs, mirrors),
                    wd,
                    progress=bar,
                    timeout=args.timeout,
                    force=args.force,
                    retries=args.retries,
                )
            except NetworkError as exc:
                bar.close()
                print(
                    f"\nerror: no network: cannot reach the server for {name} ({exc}).\n"
                    f"Fetch the weights on a machine with internet access "
                    f"('anomaly-inspect weights fetch {name} --dir weights') and copy that weights "
                    f"directory here ({wd}); in Docker, into the 'weights' volume mounted at /weights. "
                    f"Or fetch from a mirror inside your network: --mirror URL_OR_DIR "
                    f"(or ${MIRROR_ENV}). Partial downloads are kept and resume on the next try.",
                    file=sys.stderr,
                )
                return EXIT_NO_NETWORK
            except FetchError as exc:
                bar.close()
                print(f"\nerror: {name}: {exc}", file=sys.stderr)
                failed.append(name)
                break
            bar.close()
            how = (
                "already present"
                if res.status == "present"
                else f"downloaded {_human(res.bytes_downloaded)}"
                + (f" (resumed at {_human(res.resumed_from)})" if res.resumed_from else "")
                + (f" ({res.retries} retries after dropped connections)" if res.retries else "")
            )
            check = "verified" if res.verified else "size only: no digest published"
            print(f"{name}: {res.path}: {how}, {check}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _service_methods() -> list[str]:
    """The methods the service loads (``$ZSI_METHODS``, comma list; default ``winclip``)."""
    raw = os.environ.get("ZSI_METHODS", "") or "winclip"
    return list(dict.fromkeys(m.strip() for m in raw.split(",") if m.strip()))


def _cmd_verify(args: argparse.Namespace, specs: dict[str, WeightSpec]) -> int:
    """Check the files asked for; exit 0 all match, 1 any mismatch, 4 any missing (none bad).

    Asked for: the names / ``--method`` / ``--all`` given, else the weights of the methods the
    service loads (``$ZSI_METHODS``). Files of other entries are checked too when present (a bad
    one counts), never required.
    """
    wd = Path(args.dir)
    names = _select(args, specs)
    if not (args.names or args.method or args.all):
        methods = _service_methods()
        for method in methods:
            names += [n for n in names_for_method(method, specs=specs) if n not in names]
        print(
            f"checking the weights of ZSI_METHODS={','.join(methods)} (name entries, --method or --all for others)"
        )
    required = set(names)
    others = [n for n in specs if n not in required]
    missing = bad = ok = 0
    skipped = 0
    for name in [*names, *others]:
        for fs in specs[name].parts():
            path = wd / fs.path
            if not path.is_file():
                if name in required:
                    print(f"MISSING   {name}: {path}")
                    missing += 1
                else:
                    skipped += 1
                continue
            chk = check_file(path, fs)
            if not chk.ok:
                print(f"MISMATCH  {name}: {path}: {'; '.join(chk.problems)}")
                bad += 1
            elif chk.verified:
                print(f"OK        {name}: {path} ({', '.join(chk.checked)})")
                ok += 1
            else:
                what = ", ".join(chk.checked) or "nothing"
                print(f"UNCHECKED {name}: {path} (no digest published; checked: {what})")
                ok += 1
    summary = f"{ok} ok, {bad} mismatched, {missing} missing"
    if skipped:
        summary += f" ({skipped} files of entries not asked for are absent: fine)"
    print(summary)
    if bad:
        print("exit 1: a file does not match the manifest: fetch it again (weights fetch NAME --force)")
        return EXIT_FAILED
    if missing:
        print(f"exit {EXIT_MISSING}: files are missing: fetch them (anomaly-inspect weights fetch NAME ...)")
        return EXIT_MISSING
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-inspect weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        default=MANIFEST_PATH,
        help="weights manifest (JSON, schema of models/weights_manifest.json; default: the packaged "
        "one). Put it BEFORE the subcommand: 'weights --manifest my.json fetch ...'",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            type=Path,
            default=default_weights_dir(),
            help="weights directory (default: $ZSI_WEIGHTS_DIR or ./weights)",
        )

    def selection(p: argparse.ArgumentParser) -> None:
        p.add_argument("names", nargs="*", help="manifest names (see 'weights list')")
        p.add_argument(
            "--method",
            action="append",
            choices=list(METHODS),
            help="every file a method uses (repeatable)",
        )
        p.add_argument("--all", action="store_true", help="every entry of the manifest")
        p.add_argument(
            "--optional",
            action="store_true",
            help="with --method/--all: also alternatives (SAM vit_l, vit_b; MuSc's DINOv2 ViT-B/14)",
        )

    p_list = sub.add_parser("list", help="what exists, sizes, licences, present or not")
    common(p_list)
    p_list.add_argument("--json", action="store_true", help="machine-readable output")

    p_fetch = sub.add_parser("fetch", help="download (resumable) and verify")
    common(p_fetch)
    selection(p_fetch)
    p_fetch.add_argument(
        "--mirror",
        action="append",
        metavar="URL_OR_DIR",
        help="base URL (http://mirror.plant.local/weights/) or local folder holding the files under "
        "their manifest paths; tried before the official URLs (repeatable; default: "
        f"${MIRROR_ENV}, comma-separated)",
    )
    p_fetch.add_argument("--force", action="store_true", help="download again even if present and valid")
    p_fetch.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation")
    p_fetch.add_argument(
        "--retries",
        type=int,
        default=RETRIES,
        help=f"retries per URL after a dropped connection, resuming the partial file, with backoff "
        f"{BACKOFF_S:g} s, {2 * BACKOFF_S:g} s, {4 * BACKOFF_S:g} s, ... (default {RETRIES})",
    )
    p_fetch.add_argument("--quiet", action="store_true", help="no progress bar")

    p_verify = sub.add_parser(
        "verify",
        help="check sizes and checksums (default: the weights of $ZSI_METHODS); exit 0 ok, "
        "1 a file is bad, 4 a file is missing",
    )
    common(p_verify)
    selection(p_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    specs = load_manifest(args.manifest)
    try:
        if args.command == "list":
            return _cmd_list(args, specs)
        if args.command == "fetch":
            return _cmd_fetch(args, specs)
        return _cmd_verify(args, specs)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
