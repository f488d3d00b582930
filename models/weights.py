"""Weights manifest: which official checkpoint files exist, where they live, how to get them.

The manifest is data (``weights_manifest.json``). The service reads weights only
from one weights directory; this module maps manifest names to paths there, says
which are missing, and checks files against the published sizes and digests.
Downloading is ``service/fetch.py`` (``anomaly-inspect weights fetch``).

An entry is one file, or a directory (``is_dir``) of several files each with its
own URL (``bert-base-uncased``). Either way :meth:`WeightSpec.parts` lists the
files to fetch and check, with paths relative to the weights directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

MANIFEST_PATH = Path(__file__).resolve().parent / "weights_manifest.json"
FETCH_COMMAND = "anomaly-inspect weights fetch"
PARTIAL_SUFFIX = ".part"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileSpec:
    """One downloadable file: ``path`` relative to the weights directory, URL(s), what is known of it.

    Digests that are ``None`` are not published; the file is checked only for the others.
    """

    path: str
    url: str
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    md5: str | None = None
    git_blob_sha1: str | None = None
    mirrors: tuple[str, ...] = ()

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url, *self.mirrors)

    @property
    def has_digest(self) -> bool:
        return any((self.sha256, self.sha256_prefix, self.md5, self.git_blob_sha1))


@dataclass(frozen=True)
class WeightSpec:
    name: str
    file: str
    url: str
    licence: str
    used_by: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    is_dir: bool = False
    md5: str | None = None
    git_blob_sha1: str | None = None
    mirrors: tuple[str, ...] = ()
    #: for ``is_dir`` entries: the files inside the directory (paths relative to the weights dir)
    files: tuple[FileSpec, ...] = ()
    #: an alternative the default configuration does not need (e.g. SAM vit_l / vit_b)
    optional: bool = False
    source: str = ""
    sha256_source: str = ""

    def parts(self) -> tuple[FileSpec, ...]:
        """The files that make up this entry."""
        if self.is_dir:
            return self.files
        return (
            FileSpec(
                path=self.file,
                url=self.url,
                size=self.size,
                sha256=self.sha256,
                sha256_prefix=self.sha256_prefix,
                md5=self.md5,
                git_blob_sha1=self.git_blob_sha1,
                mirrors=self.mirrors,
            ),
        )

    @property
    def total_size(self) -> int | None:
        """Sum of the part sizes, ``None`` when any is unknown."""
        sizes = [p.size for p in self.parts()]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)


def _opt_str(e: Mapping[str, Any], key: str) -> str | None:
    v = e.get(key)
    return None if v in (None, "") else str(v).lower()


def _file_spec(path: str, e: Mapping[str, Any]) -> FileSpec:
    return FileSpec(
        path=path,
        url=str(e["url"]),
        size=None if e.get("size") is None else int(e["size"]),
        sha256=_opt_str(e, "sha256"),
        sha256_prefix=_opt_str(e, "sha256_prefix"),
        md5=_opt_str(e, "md5"),
        git_blob_sha1=_opt_str(e, "git_blob_sha1"),
        mirrors=tuple(e.get("mirrors", ())),
    )


def load_manifest(path: str | Path) -> dict[str, WeightSpec]:
    """Read a manifest file (same schema as ``weights_manifest.json``); not cached."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    out: dict[str, WeightSpec] = {}
    for name, e in doc["weights"].items():
        is_dir = bool(e.get("is_dir", False))
        files: tuple[FileSpec, ...] = ()
        if is_dir:
            if not e.get("files"):
                raise ValueError(f"manifest entry {name!r} is a directory but lists no files")
            files = tuple(_file_spec(f"{e['file']}/{rel}", fe) for rel, fe in e["files"].items())
        single = _file_spec(e["file"], e)
        out[name] = WeightSpec(
            name=name,
            file=e["file"],
            url=e["url"],
            licence=e.get("licence", ""),
            used_by=tuple(e.get("used_by", ())),
            size=single.size,
            sha256=single.sha256,
            sha256_prefix=single.sha256_prefix,
            is_dir=is_dir,
            md5=single.md5,
            git_blob_sha1=single.git_blob_sha1,
            mirrors=single.mirrors,
            files=files,
            optional=bool(e.get("optional", False)),
            source=e.get("source", ""),
            sha256_source=e.get("sha256_source", ""),
        )
    return out


@lru_cache(maxsize=1)
def manifest() -> dict[str, WeightSpec]:
    return load_manifest(MANIFEST_PATH)


def weights_path(name: str, weights_dir: str | Path) -> Path:
    try:
        spec = manifest()[name]
    except KeyError:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(sorted(manifest()))}") from None
    return Path(weights_dir) / spec.file


