"""The recording file format shared by ``trainbus record``, ``replay`` and ``tail --file``.

Why a format of our own rather than msgpack-per-line or JSON: a recording must give back
the *original two frames* byte for byte (so replay republishes exactly what the bus
carried, unknown fields and NaNs included), and it must survive the recorder being
SIGKILLed or the machine losing power mid-write. Length prefixes plus a CRC per record
make a torn tail detectable at any byte offset; a reader stops there, says so, and keeps
everything before it.

Layout (all integers big-endian)::

    header   8 bytes  magic  b"TBREC\\r\\n\\x1a"  (a CR LF and ^Z catch text-mode mangling)
             2 bytes  format version (u16, currently 1)
             2 bytes  flags (u16, 0; readers ignore unknown flags)
    record*  4 bytes  body length N (u32, at most MAX_RECORD_BYTES)
             4 bytes  CRC-32 of the body (zlib.crc32)
             N bytes  body:
                        8 bytes  receive time (f64, recorder's wall clock, UNIX seconds)
                        4 bytes  topic length T (u32)
                        T bytes  topic frame, as received
                        N-12-T   payload frame, as received (msgpack)

A file that ends exactly after a record is complete. Anything else after the last complete
record (a short length prefix, a short body, a CRC mismatch, an absurd length) is a torn
tail: readers ignore it and report it; the writer cuts it off before appending again.

Rotation: a recording is the file ``F`` plus continuation segments ``F.1``, ``F.2``, ...
in chronological order. Each segment has its own header, so every one is readable alone;
:func:`iter_recording` on ``F`` reads ``F`` and then each ``F.<n>`` that exists. Segments
are never renamed: a crash during rotation cannot leave the set half-renamed, and
``tail --file`` / ``replay`` on the base name always get the whole run in order.

Durability: the writer buffers in memory and writes to the kernel at least every
``flush_interval`` (100 ms) or ``flush_records`` records, so a SIGKILLed recorder loses at
most that much; it fsyncs at most once per ``fsync_interval`` (1 s), so an OS crash or power
loss loses about a second, and the fsync cost never lands on every event.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"TBREC\r\n\x1a"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sHH")
HEADER_SIZE = _HEADER.size  # 12
_PREFIX = struct.Struct(">II")  # body length, crc32
_BODY_HEAD = struct.Struct(">dI")  # receive time, topic length
#: Larger than any frame pair the bus forwards (1 MiB by default) with room to spare; a
#: bigger length prefix can only be garbage, so the reader stops instead of allocating it.
MAX_RECORD_BYTES = 64 << 20

DEFAULT_FLUSH_INTERVAL_S = 0.1
DEFAULT_FLUSH_RECORDS = 512
DEFAULT_FSYNC_INTERVAL_S = 1.0


class RecordingError(ValueError):
    """A file that is not a trainbus recording (bad magic or unsupported version)."""


def encode_record(recv_time: float, frames: list[bytes] | tuple[bytes, ...]) -> bytes:
    """One record (length prefix, CRC, body) for a received two-frame message."""
    if len(frames) != 2:
        raise ValueError(f"a recording holds two-frame messages, got {len(frames)} frames")
    topic, payload = bytes(frames[0]), bytes(frames[1])
    body = _BODY_HEAD.pack(recv_time, len(topic)) + topic + payload
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"message of {len(body)} bytes exceeds the recording limit")
    return _PREFIX.pack(len(body), zlib.crc32(body)) + body


def header_bytes() -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0)


def segment_paths(path: str | Path) -> list[Path]:
    """``F`` and its existing continuation segments ``F.1``, ``F.2``, ... in order.

    Numbering is contiguous from 1; a missing number ends the set (a stray ``F.7`` after a
    gap is not silently spliced into the run).
    """
    base = Path(path)
    paths = [base]
    n = 1
    while True:
        candidate = base.with_name(f"{base.name}.{n}")
        if not candidate.exists():
            return paths
        paths.append(candidate)
        n += 1


# --------------------------------------------------------------------------- reading


@dataclass
class ReadResult:
    """What reading one segment found: how far it is valid and why reading stopped."""

    path: Path
    records: int = 0
    valid_bytes: int = 0
    file_bytes: int = 0
    problem: str | None = None  # None: the segment ended cleanly after a record

    @property
    def truncated_bytes(self) -> int:
        return self.file_bytes - self.valid_bytes


class RecordingReader:
    """Iterates ``(recv_time, [topic, payload])`` over one segment file.

    After (or during) iteration, ``result`` says how many records were read and whether a
    torn or corrupt tail was ignored. Reading a file that a live recorder is appending to is
    safe: the not-yet-complete last record simply looks like a torn tail.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.result = ReadResult(self.path)

    def __iter__(self) -> Iterator[tuple[float, list[bytes]]]:
        result = self.result
        with open(self.path, "rb") as f:
            result.file_bytes = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                # An empty or header-torn file is what a recorder killed at birth leaves.
                if head and not MAGIC.startswith(head[: len(MAGIC)]):
                    raise RecordingError(f"{self.path} is not a trainbus recording")
                result.problem = "truncated header" if head else "empty file"
                return
            magic, version, _flags = _HEADER.unpack(head)
            if magic != MAGIC:
                raise RecordingError(f"{self.path} is not a trainbus recording")
            if version != FORMAT_VERSION:
                raise RecordingError(f"{self.path} is recording format v{version}; "
                                     f"this trainbus reads v{FORMAT_VERSION}")
            offset = HEADER_SIZE
            result.valid_bytes = offset
            while True:
                prefix = f.read(_PREFIX.size)
                if not prefix:
                    return
                if len(prefix) < _PREFIX.size:
                    result.problem = f"truncated record header at byte {offset}"
                    return
                length, crc = _PREFIX.unpack(prefix)
                if length < _BODY_HEAD.size or length > MAX_RECORD_BYTES:
                    result.problem = f"bad record length {length} at byte {offset}"
                    return
                body = f.read(length)
                if len(body) < length:
                    result.problem = f"truncated record at byte {offset}"
                    return
                if zlib.crc32(body) != crc:
                    result.problem = f"CRC mismatch at byte {offset}"
                    return
                recv_time, topic_len = _BODY_HEAD.unpack_from(body)
                if _BODY_HEAD.size + topic_len > length:
                    result.problem = f"bad topic length at byte {offset}"
                    return
                split = _BODY_HEAD.size + topic_len
                offset += _PREFIX.size + length
                result.valid_bytes = offset
                result.records += 1
                yield recv_time, [body[_BODY_HEAD.size:split], body[split:]]


