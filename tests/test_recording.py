"""Recording format: torn tails at every byte offset, CRC, rotation, and a SIGKILLed recorder."""

from __future__ import annotations

import math
import signal
import struct
from pathlib import Path

import pytest

from bus import protocol
from bus.recording import (
    HEADER_SIZE,
    RecordingError,
    RecordingReader,
    RecordingWriter,
    iter_recording,
    segment_paths,
)
from emitter.telemetry import TelemetryEmitter
from tests.conftest import ppo_fields, ppo_payload, trainbus_cmd, wait_for


def _frames(seq: int, **overrides: object) -> list[bytes]:
    return protocol.encode(ppo_payload(seq=seq, update=seq, **overrides))


def _records(path: Path) -> list[tuple[float, list[bytes]]]:
    return list(iter_recording(path))


def test_round_trip_keeps_frames_and_times_exactly(tmp_path):
    path = tmp_path / "rec"
    written = [(1000.0 + i * 0.25, _frames(i, grad_norm=math.nan if i == 2 else 1.0, extra="x"))
               for i in range(5)]
    with RecordingWriter(path) as writer:
        for recv_time, frames in written:
            writer.write(recv_time, frames)
    assert _records(path) == written
    assert math.isnan(protocol.decode(_records(path)[2][1]).fields["grad_norm"])


def test_truncation_at_every_offset_of_last_record_keeps_earlier_records(tmp_path):
    path = tmp_path / "rec"
    written = [(float(i), _frames(i)) for i in range(4)]
    with RecordingWriter(path) as writer:
        for recv_time, frames in written:
            writer.write(recv_time, frames)
    data = path.read_bytes()
    last_start = len(data) - (8 + 12 + len(written[-1][1][0]) + len(written[-1][1][1]))
    cut_path = tmp_path / "cut"
    for cut in range(last_start, len(data) + 1):
        cut_path.write_bytes(data[:cut])
        reader = RecordingReader(cut_path)
        got = list(reader)
        if cut == len(data):
            assert got == written and reader.result.problem is None
        elif cut == last_start:
            assert got == written[:3] and reader.result.problem is None  # ends on a boundary
        else:
            assert got == written[:3], f"cut at {cut}"
            assert reader.result.problem is not None
            assert reader.result.truncated_bytes == cut - last_start
    # The header itself torn: no records, no exception.
    for cut in range(HEADER_SIZE):
        cut_path.write_bytes(data[:cut])
        assert list(RecordingReader(cut_path)) == []


def test_writer_cuts_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / "rec"
    with RecordingWriter(path) as writer:
        for i in range(3):
            writer.write(float(i), _frames(i))
    full = path.read_bytes()
    path.write_bytes(full[:-7])  # a crash in the middle of the last record
    with RecordingWriter(path) as writer:
        assert writer.repaired_bytes > 0
        writer.write(9.0, _frames(9))
    got = _records(path)
    assert [t for t, _ in got] == [0.0, 1.0, 9.0]


def test_corrupt_record_is_detected_by_crc(tmp_path):
    path = tmp_path / "rec"
    with RecordingWriter(path) as writer:
        for i in range(3):
            writer.write(float(i), _frames(i))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = RecordingReader(path)
    assert len(list(reader)) == 2
    assert "CRC" in (reader.result.problem or "")
    # An absurd length prefix (garbage after a power cut) stops reading, no huge allocation.
    path.write_bytes(bytes(data[:HEADER_SIZE]) + struct.pack(">II", 0xFFFFFFFF, 0) + b"junk")
    reader = RecordingReader(path)
    assert list(reader) == [] and "length" in (reader.result.problem or "")