def cli_command() -> str:
    """How to call the ``anomaly-inspect`` command from here.

    ``anomaly-inspect`` when it is on PATH (a container, an activated virtualenv); else the
    script beside this Python (``.venv/bin/anomaly-inspect`` of a checkout), so that a
    hint can be pasted as it is.
    """
    if shutil.which("anomaly-inspect"):
        return "anomaly-inspect"
    beside = Path(sys.executable).with_name("anomaly-inspect")
    return str(beside) if beside.is_file() else "anomaly-inspect"


def fetch_hint(names: list[str] | tuple[str, ...], weights_dir: str | Path) -> str:
    """The exact command that downloads ``names`` into ``weights_dir``."""
    command = FETCH_COMMAND.replace("anomaly-inspect", cli_command(), 1)
    return f"{command} {' '.join(names)} --dir {weights_dir}"


def _present(spec: WeightSpec, weights_dir: Path) -> bool:
    return all((weights_dir / p.path).is_file() for p in spec.parts())


def missing_weights(names: list[str] | tuple[str, ...], weights_dir: str | Path) -> list[str]:
    """Names whose file (or, for a directory entry, any of its files) is not in ``weights_dir``."""
    specs = manifest()
    out = []
    for n in names:
        if n not in specs:
            weights_path(n, weights_dir)  # raises the helpful KeyError
        if not _present(specs[n], Path(weights_dir)):
            out.append(n)
    return out


def names_for_method(
    method: str, *, include_optional: bool = False, specs: Mapping[str, WeightSpec] | None = None
) -> list[str]:
    """Manifest names a method uses (``used_by``); alternatives only with ``include_optional``."""
    specs = manifest() if specs is None else specs
    return [n for n, s in specs.items() if method in s.used_by and (include_optional or not s.optional)]


def weights_status(names: Iterable[str], weights_dir: str | Path) -> list[dict[str, Any]]:
    """Presence of each named entry, for ``/ready`` and ``weights list`` (no hashing: cheap).

    Each item: ``name``, ``path``, ``present``, ``size`` (expected bytes or None), ``licence``.
    """
    wd = Path(weights_dir)
    specs = manifest()
    out = []
    for n in names:
        s = specs[n]
        out.append(
            {
                "name": n,
                "path": str(wd / s.file),
                "present": _present(s, wd),
                "size": s.total_size,
                "licence": s.licence,
            }
        )
    return out


# ------------------------------------------------------------------ verification
@dataclass(frozen=True)
class FileCheck:
    """Result of checking one file against its :class:`FileSpec`."""

    path: str
    ok: bool
    problems: tuple[str, ...] = ()
    checked: tuple[str, ...] = field(default_factory=tuple)  # which properties were checked

    @property
    def verified(self) -> bool:
        """Ok AND at least one digest was checked (size alone is not a verification)."""
        return self.ok and any(c != "size" for c in self.checked)


def file_digests(path: str | Path) -> dict[str, str]:
    """SHA-256, MD5 and git blob SHA-1 of a file, in one read."""
    p = Path(path)
    size = p.stat().st_size
    sha256, md5, git = (
        hashlib.sha256(),
        hashlib.md5(usedforsecurity=False),
        hashlib.sha1(usedforsecurity=False),
    )
    git.update(f"blob {size}\0".encode())
    with p.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
            git.update(chunk)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest(), "git_blob_sha1": git.hexdigest()}


def check_file(path: str | Path, spec: FileSpec) -> FileCheck:
    """Check the file at ``path`` against the size and every digest the spec knows."""
    p = Path(path)
    if not p.is_file():
        return FileCheck(spec.path, False, ("missing",))
    problems: list[str] = []
    checked: list[str] = []
    size = p.stat().st_size
    if spec.size is not None:
        checked.append("size")
        if size != spec.size:
            problems.append(f"size {size} bytes, expected {spec.size}")
    if spec.has_digest and not problems:
        got = file_digests(p)
        if spec.sha256:
            checked.append("sha256")
            if got["sha256"] != spec.sha256:
                problems.append(f"sha256 {got['sha256']}, expected {spec.sha256}")
        if spec.sha256_prefix:
            checked.append("sha256_prefix")
            if not got["sha256"].startswith(spec.sha256_prefix):
                problems.append(f"sha256 {got['sha256']} does not start with {spec.sha256_prefix}")
        if spec.md5:
            checked.append("md5")
            if got["md5"] != spec.md5:
                problems.append(f"md5 {got['md5']}, expected {spec.md5}")
        if spec.git_blob_sha1:
            checked.append("git_blob_sha1")
            if got["git_blob_sha1"] != spec.git_blob_sha1:
                problems.append(f"git blob sha1 {got['git_blob_sha1']}, expected {spec.git_blob_sha1}")
    return FileCheck(spec.path, not problems, tuple(problems), tuple(checked))
