"""``anomaly-inspect weights``: list, fetch and verify the official checkpoints.

    anomaly-inspect weights list [--dir DIR] [--json]
    anomaly-inspect weights fetch NAME... [--dir DIR] [--method METHOD] [--all] [--optional]
    anomaly-inspect weights verify [NAME...] [--dir DIR]

(also ``python -m service.fetch ...``). Files come from the URLs in
``models/weights_manifest.json`` into the weights directory (``--dir``, default
``$ZSI_WEIGHTS_DIR`` or ``./weights``), under the manifest's relative paths.

A download goes to ``<file>.part`` and is resumed from there with an HTTP Range
request the next time; it is checked against the manifest's size and digests
and moved into place only when it matches. A file that does not match is
refused and deleted. Without a network the command says so and exits with 3.

Exit codes: 0 done; 1 a file failed (HTTP error, checksum mismatch); 2 bad
usage (unknown name); 3 no network (the host could not be reached).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
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

USER_AGENT = "zeroshot-inspect-weights/0.1"
CHUNK = 1 << 16
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_NETWORK = 0, 1, 2, 3

#: ``progress(done_bytes, total_bytes_or_None)``, called as data arrives
ProgressFn = Callable[[int, int | None], None]


class FetchError(RuntimeError):
    """A file could not be fetched (HTTP error, bad server answer)."""


class NetworkError(FetchError):
    """No connection to the host at all: no network, DNS failure, refused, timed out."""


class ChecksumError(FetchError):
    """The downloaded file does not match the manifest; it was deleted, not installed."""


@dataclass(frozen=True)
class FetchResult:
    path: Path
    status: str  # "downloaded" | "present"
    bytes_downloaded: int = 0
    resumed_from: int = 0
    verified: bool = False


def default_weights_dir() -> Path:
    return Path(os.environ.get("ZSI_WEIGHTS_DIR", "weights"))


def _human(n: int | None) -> str:
    if n is None:
        return "size unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _network_reason(exc: BaseException) -> str | None:
    """A sentence when ``exc`` means the host could not be reached at all, else None."""
    reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
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
) -> FetchResult:
    """Fetch one file into ``weights_dir / spec.path``, resuming ``.part`` files, then verify it.

    Raises:
        NetworkError: no host of ``spec.urls`` could be reached.
        FetchError: an HTTP error from every URL.
        ChecksumError: the file does not match the manifest (the partial file is deleted).
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

    errors: list[str] = []
    network_errors: list[str] = []
    for url in spec.urls:
        start = part.stat().st_size if part.exists() else 0
        try:
            got = 0
            if spec.size is None or start < spec.size:
                got, start = _stream(url, part, start, progress, timeout)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start:  # range not satisfiable: the partial file may be complete
                got = 0
                break
            errors.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except (urllib.error.URLError, OSError) as exc:
            why = _network_reason(exc)
            if why is None:
                errors.append(f"{url}: {exc}")
            else:
                network_errors.append(f"{url}: {why}")
    else:
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
    return FetchResult(target, "downloaded", bytes_downloaded=got, resumed_from=start, verified=chk.verified)


def _stream(url: str, part: Path, start: int, progress: ProgressFn | None, timeout: float) -> tuple[int, int]:
    """Append ``url`` from byte ``start`` to ``part``; returns (bytes received, offset resumed from)."""
    with _open(url, start, timeout) as resp:
        status = getattr(resp, "status", 200)
        if start and status != 206:  # the server ignored the Range header: start over
            start = 0
        total = _total_from_response(resp, start)
        mode = "ab" if start else "wb"
        got = 0
        with part.open(mode) as out:
            if progress:
                progress(start, total)
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                got += len(chunk)
                if progress:
                    progress(start + got, total)
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
                    unit_divisor=1024,
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
    failed: list[str] = []
    for name in names:
        for fs in specs[name].parts():
            bar = _Bar(fs.path, sys.stderr, enabled=not args.quiet)
            try:
                res = download_file(fs, wd, progress=bar, timeout=args.timeout, force=args.force)
            except NetworkError as exc:
                bar.close()
                print(
                    f"\nerror: no network: cannot reach the server for {name} ({exc}).\n"
                    f"Fetch the weights on a machine with internet access "
                    f"('anomaly-inspect weights fetch {name} --dir weights') and copy that weights "
                    f"directory here ({wd}); in Docker, into the 'weights' volume mounted at /weights. "
                    f"Partial downloads are kept and resume on the next try.",
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
            )
            check = "verified" if res.verified else "size only: no digest published"
            print(f"{name}: {res.path}: {how}, {check}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, specs: dict[str, WeightSpec]) -> int:
    wd = Path(args.dir)
    names = _select(args, specs) or list(specs)
    explicit = bool(args.names or args.method or args.all)
    bad = 0
    for name in names:
        for fs in specs[name].parts():
            path = wd / fs.path
            if not path.is_file():
                print(f"MISSING   {name}: {path}")
                bad += explicit
                continue
            chk = check_file(path, fs)
            if not chk.ok:
                print(f"MISMATCH  {name}: {path}: {'; '.join(chk.problems)}")
                bad += 1
            elif chk.verified:
                print(f"OK        {name}: {path} ({', '.join(chk.checked)})")
            else:
                what = ", ".join(chk.checked) or "nothing"
                print(f"UNCHECKED {name}: {path} (no digest published; checked: {what})")
    return EXIT_FAILED if bad else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-inspect weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--manifest", type=Path, default=MANIFEST_PATH, help=argparse.SUPPRESS)
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
            choices=["winclip", "anomalyclip", "saa_plus"],
            help="every file a method uses (repeatable)",
        )
        p.add_argument("--all", action="store_true", help="every entry of the manifest")
        p.add_argument(
            "--optional",
            action="store_true",
            help="with --method/--all: also alternatives (SAM vit_l, vit_b)",
        )

    p_list = sub.add_parser("list", help="what exists, sizes, licences, present or not")
    common(p_list)
    p_list.add_argument("--json", action="store_true", help="machine-readable output")

    p_fetch = sub.add_parser("fetch", help="download (resumable) and verify")
    common(p_fetch)
    selection(p_fetch)
    p_fetch.add_argument("--force", action="store_true", help="download again even if present and valid")
    p_fetch.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation")
    p_fetch.add_argument("--quiet", action="store_true", help="no progress bar")

    p_verify = sub.add_parser("verify", help="check sizes and checksums of the files present")
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