def test_not_a_recording_is_refused_and_never_clobbered(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, these are my notes\n")
    with pytest.raises(RecordingError):
        list(iter_recording(path))
    with pytest.raises(RecordingError):
        RecordingWriter(path)
    assert path.read_text() == "hello, these are my notes\n"


def test_rotation_writes_ordered_self_contained_segments(tmp_path):
    path = tmp_path / "rec"
    record_size = len(_frames(0)[0]) + len(_frames(0)[1]) + 20
    with RecordingWriter(path, rotate_bytes=HEADER_SIZE + 3 * record_size + 1) as writer:
        for i in range(10):
            writer.write(float(i), _frames(i))
    segments = segment_paths(path)
    assert [p.name for p in segments] == ["rec", "rec.1", "rec.2", "rec.3"]
    assert [len(list(RecordingReader(p))) for p in segments] == [3, 3, 3, 1]
    assert [t for t, _ in _records(path)] == [float(i) for i in range(10)]
    # Reopening continues in the newest segment.
    with RecordingWriter(path, rotate_bytes=HEADER_SIZE + 3 * record_size + 1) as writer:
        assert writer.path.name == "rec.3"
        writer.write(10.0, _frames(10))
    assert [t for t, _ in _records(path)][-2:] == [9.0, 10.0]


def test_flush_timer_hands_records_to_the_kernel_without_close(tmp_path):
    path = tmp_path / "rec"
    writer = RecordingWriter(path, flush_interval=0.1, flush_records=1000)
    try:
        writer.write(1.0, _frames(0))
        writer.flush()  # start a fresh flush interval
        writer.write(2.0, _frames(1))
        assert len(_records(path)) == 1  # buffered, not yet due
        writer.tick(now=writer._last_flush + 0.11)
        assert len(_records(path)) == 2  # visible to a reader (and to a SIGKILL) now
    finally:
        writer.close()


def test_sigkilled_recorder_leaves_a_readable_file(daemon, procs, tmp_path):
    path = tmp_path / "rec"
    recorder = procs.start(trainbus_cmd("record", "--out", str(path), "--type", "ppo_update"),
                           env=daemon.env)
    recorder.stdout.wait_for_line("connected", 10)
    blob = "x" * 2000  # bigger records: more bytes in flight when the kill lands
    with TelemetryEmitter("kill", 0, daemon.publish, heartbeat_interval=None) as emitter:
        assert emitter.wait_for_bus(10)
        update = 0

        def recorded_enough() -> bool:
            nonlocal update
            for _ in range(50):
                emitter.emit_ppo_update(**ppo_fields(update), blob=blob)
                update += 1
            return path.exists() and len(_records(path)) >= 200

        wait_for(recorded_enough, 15, message="the recorder to write 200 events")
        for _ in range(200):  # keep it busy writing while it dies
            emitter.emit_ppo_update(**ppo_fields(update), blob=blob)
            update += 1
        recorder.signal(signal.SIGKILL)
        assert recorder.wait(5) == -signal.SIGKILL
    updates = [protocol.decode(frames).fields["update"] for _, frames in _records(path)]
    assert len(updates) >= 200
    assert updates == list(range(updates[0], updates[0] + len(updates)))


def test_record_exits_cleanly_on_sigterm_with_everything_flushed(daemon, procs, tmp_path):
    path = tmp_path / "rec"
    recorder = procs.start(trainbus_cmd("record", "--out", str(path), "--run", "term"),
                           env=daemon.env)
    recorder.stdout.wait_for_line("connected", 10)
    with TelemetryEmitter("term", 0, daemon.publish, heartbeat_interval=None) as emitter:
        assert emitter.wait_for_bus(10)
        for update in range(5):
            emitter.emit_ppo_update(**ppo_fields(update))
        wait_for(lambda: path.exists() and len(_records(path)) == 5, 10, message="5 records")
    recorder.signal(signal.SIGTERM)
    assert recorder.wait(5) == 0
    assert "5 events recorded" in recorder.stdout.text()
    reader = RecordingReader(path)
    assert len(list(reader)) == 5 and reader.result.problem is None


def test_second_writer_on_the_same_file_is_refused(tmp_path):
    path = tmp_path / "rec"
    with RecordingWriter(path) as writer:
        writer.write(1.0, _frames(0))
        with pytest.raises(RecordingError, match="another recorder"):
            RecordingWriter(path)
    with RecordingWriter(path) as writer:  # free again once the first one closed
        writer.write(2.0, _frames(1))
    assert len(_records(path)) == 2
