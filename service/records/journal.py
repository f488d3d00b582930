"""Local append-only journal: an inspection record is on local disk before its answer leaves.

One journal directory per service process (``ZSI_DATA_DIR/records/journal/w-<id>``),
held with an exclusive ``flock`` on its ``lock`` file while the process lives. It holds
segment files ``seg-00000001.log``, ... of lines::

    <crc32 of the JSON, 8 hex> <one JSON record>\\n

and ``committed``, the position (segment, byte offset) up to which the background
writer has stored the records in the database. Appends are serialised by a lock and
``fsync``-ed with group commit (one fsync covers every line written before it), so
concurrent requests share the cost. A directory whose lock can be taken belongs to a
process that is gone: the writer adopts it, stores what it still holds and removes it.

Replaying a record twice is harmless: the database ignores a record id it already has.
A line cut short by a crash (no newline) was never acknowledged (its ``append`` did
not return) and is skipped; a complete line whose checksum fails is counted as corrupt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("service.records")

SEGMENT_BYTES = 8 * 1024 * 1024


class JournalFull(RuntimeError):
    """The journal holds ``max_bytes`` of records the database has not taken yet."""


@dataclass(frozen=True, order=True)
class Position:
    """A point in a journal: segment number and byte offset in it."""

    segment: int
    offset: int


def encode_line(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The record of a complete line (with its newline); None when the checksum fails."""
    if len(line) < 11 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class Journal:
    """One journal directory: appended to by its owner, read by the record writer.

    Thread-safe. ``max_bytes`` bounds what may wait for the database; an append past it
    raises :class:`JournalFull` (the caller counts the record as dropped).
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = SEGMENT_BYTES,
        adopted: bool = False,
    ) -> None:
        self.dir = directory
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.adopted = adopted
        self._lock = threading.Lock()  # appends, rotation
        self._sync_lock = threading.Lock()  # group commit
        self._state_lock = threading.Lock()  # counters, committed position
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment = 0
        self._offset = 0
        self._synced = Position(0, 0)
        self.committed = self._read_committed()
        self.corrupt = 0
        self.pending_records = 0
        self.pending_bytes = 0

    # ---------------------------------------------------------------- opening
    @classmethod
    def create(cls, root: Path, **kwargs: Any) -> Journal:
        """A new journal directory for this process under ``root``, locked."""
        root.mkdir(parents=True, exist_ok=True)
        j = cls(root / f"w-{uuid.uuid4().hex[:12]}", **kwargs)
        j.dir.mkdir()
        if not j._take_lock():
            raise RuntimeError(f"cannot lock the new journal {j.dir}")
        j._open_segment(1)
        j.committed = Position(1, 0)
        return j

    @classmethod
    def adopt_orphans(cls, root: Path, **kwargs: Any) -> list[Journal]:
        """Journals of processes that are gone (their lock can be taken), locked for this process."""
        found: list[Journal] = []
        if not root.is_dir():
            return found
        for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("w-")):
            j = cls(d, adopted=True, **kwargs)
            if not j._take_lock():
                continue  # a live process owns it
            j._count_pending()
            found.append(j)
        return found

    def _take_lock(self) -> bool:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _seg_path(self, n: int) -> Path:
        return self.dir / f"seg-{n:08d}.log"

    def segments(self) -> list[int]:
        out = []
        for p in self.dir.glob("seg-*.log"):
            with contextlib.suppress(ValueError):
                out.append(int(p.stem[4:]))
        return sorted(out)

    def _open_segment(self, n: int) -> None:
        """Switch appends to segment ``n`` (the old one is fsync-ed first); called under ``_lock``."""
        with self._sync_lock:
            if self._fd is not None:
                if self.fsync:
                    os.fdatasync(self._fd)
                    self._synced = max(self._synced, self.end)
                os.close(self._fd)
            self._fd = os.open(self._seg_path(n), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._segment, self._offset = n, os.fstat(self._fd).st_size
            if self.fsync:
                dfd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)  # the new file's directory entry is durable too
                finally:
                    os.close(dfd)

    def _read_committed(self) -> Position:
        try:
            seg, off = (self.dir / "committed").read_text().split()
            return Position(int(seg), int(off))
        except (OSError, ValueError):
            return Position(0, 0)

    def _count_pending(self) -> None:
        n = size = 0
        for _, line in self._lines(self.committed):
            n += 1
            size += len(line)
        self.pending_records, self.pending_bytes = n, size

    # ----------------------------------------------------------------- append
    @property
    def end(self) -> Position:
        """Position just after the last appended line."""
        return Position(self._segment, self._offset)

    def append(self, record: dict[str, Any], *, others_pending: int = 0) -> Position:
        """Write one record (and fsync it unless ``fsync=False``); returns the position after it.

        ``others_pending``: bytes waiting in other journals (adopted ones), counted in the limit.

        Raises:
            JournalFull: ``max_bytes`` of records already wait for the database.
            OSError: the disk refused the write.
        """
        line = encode_line(record)
        with self._lock:
            if self._fd is None:
                raise RuntimeError(f"the journal {self.dir} is not open for appends")
            with self._state_lock:
                waiting = self.pending_bytes + others_pending
                if waiting + len(line) > self.max_bytes:
                    raise JournalFull(
                        f"the records journal holds {waiting} bytes not yet in the database "
                        f"(limit {self.max_bytes})"
                    )
            if self._offset >= self.segment_bytes:
                self._open_segment(self._segment + 1)
            written = os.write(self._fd, line)
            if written != len(line):  # a short write on a full disk: never leave half a line
                os.ftruncate(self._fd, self._offset)
                raise OSError(f"short write to the records journal ({written} of {len(line)} bytes)")
            self._offset += written
            end = Position(self._segment, self._offset)
            with self._state_lock:
                self.pending_records += 1
                self.pending_bytes += len(line)
        if self.fsync:
            self._sync_to(end)
        return end

    def _sync_to(self, end: Position) -> None:
        """Group commit: one fdatasync covers every line written before it started."""
        with self._sync_lock:  # rotation and close take it too: the fd stays the current segment's
            if self._synced >= end or self._fd is None:
                return  # another thread's fsync (or the rotation's) covered this line
            target = Position(self._segment, self._offset)
            os.fdatasync(self._fd)
            self._synced = max(self._synced, target)

    # ------------------------------------------------------------------- read
    def _lines(self, start: Position) -> Iterator[tuple[Position, bytes]]:
        """Complete lines after ``start``: ``(position after the line, line)``."""
        for seg in self.segments():
            if seg < start.segment:
                continue
            offset = start.offset if seg == start.segment else 0
            try:
                with self._seg_path(seg).open("rb") as f:
                    f.seek(offset)
                    for line in f:
                        if not line.endswith(b"\n"):
                            break  # still being written, or cut short by a crash
                        offset += len(line)
                        yield Position(seg, offset), line
            except FileNotFoundError:
                continue

    def read(self, limit: int) -> tuple[list[dict[str, Any]], Position | None, int]:
        """Up to ``limit`` records after the committed position: ``(records, new position, bytes)``."""
        records: list[dict[str, Any]] = []
        pos: Position | None = None
        size = 0
        for pos_after, line in self._lines(self.committed):
            doc = decode_line(line)
            if doc is None:
                self.corrupt += 1
                log.error("corrupt line in the records journal %s at %s: skipped", self.dir, pos_after)
            else:
                records.append(doc)
            pos = pos_after
            size += len(line)
            if len(records) >= limit:
                break
        return records, pos, size

    def commit(self, pos: Position, records: int, size: int) -> None:
        """The records up to ``pos`` are in the database: remember it, remove finished segments."""
        tmp = self.dir / "committed.tmp"
        tmp.write_text(f"{pos.segment} {pos.offset}\n")
        tmp.replace(self.dir / "committed")
        with self._state_lock:
            self.committed = pos
            self.pending_records = max(0, self.pending_records - records)
            self.pending_bytes = max(0, self.pending_bytes - size)
        for seg in self.segments():
            if seg < pos.segment or (self.adopted and seg == pos.segment and self.drained()):
                self._seg_path(seg).unlink(missing_ok=True)

    def drained(self) -> bool:
        """Nothing left for the database."""
        return next(self._lines(self.committed), None) is None

    # ---------------------------------------------------------------- closing
    def close(self, *, remove_if_drained: bool = False) -> bool:
        """Close (and remove the directory when ``remove_if_drained`` and nothing is left); True if removed."""
        with self._lock, self._sync_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        removed = False
        if remove_if_drained and self.drained():
            shutil.rmtree(self.dir, ignore_errors=True)
            removed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return removed


__all__ = ["Journal", "JournalFull", "Position", "decode_line", "encode_line"]
