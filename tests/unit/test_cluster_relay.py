"""Cluster mode's read side: the codec between payloads and broker records, the relay that
turns a job's broker log into the events a client sees (attempt fencing, whole images only,
first image per index, first terminal ends), and RemoteJobStream's numbering, which every
replica must agree on for `after_sequence` resumes to work."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from server.domain.generation_events import (
    TERMINAL,
    Cancelled,
    Completed,
    Failed,
    GenerationEvent,
    ImageChunk,
    ImageComplete,
    Payload,
    Preview,
    Progress,
    Queued,
    Started,
    Timings,
    image_chunks,
)
from server.domain.generation_job import GenerationJob, ResolvedLora
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.broker.codec import (
    Who,
    decode_job,
    encode_job,
    recorded_images,
    to_payload,
    to_record,
)
from server.infrastructure.broker.port import STATE_KINDS, EventRecord
from server.infrastructure.broker.relay import Relay
from server.infrastructure.broker.replica import RemoteJobStream
from tests.unit.fake_broker import FakeBroker

GID = "0b9c6a4e-2f43-4d3e-9a53-6f2d8c1e7a10"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rec(attempt: int, payload: Payload, **meta: object) -> EventRecord:
    record = to_record(GID, attempt, payload)
    record.meta.update(meta)
    return record


def whole_image(
    attempt: int, index: int, data: bytes, piece: int = 64, chunk_size: int | None = None
) -> list[EventRecord]:
    """An image as a worker publishes it: its chunks, then its checksum record."""
    extra = {} if chunk_size is None else {"chunk_size": chunk_size}
    complete = ImageComplete(index, sha(data), len(data), "image/png", 100 + index)
    return [
        *(rec(attempt, c) for c in image_chunks(index, data, piece)),
        rec(attempt, complete, **extra),
    ]


def run(log: list[EventRecord], relay: Relay | None = None) -> list[Payload]:
    relay = relay if relay is not None else Relay()
    return [p for record in log for p in relay.feed(record)]


def images_seen(payloads: list[Payload]) -> dict[int, tuple[bytes, ImageComplete, list[int]]]:
    """What a client assembles from the chunks it sees, checking the stream's promises on
    the way: each index once, contiguous offsets, `last` on the final piece only, and a
    checksum record that matches the bytes. Returns bytes, record and chunk sizes."""
    out: dict[int, tuple[bytes, ImageComplete, list[int]]] = {}
    parts: dict[int, list[ImageChunk]] = {}
    for p in payloads:
        if isinstance(p, ImageChunk):
            assert p.image_index not in out, f"image {p.image_index} sent twice"
            got = parts.setdefault(p.image_index, [])
            assert p.offset == sum(len(c.data) for c in got), "chunk offsets are not contiguous"
            assert not any(c.last for c in got), "a chunk after the last one"
            got.append(p)
        elif isinstance(p, ImageComplete):
            assert p.image_index not in out, f"image {p.image_index} completed twice"
            got = parts.pop(p.image_index, [])
            assert got, f"image {p.image_index} completed without chunks"
            assert got[-1].last
            data = b"".join(c.data for c in got)
            assert len(data) == p.size_bytes
            assert sha(data) == p.sha256
            out[p.image_index] = (data, p, [len(c.data) for c in got])
    assert not parts, f"chunks without a checksum record: {sorted(parts)}"
    return out


# -- the codec ---------------------------------------------------------------------------------

PAYLOADS: list[Payload] = [
    Queued(3),
    Started(2),
    Progress(3, 20, 1.25),
    Preview(1, 5, b"\xff\xd8\xff jpeg bytes"),
    ImageChunk(0, 0, b"abc", False),
    ImageChunk(1, 262144, b"\x00\x01\x02", True),
    ImageComplete(1, "ab" * 32, 1234, "image/png", 2**40 + 7),
    Completed(Timings(0.5, 0.25, 3.0, 0.125)),
    Failed("out of device memory", "OUT_OF_DEVICE_MEMORY"),
    Failed("plain failure"),
    Failed("it does not fit", "LORA_LOAD_FAILED", "ab" * 32),
    Cancelled(),
]


def test_failed_records_from_before_reasons_still_read() -> None:
    old = EventRecord(GID, "failed", 1, {"error": "oom", "code": "RESOURCE_EXHAUSTED"}, b"")
    assert to_payload(old) == Failed("oom", "OUT_OF_DEVICE_MEMORY")
    plain = EventRecord(GID, "failed", 1, {"error": "boom", "code": ""}, b"")
    assert to_payload(plain) == Failed("boom", "GENERATION_FAILED")


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_every_payload_survives_to_record_and_back(payload: Payload) -> None:
    record = to_record(GID, 2, payload)
    assert (record.generation_id, record.attempt) == (GID, 2)
    assert to_payload(record) == payload
    # ...also as the broker stores it: meta through JSON (NATS keeps it in a header).
    stored = EventRecord(record.generation_id, record.kind, record.attempt,
                         json.loads(json.dumps(record.meta)), record.data)  # fmt: skip
    assert to_payload(stored) == payload


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_every_payload_survives_the_fake_broker(payload: Payload) -> None:
    broker = FakeBroker()
    broker.publish(to_record(GID, 1, payload))
    subscription = broker.events(GID)
    record = subscription.next(1.0)
    subscription.close()
    assert record is not None
    assert to_payload(record) == payload
    # Exactly the state kinds go to the recorder queue, as the NATS `.state` subjects do.
    is_state = isinstance(payload, (Started, *TERMINAL))
    assert (record.kind in STATE_KINDS) == is_state
    assert len(broker.state_records(GID)) == int(is_state)


def test_an_unknown_kind_is_no_payload() -> None:
    assert to_payload(EventRecord(GID, "rumour", 1, {})) is None
    assert run([EventRecord(GID, "rumour", 1, {})]) == []


def test_state_records_carry_who_asked_and_the_images() -> None:
    who = Who("alice", "req-7", "a fox <lora:x:0.5>", ("l1", "l2"))
    images = [
        ImageComplete(0, "aa" * 32, 10, "image/png", 5),
        ImageComplete(1, "bb" * 32, 20, "image/webp", 6),
    ]
    record = to_record(GID, 3, Completed(Timings()), images=images, who=who)
    stored = json.loads(json.dumps(record.meta))
    assert Who.from_dict(stored["who"]) == who
    assert recorded_images(EventRecord(GID, record.kind, 3, stored)) == images
    assert recorded_images(rec(1, Progress(1, 2, 0.1))) == []
    assert Who.from_dict(None) == Who()


def test_a_job_survives_encode_and_decode_with_its_loras_relative() -> None:
    model = BaseModelConfig("tiny", Architecture.SD1, Path("/models/tiny"))
    lora = ResolvedLora("l1", "Ink", "ink.safetensors", "cd" * 32,
                        Path("/srv/loras/styles/ink.safetensors"), 0.75,
                        "styles/ink.safetensors")  # fmt: skip
    bare = ResolvedLora("l2", "Bare", "bare.safetensors", "ef" * 32,
                        Path("/elsewhere/bare.safetensors"), -0.5)  # fmt: skip
    job = GenerationJob(
        generation_id=GID, model=model, prompt="a fox", original_prompt="a fox <lora:ink:0.75>",
        negative_prompt="blur", width=512, height=768, steps=20, guidance_scale=6.5,
        seed=2**33, num_images=3, scheduler="euler_a", loras=(lora, bare),
        output_format="webp", chunk_size=1000, preview_every=4,
    )  # fmt: skip
    who = Who("alice", "req-1", job.original_prompt, ("l1", "l2"))
    message = decode_job(encode_job(job, who))
    assert message.generation_id == GID
    assert message.model == "tiny"
    assert message.who == who
    assert message.fields == {
        "prompt": "a fox", "original_prompt": "a fox <lora:ink:0.75>", "negative_prompt": "blur",
        "width": 512, "height": 768, "steps": 20, "guidance_scale": 6.5, "seed": 2**33,
        "num_images": 3, "scheduler": "euler_a", "output_format": "webp", "chunk_size": 1000,
        "preview_every": 4,
    }  # fmt: skip
    # A worker resolves the files under its own roots: only the relative path travels.
    assert [(x.lora_id, x.sha256, x.weight, x.file_path, x.path) for x in message.loras] == [
        ("l1", "cd" * 32, 0.75, "styles/ink.safetensors", Path("styles/ink.safetensors")),
        ("l2", "ef" * 32, -0.5, "bare.safetensors", Path("bare.safetensors")),
    ]


# -- the relay ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("meta_chunk", "relay_chunk", "sizes"), [
    (50, 80, [50, 50, 50, 50, 10]),  # the client's size, carried on the checksum record
    (None, 80, [80, 80, 50]),  # none carried: the relay's own
])  # fmt: skip
def test_a_half_sent_image_of_a_dead_attempt_is_replaced_by_the_whole_one(
    meta_chunk: int | None, relay_chunk: int, sizes: list[int]
) -> None:
    first = bytes(range(210))  # attempt 1's image: same index, different bytes
    second = bytes(reversed(range(210)))
    log = [
        rec(0, Queued(0)),
        rec(1, Started(1)),
        rec(1, Progress(1, 2, 0.1)),
        *whole_image(1, 0, first, piece=64)[:2],  # 128 of 210 bytes, then the worker died
        rec(2, Started(1)),
        rec(2, Progress(1, 2, 0.2)),
        *whole_image(2, 0, second, piece=64, chunk_size=meta_chunk),
        rec(2, Completed(Timings(1.0))),
    ]
    out = run(log, Relay(chunk_size=relay_chunk))
    seen = images_seen(out)
    assert list(seen) == [0]
    data, complete, chunk_sizes = seen[0]
    assert data == second
    assert complete == ImageComplete(0, sha(second), 210, "image/png", 100)
    assert chunk_sizes == sizes
    assert [type(p).__name__ for p in out] == [
        "Queued", "Started", "Progress", "Started", "Progress",
        *["ImageChunk"] * len(sizes), "ImageComplete", "Completed",
    ]  # fmt: skip


def test_an_image_an_earlier_attempt_finished_is_not_sent_again() -> None:
    a0, b0 = b"A" * 100, b"B" * 120  # attempt 2 made image 0 again, with other bytes
    a1, b1 = b"first" * 30, b"second" * 30
    log = [
        rec(1, Started(2)),
        *whole_image(1, 0, a0),
        *whole_image(1, 1, a1)[:1],  # died during image 1
        rec(2, Started(2)),
        *whole_image(2, 0, b0),
        *whole_image(2, 1, b1),
        rec(2, Completed(Timings())),
    ]
    out = run(log)
    seen = images_seen(out)  # also checks that each index is sent once
    assert {i: data for i, (data, _, _) in seen.items()} == {0: a0, 1: b1}
    assert [p for p in out if isinstance(p, ImageComplete)] == [
        ImageComplete(0, sha(a0), 100, "image/png", 100),
        ImageComplete(1, sha(b1), len(b1), "image/png", 101),
    ]


def test_events_of_an_older_attempt_after_a_newer_started_are_dropped() -> None:
    stale, fresh = b"stale" * 20, b"fresh" * 20
    log = [
        rec(1, Started(1)),
        rec(1, Progress(1, 4, 0.1)),
        rec(2, Started(1)),
        # the stalled first worker wakes up and finishes its job
        rec(1, Progress(2, 4, 0.2)),
        rec(1, Preview(0, 2, b"jpeg")),
        *whole_image(1, 0, stale),
        rec(1, Completed(Timings(9.0))),
        rec(1, Failed("late")),
        rec(2, Progress(1, 4, 0.3)),
        *whole_image(2, 0, fresh),
        rec(2, Completed(Timings(2.0))),
    ]
    out = run(log)
    assert [p for p in out if not isinstance(p, ImageChunk)] == [
        Started(1),
        Progress(1, 4, 0.1),
        Started(1),
        Progress(1, 4, 0.3),
        ImageComplete(0, sha(fresh), len(fresh), "image/png", 100),
        Completed(Timings(2.0)),
    ]
    assert images_seen(out)[0][0] == fresh


def _gap(records: list[EventRecord]) -> list[EventRecord]:
    return [records[0], *records[2:]]  # the second chunk is missing


def _truncated(records: list[EventRecord]) -> list[EventRecord]:
    return [*records[:-2], records[-1]]  # the last chunk is missing


def _doubled(records: list[EventRecord]) -> list[EventRecord]:
    return [*records[:2], records[1], *records[2:]]  # the second chunk twice: too many bytes


def _restarted(records: list[EventRecord]) -> list[EventRecord]:
    return [*records[:2], records[0], *records[3:]]  # offset 0 again mid-image


@pytest.mark.parametrize("damage", [_gap, _truncated, _doubled, _restarted])
def test_an_image_whose_size_does_not_match_is_never_passed_on(damage: object) -> None:
    assert callable(damage)
    data = bytes(range(256)) * 2  # 8 chunks of 64
    log = [
        rec(1, Started(1)),
        *damage(whole_image(1, 0, data)),
        rec(1, Progress(2, 2, 0.5)),
    ]
    relay = Relay()
    out = run(log, relay)
    assert out == [Started(1), Progress(2, 2, 0.5)]
    assert relay.delivered == {}
    # The index is still free: a later attempt that sends it whole gets it through.
    retry = run([rec(2, Started(1)), *whole_image(2, 0, data), rec(2, Completed(Timings()))], relay)
    assert images_seen(retry)[0][0] == data
    assert isinstance(retry[-1], Completed)


@pytest.mark.parametrize(
    "terminal",
    [Completed(Timings(1.0)), Failed("boom"), Cancelled()],
    ids=lambda p: type(p).__name__,
)
def test_the_first_terminal_event_ends_the_job(terminal: Payload) -> None:
    log = [
        rec(1, Started(1)),
        rec(1, terminal),
        rec(1, Progress(1, 1, 0.1)),
        rec(1, Failed("second terminal")),
        rec(1, Cancelled()),
        rec(2, Started(1)),
        *whole_image(2, 0, b"late image"),
        rec(2, Completed(Timings(5.0))),
    ]
    relay = Relay()
    assert run(log, relay) == [Started(1), terminal]
    assert relay.finished


def test_a_replica_cancelling_a_queued_job_ends_it_at_attempt_zero() -> None:
    log = [rec(0, Queued(0)), rec(0, Cancelled()), rec(1, Started(1))]
    assert run(log) == [Queued(0), Cancelled()]


def _busy_log() -> list[EventRecord]:
    """Three attempts, stale events, damaged and repeated images, two terminals."""
    return [
        rec(0, Queued(2)),
        rec(0, Queued(0)),
        rec(1, Started(2)),
        rec(1, Progress(1, 3, 0.1)),
        rec(1, Preview(0, 1, b"p0")),
        *whole_image(1, 0, b"zero" * 40, piece=32, chunk_size=25),
        *whole_image(1, 1, b"one" * 50, piece=32)[:2],
        rec(2, Started(2)),
        rec(1, Progress(2, 3, 0.2)),
        *_gap(whole_image(2, 1, b"uno" * 50, piece=32)),
        rec(3, Started(2)),
        rec(2, Completed(Timings())),
        rec(3, Progress(1, 3, 0.3)),
        *whole_image(3, 0, b"null" * 40, piece=32),
        *whole_image(3, 1, b"eins" * 50, piece=32, chunk_size=60),
        rec(3, Completed(Timings(1.0, 2.0, 3.0, 4.0))),
        rec(3, Failed("after the end")),
    ]


def test_two_relays_fed_the_same_log_number_the_same_events() -> None:
    log = _busy_log()
    a, b = Relay(), Relay()
    numbered_a: list[tuple[int, Payload]] = []
    numbered_b: list[tuple[int, Payload]] = []
    for record in log:  # interleaved, as two replicas following the same job
        for relay, out in ((a, numbered_a), (b, numbered_b)):
            out.extend((len(out) + 1, p) for p in relay.feed(record))
    assert numbered_a == numbered_b
    assert len(numbered_a) > 10
    seen = images_seen([p for _, p in numbered_a])
    assert {i: data for i, (data, _, _) in seen.items()} == {0: b"zero" * 40, 1: b"eins" * 50}
    assert seen[0][2] == [25] * 6 + [10]
    assert isinstance(numbered_a[-1][1], Completed)
    # What a relay emits for part of the log is the start of what it emits for all of it:
    # a replica that read less of the log has numbered nothing differently.
    for cut in range(len(log) + 1):
        assert run(log[:cut]) == run(log)[: len(run(log[:cut]))]


# -- RemoteJobStream ---------------------------------------------------------------------------


def _published(log: list[EventRecord]) -> FakeBroker:
    broker = FakeBroker()
    for record in log:
        broker.publish(record)
    return broker


def test_remote_events_after_n_are_exactly_the_tail_of_all_events() -> None:
    broker = _published(_busy_log())
    full = list(RemoteJobStream(broker, GID).events(poll=0.01))
    assert [e.sequence for e in full] == list(range(1, len(full) + 1))
    assert {e.generation_id for e in full} == {GID}
    assert [e.payload for e in full] == run(_busy_log())
    for after in range(len(full) + 2):
        stream = RemoteJobStream(broker, GID)  # as on another replica
        tail = list(stream.events(after=after, poll=0.01))
        assert tail == full[after:]
        assert stream.last_sequence == (full[-1].sequence if tail else 0)
    assert broker.subscriptions_closed == broker.subscriptions_opened


def test_a_live_follower_and_a_replica_resuming_midway_agree() -> None:
    log = _busy_log()
    broker = FakeBroker()
    live: list[GenerationEvent] = []
    follower = threading.Thread(
        target=lambda: live.extend(RemoteJobStream(broker, GID).events(poll=0.01))
    )
    follower.start()
    half = len(log) // 2
    for record in log[:half]:
        broker.publish(record)
    assert broker.wait_for(lambda: len(live) >= 3, 2.0)
    # The client drops after what it has, and resumes on another replica while the job runs.
    resumed_from = len(live)
    resumed: list[GenerationEvent] = []
    resumer = threading.Thread(
        target=lambda: resumed.extend(
            RemoteJobStream(broker, GID).events(after=resumed_from, poll=0.01)
        )
    )
    resumer.start()
    for record in log[half:]:
        broker.publish(record)
    follower.join(5.0)
    resumer.join(5.0)
    assert not follower.is_alive()
    assert not resumer.is_alive()
    assert live[:resumed_from] + resumed == live
    assert [e.payload for e in live] == run(log)


def test_a_remote_stream_stops_when_its_reader_goes_away() -> None:
    broker = _published([rec(0, Queued(0))])
    gone = threading.Event()
    stream = RemoteJobStream(broker, GID)
    events = stream.events(poll=0.01, stop=gone.is_set)
    assert next(events).payload == Queued(0)
    gone.set()
    assert list(events) == []
    assert broker.subscriptions_closed == 1