def iter_recording(path: str | Path, results: list[ReadResult] | None = None,
                   ) -> Iterator[tuple[float, list[bytes]]]:
    """Every ``(recv_time, [topic, payload])`` of a recording, oldest first.

    Reads ``path`` and then its continuation segments (``path.1``, ``path.2``, ...). A torn
    or corrupt tail of a segment is skipped with a warning (that is what a crashed recorder
    leaves, and the records before it are intact); pass ``results`` to get one
    :class:`ReadResult` per segment for your own reporting. Raises FileNotFoundError for a
    missing ``path`` and :class:`RecordingError` for a file that is not a recording.
    """
    for segment in segment_paths(path):
        reader = RecordingReader(segment)
        if results is not None:
            results.append(reader.result)
        yield from reader
        res = reader.result
        if res.problem is not None and res.problem != "empty file":
            log.warning("%s: %s; ignored the last %d bytes (%d complete records before it)",
                        segment, res.problem, res.truncated_bytes, res.records)


def scan(path: str | Path) -> ReadResult:
    """Validate one segment without keeping its records (the writer's repair step)."""
    reader = RecordingReader(path)
    for _ in reader:
        pass
    return reader.result


# --------------------------------------------------------------------------- writing


class RecordingWriter:
    """Appends records to a recording, crash-safe and cheap per event.

    Opening an existing recording continues it: the newest segment is scanned, a torn tail
    (left by a crash) is cut off, and new records follow the last complete one. Call
    :meth:`tick` regularly (the record loop does, on every poll) so that the flush timer
    runs even when no events arrive; :meth:`close` flushes and fsyncs.
    """

    def __init__(self, path: str | Path, *, rotate_bytes: int | None = None,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
                 flush_records: int = DEFAULT_FLUSH_RECORDS,
                 fsync_interval: float = DEFAULT_FSYNC_INTERVAL_S) -> None:
        self.base = Path(path)
        self.rotate_bytes = rotate_bytes
        self.flush_interval = flush_interval
        self.flush_records = flush_records
        self.fsync_interval = fsync_interval
        self.records_written = 0
        self.repaired_bytes = 0
        self._buffer = bytearray()
        self._buffered_records = 0
        self._fd = -1
        self._size = 0
        self._dirty = False  # written to the kernel since the last fsync
        now = time.monotonic()
        self._last_flush = now
        self._last_fsync = now
        segments = segment_paths(self.base)
        self._segment = len(segments) - 1
        self._open(segments[-1])

    @property
    def path(self) -> Path:
        """The segment currently written."""
        return self._segment_path(self._segment)

    def _segment_path(self, n: int) -> Path:
        return self.base if n == 0 else self.base.with_name(f"{self.base.name}.{n}")

    def _open(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                # Two recorders appending to one file would interleave torn records.
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RecordingError(f"{path} is being written by another recorder") from None
            size = os.fstat(fd).st_size
            if size == 0:
                os.write(fd, header_bytes())
                size = HEADER_SIZE
                self._dirty = True
            else:
                result = scan(path)  # raises RecordingError on a foreign file: never clobber it
                if result.valid_bytes < HEADER_SIZE:
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.write(fd, header_bytes())
                    size = HEADER_SIZE
                    self.repaired_bytes += result.file_bytes
                    self._dirty = True
                elif result.valid_bytes < size:
                    log.warning("%s: %s; cut off %d bytes before appending", path,
                                result.problem, size - result.valid_bytes)
                    self.repaired_bytes += size - result.valid_bytes
                    os.ftruncate(fd, result.valid_bytes)
                    size = result.valid_bytes
                    self._dirty = True
            os.lseek(fd, size, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size

    def write(self, recv_time: float, frames: list[bytes] | tuple[bytes, ...]) -> None:
        """Buffer one received message; flushes when the buffer is due."""
        record = encode_record(recv_time, frames)
        if (self.rotate_bytes is not None and self._size + len(self._buffer) > HEADER_SIZE
                and self._size + len(self._buffer) + len(record) > self.rotate_bytes):
            self._rotate()
        self._buffer += record
        self._buffered_records += 1
        self.records_written += 1
        if self._buffered_records >= self.flush_records:
            self.flush()
        else:
            self.tick()

    def tick(self, now: float | None = None) -> None:
        """Run the flush/fsync timers; cheap when nothing is due."""
        now = time.monotonic() if now is None else now
        if self._buffer and now - self._last_flush >= self.flush_interval:
            self.flush(now)
        if self._dirty and now - self._last_fsync >= self.fsync_interval:
            self.sync(now)

    def flush(self, now: float | None = None) -> None:
        """Hand the buffer to the kernel (survives a killed process, not a power cut)."""
        if self._buffer:
            data, self._buffer = self._buffer, bytearray()
            self._buffered_records = 0
            done = 0
            try:
                with memoryview(data) as view:
                    while done < len(data):
                        done += os.write(self._fd, view[done:])
            except OSError:
                # Disk full or similar: cut the torn record off so the file stays
                # appendable and readable to the end, then let the caller see the error.
                try:
                    os.ftruncate(self._fd, self._size)
                    os.lseek(self._fd, self._size, os.SEEK_SET)
                except OSError:
                    pass
                raise
            self._size += len(data)
            self._dirty = True
        self._last_flush = time.monotonic() if now is None else now

    def sync(self, now: float | None = None) -> None:
        """fsync (survives a power cut); the timers call it at most once per interval."""
        self.flush(now)
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_fsync = time.monotonic() if now is None else now

    def _rotate(self) -> None:
        self.sync()
        os.close(self._fd)
        self._fd = -1
        self._segment += 1
        path = self._segment_path(self._segment)
        log.info("rotating recording to %s", path)
        self._open(path)

    def close(self) -> None:
        """Final flush and fsync; idempotent."""
        if self._fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SEGMENT_SUFFIX = re.compile(r"\.\d+$")


def looks_like_segment(path: str | Path) -> bool:
    """True for ``F.<n>`` names, so tools can hint that ``F`` reads the whole recording."""
    return bool(_SEGMENT_SUFFIX.search(str(path)))
