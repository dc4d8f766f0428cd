"""Every generation belongs to its principal: the rule (application/ownership.py) and each
generation handler through the real buses, with the fake executor and the fake broker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from hashlib import sha256
from pathlib import Path

import pytest

from server.application.commands import (
    CancelGenerationCommand,
    GenerateImageCommand,
    GenerationRequest,
    SubmitGenerationCommand,
)
from server.application.context import DispatchContext, use_context
from server.application.ownership import can_see, owners_filter
from server.application.queries import (
    GetGenerationQuery,
    ListEventsQuery,
    ListGenerationsQuery,
    WatchGenerationQuery,
)
from server.application.queries.generation_queries import WatchGenerationHandler
from server.bootstrap import Container
from server.domain.errors import DomainError, NotFoundError, PermissionDeniedError
from server.domain.generation import GenerationState, GenerationView, ImageRecord
from server.domain.generation_job import GenerationJob
from server.domain.models import Page
from server.infrastructure.broker.codec import Who, decode_job, encode_job
from server.infrastructure.broker.replica import BrokerExecutor
from tests.support import make_container
from tests.unit.fake_broker import FakeBroker
from tests.unit.fake_executor import FakeExecutor, FakeModels, ready_model

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
BOB = DispatchContext(principal="bob", scopes=frozenset({"read", "generate"}))
ROOT = DispatchContext(principal="root", scopes=frozenset({"admin"}))


def as_(ctx: DispatchContext, request_id: str = "") -> DispatchContext:
    """A fresh context per dispatch (each has its own correlation id and cancellation)."""
    return DispatchContext(principal=ctx.principal, scopes=ctx.scopes, request_id=request_id)


@pytest.fixture
def fake() -> FakeExecutor:
    return FakeExecutor(max_queue=8)


@pytest.fixture
def c(tmp_path: Path, fake: FakeExecutor) -> Iterator[Container]:
    container = make_container(
        tmp_path, "memory://", executor=fake, models=FakeModels(ready_model("tiny"))
    )
    yield container
    container.close()


def submit(c: Container, ctx: DispatchContext, request_id: str = "") -> str:
    command = SubmitGenerationCommand(request=GenerationRequest(prompt=f"{ctx.principal}'s"))
    gid, _ = c.commands.dispatch(command, as_(ctx, request_id)).unwrap()
    return str(gid)


def settle(c: Container) -> None:
    c.recorder.flush()
    c.projector.wait_for(c.store.max_position(), 5.0)


def not_found(call: object, generation_id: str) -> tuple[str, dict[str, str]]:
    """The NOT_FOUND raised, with its id blanked (to compare with an unknown id's)."""
    assert isinstance(call, NotFoundError), call
    blank = {k: v.replace(generation_id, "ID") for k, v in call.metadata.items()}
    return call.message.replace(generation_id, "ID"), blank


def run(fn: object) -> None:
    """Calls `fn`, draining the stream it returns, if any."""
    assert callable(fn)
    result = fn()
    if isinstance(result, Iterator):
        list(result)


def error_of(fn: object) -> DomainError:
    with pytest.raises(DomainError) as err:
        run(fn)
    return err.value


def hidden_like_unknown(fn_of_id: object, generation_id: str) -> None:
    assert callable(fn_of_id)
    unknown = str(uuid.uuid4())
    seen = not_found(error_of(lambda: fn_of_id(generation_id)), generation_id)
    assert seen == not_found(error_of(lambda: fn_of_id(unknown)), unknown)


# -- the rule ------------------------------------------------------------------------------


def test_a_principal_sees_its_own_and_an_admin_sees_all() -> None:
    assert can_see(ALICE, "alice")
    assert not can_see(BOB, "alice")
    assert not can_see(BOB, "")
    assert can_see(ROOT, "alice")
    assert can_see(ROOT, "")


def test_listing_another_principals_or_everyones_needs_admin() -> None:
    assert owners_filter(ALICE, all_owners=False, owner="") == "alice"
    assert owners_filter(ALICE, all_owners=False, owner="alice") == "alice"
    assert owners_filter(ROOT, all_owners=False, owner="") == "root"
    assert owners_filter(ROOT, all_owners=True, owner="") is None
    assert owners_filter(ROOT, all_owners=False, owner="alice") == "alice"
    for kwargs in ({"all_owners": True, "owner": ""}, {"all_owners": False, "owner": "alice"}):
        with pytest.raises(PermissionDeniedError) as denied:
            owners_filter(BOB, **kwargs)  # type: ignore[arg-type]
        assert denied.value.metadata["required_scope"] == "admin"


# -- the handlers --------------------------------------------------------------------------


def test_the_owner_is_the_submitter_on_the_job_the_handle_and_the_record(
    c: Container, fake: FakeExecutor
) -> None:
    gid = submit(c, ALICE)
    assert fake.jobs[gid].job.owner == "alice"
    assert fake.jobs[gid].owner == "alice"
    settle(c)
    assert c.queries.dispatch(GetGenerationQuery(generation_id=gid), as_(ALICE)).data.owner == (
        "alice"
    )


def test_get_generation_hides_another_principals(c: Container) -> None:
    gid = submit(c, ALICE)
    settle(c)

    def get(ctx: DispatchContext) -> object:
        return lambda i: c.queries.dispatch(GetGenerationQuery(generation_id=i), as_(ctx))

    hidden_like_unknown(get(BOB), gid)
    assert c.queries.dispatch(GetGenerationQuery(generation_id=gid), as_(ROOT)).data.id == gid


def test_query_results_are_cached_per_viewer(c: Container) -> None:
    """The owner's answer is cached; the same query from another principal must not be
    handed that entry (the cache is keyed by the query dataclass plus the viewer)."""
    gid = submit(c, ALICE)
    settle(c)
    query = GetGenerationQuery(generation_id=gid)
    assert c.queries.dispatch(query, as_(ALICE)).data.id == gid
    assert c.queries.dispatch(query, as_(ALICE)).data.id == gid
    assert c.queries.cache.hits >= 1
    with pytest.raises(NotFoundError):
        c.queries.dispatch(query, as_(BOB))
    listing = ListGenerationsQuery()
    assert [v.id for v in c.queries.dispatch(listing, as_(ALICE)).data.items] == [gid]
    assert c.queries.dispatch(listing, as_(BOB)).data.items == ()
    events = ListEventsQuery(aggregate_id=gid)
    assert c.queries.dispatch(events, as_(ALICE)).data.items
    assert c.queries.dispatch(events, as_(BOB)).data.items == ()


def test_list_generations_filters_by_owner(c: Container) -> None:
    a, b = submit(c, ALICE), submit(c, BOB)
    settle(c)

    def ids(ctx: DispatchContext, **kw: object) -> set[str]:
        page = c.queries.dispatch(ListGenerationsQuery(**kw), as_(ctx)).data  # type: ignore[arg-type]
        return {v.id for v in page.items}

    assert ids(ALICE) == {a}
    assert ids(BOB) == {b}
    assert ids(ROOT, all_owners=True) == {a, b}
    assert ids(ROOT, owner="bob") == {b}
    with pytest.raises(PermissionDeniedError):
        ids(BOB, all_owners=True)
    with pytest.raises(PermissionDeniedError):
        ids(BOB, owner="alice")


def test_watch_hides_another_principals_live_job(c: Container, fake: FakeExecutor) -> None:
    gid = submit(c, ALICE)
    assert fake.handle(gid) is not None

    def watch(ctx: DispatchContext) -> object:
        return lambda i: c.queries.stream(WatchGenerationQuery(generation_id=i), as_(ctx))

    hidden_like_unknown(watch(BOB), gid)
    fake.run(gid)
    assert list(c.queries.stream(WatchGenerationQuery(generation_id=gid), as_(ROOT)))


def test_cancel_of_another_principals_generation_is_not_found(
    c: Container, fake: FakeExecutor
) -> None:
    gid = submit(c, ALICE)

    def cancel(ctx: DispatchContext) -> object:
        return lambda i: c.commands.dispatch(
            CancelGenerationCommand(generation_id=i), as_(ctx)
        ).unwrap()

    hidden_like_unknown(cancel(BOB), gid)
    assert not fake.jobs[gid].finished
    view = c.commands.dispatch(CancelGenerationCommand(generation_id=gid), as_(ALICE)).unwrap()
    assert view is not None
    assert view.state is GenerationState.CANCELLED


def test_a_retry_reattaches_only_for_the_owner(c: Container, fake: FakeExecutor) -> None:
    command = GenerateImageCommand(request=GenerationRequest(prompt="a fox"))
    first = next(c.commands.stream(command, as_(ALICE, "rid")))
    again = next(c.commands.stream(command, as_(ALICE, "rid")))
    assert again.generation_id == first.generation_id
    # Request ids are per principal: another principal's same id is a new generation of his
    # own, never a re-attach to hers.
    his = next(c.commands.stream(command, as_(BOB, "rid")))
    assert his.generation_id != first.generation_id
    # Nor does a retried SubmitGeneration hand him her generation's id.
    submit_command = SubmitGenerationCommand(request=GenerationRequest(prompt="a hare"))
    hers, _ = c.commands.dispatch(submit_command, as_(ALICE, "sid")).unwrap()
    theirs, _ = c.commands.dispatch(submit_command, as_(BOB, "sid")).unwrap()
    assert theirs != hers
    assert [job.owner for job in fake.jobs.values()] == ["alice", "bob", "alice", "bob"]


# -- WatchGeneration's replay reads no image before the owner check ------------------------


class _ReadModel:
    def __init__(self, view: GenerationView) -> None:
        self.view = view

    def get_generation(self, generation_id: str) -> GenerationView | None:
        return self.view if generation_id == self.view.id else None

    def list_generations(
        self,
        states: Sequence[GenerationState] = (),
        page_size: int = 50,
        page_token: str = "",
        *,
        owner: str | None = None,
    ) -> Page[GenerationView]:
        return Page((), "", 0)


class _NoLiveJobs:
    def handle(self, generation_id: str) -> None:
        return None


class _SpyImages:
    def __init__(self) -> None:
        self.reads: list[str] = []

    def read(self, generation_id: str, index: int, mime_type: str) -> bytes | None:
        self.reads.append(generation_id)
        return b"png"


def test_the_replay_checks_the_owner_before_reading_any_image() -> None:
    gid = str(uuid.uuid4())
    image = ImageRecord(0, sha256(b"png").hexdigest(), 3, "image/png", 1)
    view = GenerationView(
        id=gid, state=GenerationState.SUCCEEDED, spec={}, images=(image,), owner="alice"
    )
    images = _SpyImages()
    handler = WatchGenerationHandler(_ReadModel(view), _NoLiveJobs(), images)
    with use_context(as_(BOB)), pytest.raises(NotFoundError):
        handler.handle(WatchGenerationQuery(generation_id=gid))
    assert images.reads == []
    with use_context(as_(ALICE)):
        assert list(handler.handle(WatchGenerationQuery(generation_id=gid)))
    assert images.reads == [gid]


# -- cluster mode: the owner travels with the job ------------------------------------------


def test_the_owner_travels_in_the_job_message_and_to_other_replicas() -> None:
    broker = FakeBroker()
    job = GenerationJob(
        generation_id=str(uuid.uuid4()),
        model=ready_model("tiny").config,
        prompt="p",
        original_prompt="p",
        width=64,
        height=64,
        steps=2,
        guidance_scale=1.0,
        seed=1,
        owner="alice",
    )
    stream = BrokerExecutor(broker).submit(job)
    assert stream.owner == "alice"
    message = decode_job(encode_job(job, Who("alice", "rid")))
    assert message.owner == "alice"
    assert message.job(job.model, (), 1024).owner == "alice"
    # Another replica knows only the id: it reads the owner from the job's first record.
    elsewhere = BrokerExecutor(broker).handle(job.generation_id)
    assert elsewhere is not None
    assert elsewhere.owner == "alice"
    first = broker.log(job.generation_id)[0]
    assert first.kind == "queued"
    assert json.loads(json.dumps(first.meta))["who"]["principal"] == "alice"


def test_a_swept_generation_stays_hidden_and_sweeping_still_removes_it(tmp_path: Path) -> None:
    """Images keep the layout <data>/generations/<id>/ (no owner in the path): the owner is
    checked on every read, so retention sweeps folders as before."""
    import os
    import time

    from server.infrastructure.diffusion.images import ImageStore

    store = ImageStore(tmp_path / "generations", retention_seconds=3600)
    gid = str(uuid.uuid4())
    store.save(gid, 0, "image/png", b"png")
    image = ImageRecord(0, sha256(b"png").hexdigest(), 3, "image/png", 1)
    view = GenerationView(
        id=gid, state=GenerationState.SUCCEEDED, spec={}, images=(image,), owner="alice"
    )
    handler = WatchGenerationHandler(_ReadModel(view), _NoLiveJobs(), store)

    def kinds(ctx: DispatchContext) -> list[str]:
        with use_context(as_(ctx)):
            return [
                type(e.payload).__name__
                for e in handler.handle(WatchGenerationQuery(generation_id=gid))
            ]

    def hidden() -> None:
        with use_context(as_(BOB)), pytest.raises(NotFoundError):
            handler.handle(WatchGenerationQuery(generation_id=gid))

    hidden()
    assert kinds(ALICE) == ["ImageChunk", "ImageComplete", "Completed"]
    old = time.time() - 7200
    os.utime(tmp_path / "generations" / gid, (old, old))
    assert store.sweep() == 1
    assert not (tmp_path / "generations" / gid).exists()
    hidden()
    assert kinds(ALICE) == ["Completed"]  # past retention: the record stays, the bytes do not
