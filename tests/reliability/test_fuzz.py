"""Property-based fuzzing of every request message of both services against a real server.

Requests are derived from the service descriptors themselves (a new RPC or field is fuzzed
without touching this file): hostile strings (huge, NULs, unicode, paths, A1111 syntax), the
ends of every integer type, NaN and infinities, unknown enum numbers, present and absent
optional fields, nested and repeated messages. A second pass sends raw bytes: random frames,
and valid messages with fields appended at the wire level (out-of-range int32 and enum values).

For every call: no request, decodable or not, is answered INTERNAL or UNKNOWN (an undecodable
frame is INVALID_ARGUMENT UNDECODABLE_REQUEST from the validation interceptor); no status
message or trailer carries a Python stack trace; the process is alive; Health/Check answers
SERVING. Forged page and consistency tokens (base64 JSON with missing keys and odd types,
deep nesting, huge numbers, 5000 characters) and broken frames (invalid UTF-8, truncated
varints and lengths) are INVALID_ARGUMENT and write no traceback to the log.

Generation RPCs are fuzzed too, with a 2 s deadline and cancelled after a few messages, and
every generation SubmitGeneration queues is cancelled at once. Valid image sides above 128 are
not drawn: one denoising step at 512x512 on the embedded placeholder takes over a minute on two
cores, so they would measure the CPU, not the API.

LORACLE_FUZZ_EXAMPLES sets the examples per method (typed; raw bytes get half as many).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import InvalidArgument, LoracleClient
from client._requests import CHANNEL_OPTIONS
from loracle.v1 import command_service_pb2, command_service_pb2_grpc, types_pb2
from server.devtools.local_server import RunningServer, start_server
from server.devtools.synthetic_loras import write_demo_loras
from server.domain.schedulers import FLOW_SCHEDULERS, NOISE_SCHEDULERS, SCHEDULERS
from tests.hostile_images import bad_images, odd_images
from tests.reliability.proto_strategies import (
    WIRE_INTEGER_TYPES,
    integers,
    mostly,
    raw_requests,
    requests,
    text,
    varint,
    wire_field,
)
from tests.reliability.support import (
    ALL_RPCS,
    FUZZ_CODES,
    FUZZ_COUNTS,
    SERVING,
    Rpc,
    error_code,
    error_details,
    health_status,
    leaked_traceback,
    wait_until_ready,
    write_embedded_lora,
    write_fuzz_report,
)

EXAMPLES = int(os.environ.get("LORACLE_FUZZ_EXAMPLES", "30"))
RAW_EXAMPLES = max(5, EXAMPLES // 2)
UNARY_DEADLINE = 10.0
STREAM_DEADLINE = 2.0
STREAM_MESSAGES = 3
MAX_FUZZED_SIDE = 128
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ALL_BY_NAME = {rpc.name: rpc for rpc in ALL_RPCS}

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


def _side(plausible: bool) -> st.SearchStrategy[int]:
    """Any int32 except valid sides above MAX_FUZZED_SIDE (see the module docstring)."""
    if plausible:
        return st.sampled_from((0, 64, 72, 128))
    common, rare = integers(-(2**31), 2**31 - 1)
    return mostly(common, rare).filter(lambda v: not (MAX_FUZZED_SIDE < v <= 2048 and v % 8 == 0))


def _request_id(plausible: bool) -> st.SearchStrategy[str]:
    """Mostly fresh: a reused id with a different request is refused (by design) before the
    handler runs."""
    fresh = st.one_of(st.just(""), st.uuids().map(str))
    return fresh if plausible else mostly(fresh, text(())[1])


def _plausibly(*values: int) -> Callable[[bool], st.SearchStrategy[int]]:
    """An int32 field whose plausible values are `values` (not just small numbers)."""

    def strategy(plausible: bool) -> st.SearchStrategy[int]:
        common, rare = st.sampled_from(values), integers(-(2**31), 2**31 - 1)[1]
        return common if plausible else mostly(common, rare)

    return strategy


def _input_image(plausible: bool) -> st.SearchStrategy[bytes]:
    """Input image bytes: hostile and odd images as often as random bytes."""
    images = st.sampled_from([*bad_images().values(), *odd_images().values()])
    return images if plausible else st.one_of(images, st.binary(max_size=4096))


OVERRIDES = {
    "loracle.v1.InputImage.data": _input_image,
    "loracle.v1.GenerationSpec.width": _side,
    "loracle.v1.GenerationSpec.height": _side,
    "loracle.v1.GenerationSpec.num_images": _plausibly(0, 1, 2, 3),
    "loracle.v1.GenerationSpec.chunk_size_bytes": _plausibly(0, 1024, 65536),
    "request_id": _request_id,
}


@dataclass
class Target:
    server: RunningServer
    channel: grpc.Channel
    pools: dict[str, tuple[str, ...]]
    slow: list[tuple[str, float, str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    data = tmp_path_factory.mktemp("fuzz")
    write_demo_loras(data / "loras")
    running = start_server(data)
    try:
        wait_until_ready(running.address)
        write_embedded_lora(data, running.lora_root, "tiny_fit")
        pools = _known_values(running)
        with grpc.insecure_channel(running.address, options=CHANNEL_OPTIONS) as channel:
            yield Target(running, channel, pools)
    finally:
        running.stop()
        report = tmp_path_factory.getbasetemp() / "fuzz_counts.json"
        write_fuzz_report(report, FUZZ_COUNTS, FUZZ_CODES)
        print(f"\nfuzz cases tried: {sum(FUZZ_COUNTS.values())} ({report})")


def _known_values(server: RunningServer) -> dict[str, tuple[str, ...]]:
    """Values the server knows (ids, names, tokens) by field name, so fuzzing gets past
    "not found" to the handlers behind it."""
    with LoracleClient(server.address) as client:
        imported = list(client.import_loras())
        loras = client.list_loras(consistency_token=imported[-1].consistency_token).loras
        page = client.list_loras(page_size=1)
        recommendation = client.recommend_loras("a watercolor painting", "SD 1.5")
        events = list(
            client.generate_image(types_pb2.GenerationSpec(prompt="seed", steps=1, seed=1))
        )
        models = [m.name for m in client.list_base_models()]
    lora_ids = tuple(lora.id for lora in loras)
    file_names = tuple(lora.file_name for lora in loras)
    generations = (events[0].generation_id,)
    token = imported[-1].consistency_token
    pools: dict[str, tuple[str, ...]] = {
        "id": lora_ids + generations,
        "lora": lora_ids + file_names,
        "generation_id": generations,
        "recommendation_id": (recommendation.recommendation_id,),
        "aggregate_id": lora_ids + generations,
        "path": (*(lora.file.path for lora in loras), str(server.lora_root)),
        "directory": ("", ".", "styles", str(server.lora_root)),
        "base_model": ("SD 1.5", "SDXL", "sd1", "Pony", *models),
        "model": ("", *models),
        "scheduler": ("", *SCHEDULERS),
        "consistency_token": ("", "1", token),
        "page_token": ("", page.next_page_token),
        "paths": ("name", "tags", "trigger_words", "description", "preferred_weight"),
        "type": ("LoraRegistered", "LoraUpdated", "GenerationSubmitted"),
        "principal": ("anonymous", "system"),
        "prompt": (
            "a watercolor painting of a city at night",
            "neon portrait, cat",
            *(f"a photo <lora:{name}:0.8>" for name in file_names),
        ),
        "query": ("watercolor", "neon city", "cat portrait"),
        "source_id": ("civitai:1", "civitai:2", "hf:x/y"),
    }
    pools[""] = tuple(sorted({v for values in pools.values() for v in values if v}))
    return pools


# --- one call ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    code: grpc.StatusCode
    error: grpc.RpcError | None
    responses: tuple[bytes, ...]
    seconds: float


def invoke(channel: grpc.Channel, rpc: Rpc, payload: bytes) -> Outcome:
    """Sends `payload` as the serialized request; a stream is read for a few messages and then
    cancelled (the server must stop the work behind it)."""
    started = time.monotonic()
    responses: list[bytes] = []
    try:
        if rpc.streaming:
            stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(rpc.path)
            call: Any = stream(payload, timeout=STREAM_DEADLINE)
            for item in call:
                responses.append(item)
                if len(responses) >= STREAM_MESSAGES:
                    call.cancel()
                    break
            code = call.code()
        else:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(rpc.path)
            responses.append(unary(payload, timeout=UNARY_DEADLINE))
            code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        return Outcome(error_code(err), err, tuple(responses), time.monotonic() - started)
    return Outcome(code, None, tuple(responses), time.monotonic() - started)


def decodes(rpc: Rpc, payload: bytes) -> bool:
    try:
        rpc.request_class().FromString(payload)
    except DecodeError:
        return False
    return True


def check(target: Target, rpc: Rpc, payload: bytes, outcome: Outcome, decodable: bool) -> None:
    name = f"{rpc.name}{'' if decodable else ' (undecodable)'}"
    FUZZ_COUNTS[name] += 1
    FUZZ_CODES[name, outcome.code.name] += 1
    if outcome.seconds > 1.0:
        target.slow.append((rpc.name, outcome.seconds, outcome.code.name))
    details = error_details(outcome.error) if outcome.error is not None else ""
    assert outcome.code not in NEVER, (
        f"{rpc.name} -> {outcome.code.name}: {details}\n{_logged(target, details)}"
    )
    # The client drops trailers over its metadata limit (8 KiB): the server's real answer
    # (say INVALID_ARGUMENT echoing a 1 MB path) then arrives as RESOURCE_EXHAUSTED, which
    # clients treat as retryable.
    assert "metadata size exceeds" not in details, f"{rpc.name}: status trailers too large"
    if outcome.error is not None:
        leaked = leaked_traceback(outcome.error, payload)
        assert leaked is None, f"{rpc.name} leaked a stack trace: {leaked}"
    assert target.server.process.poll() is None, f"the server died on {rpc.name}"
    _clean_up(target, rpc, outcome)
    assert health_status(target.channel) == SERVING, f"not SERVING after {rpc.name}"


def _logged(target: Target, details: str) -> str:
    """The server log from the line naming the correlation id in `details`."""
    words = details.split()
    if "correlation" not in words:
        return ""
    log = target.server.log()
    at = log.find(words[-1])
    return log[at : at + 4000] if at >= 0 else ""


def _clean_up(target: Target, rpc: Rpc, outcome: Outcome) -> None:
    """A queued generation is cancelled at once, so the fuzz run does not keep the CPU busy."""
    if rpc.method.name != "SubmitGeneration" or outcome.code != grpc.StatusCode.OK:
        return
    (raw,) = outcome.responses
    response = command_service_pb2.SubmitGenerationResponse.FromString(raw)
    stub = command_service_pb2_grpc.CommandServiceStub(target.channel)
    stub.CancelGeneration(
        command_service_pb2.CancelGenerationRequest(generation_id=response.generation_id),
        timeout=30,
    )


# --- the properties ---------------------------------------------------------------------------

# DeleteLora last: it removes the LoRAs whose ids the other methods are fuzzed with.
RPCS = sorted(ALL_RPCS, key=lambda rpc: rpc.method.name == "DeleteLora")
IDS = [rpc.name for rpc in RPCS]


# Generous for heavy runs (LORACLE_FUZZ_EXAMPLES): a stream example may take its 2 s deadline.
SLOW_ENOUGH = pytest.mark.timeout(max(120, EXAMPLES * 3))


@SLOW_ENOUGH
@pytest.mark.parametrize("rpc", RPCS, ids=IDS)
def test_typed_requests(target: Target, rpc: Rpc) -> None:
    @FUZZ_SETTINGS
    @given(requests(rpc.request_type, target.pools, OVERRIDES))
    def fuzz(request: Message) -> None:
        payload = request.SerializeToString()
        check(target, rpc, payload, invoke(target.channel, rpc, payload), decodable=True)

    fuzz()


@SLOW_ENOUGH
@pytest.mark.parametrize("rpc", RPCS, ids=IDS)
def test_raw_requests(target: Target, rpc: Rpc) -> None:
    @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
    @given(raw_requests(rpc.request_type, target.pools, OVERRIDES))
    def fuzz(payload: bytes) -> None:
        decodable = decodes(rpc, payload)
        if decodable and not _within_fuzzed_sides(rpc, payload):
            return  # a valid large image: left out on purpose (module docstring)
        check(target, rpc, payload, invoke(target.channel, rpc, payload), decodable)

    fuzz()


def _within_fuzzed_sides(rpc: Rpc, payload: bytes) -> bool:
    request = rpc.request_class().FromString(payload)
    spec = getattr(request, "spec", None)
    if not isinstance(spec, types_pb2.GenerationSpec):
        return True
    return all(
        not (MAX_FUZZED_SIDE < side <= 2048 and side % 8 == 0) for side in (spec.width, spec.height)
    )


WIRE_EXTREMES = (-(2**63), -(2**31) - 1, 2**31, 2**32 + 7, 2**63 - 1, 2**64 - 1)


def test_out_of_range_values_on_the_wire(target: Target) -> None:
    """Every integer, enum and bool field of every request (and of the messages nested in
    it) set through the wire to values beyond int32, which decoders silently truncate."""
    for rpc in ALL_RPCS:
        for payload in _wire_payloads(rpc.request_type):
            check(target, rpc, payload, invoke(target.channel, rpc, payload), decodable=True)


def _wire_payloads(descriptor: Descriptor, depth: int = 0) -> Iterator[bytes]:
    for f in descriptor.fields:
        if f.type in WIRE_INTEGER_TYPES:
            for value in WIRE_EXTREMES:
                yield wire_field(f.number, 0, varint(value))
        elif f.message_type is not None and depth < 2:
            for inner in _wire_payloads(f.message_type, depth + 1):
                yield wire_field(f.number, 2, inner)


def test_huge_inputs_echoed_in_errors_keep_their_status(target: Target) -> None:
    """Error messages quote the input; a 1 MB quote would push the status trailers past the
    client's 8 KiB metadata limit and turn the answer into RESOURCE_EXHAUSTED."""
    huge = "\U0001f600" * 250_000  # 1 MB, each character percent-encoded to 12 bytes
    cases: list[tuple[Rpc, dict[str, Any], grpc.StatusCode]] = [
        (ALL_BY_NAME["QueryService.GetLora"], {"id": huge}, INVALID),  # a malformed id
        (ALL_BY_NAME["CommandService.RegisterLora"], {"path": huge}, INVALID),
        (ALL_BY_NAME["CommandService.ImportLoras"], {"directory": "/" + huge}, INVALID),
        (ALL_BY_NAME["QueryService.ListLoras"], {"page_token": huge}, INVALID),
        (ALL_BY_NAME["CommandService.DeleteLora"], {"request_id": huge}, INVALID),
    ]
    empty_loras = types_pb2.GenerationSpec(
        prompt="x", loras=[types_pb2.LoraSelection(lora="") for _ in range(1000)]
    )
    generate = ALL_BY_NAME["CommandService.SubmitGeneration"]
    for rpc, fields, expected in [*cases, (generate, {"spec": empty_loras}, INVALID)]:
        payload = rpc.request_class()(**fields).SerializeToString()
        outcome = invoke(target.channel, rpc, payload)
        check(target, rpc, payload, outcome, decodable=True)
        assert outcome.code == expected, (rpc.name, outcome.code)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


FORGED_TOKENS = [
    _b64(b"{}"),
    _b64(b'{"p": 1e30}'),
    _b64(b'{"p": "1"}'),
    _b64(b'{"p": null, "o": []}'),
    _b64(b'{"p": -1, "o": {"x": 1}}'),
    _b64(b'{"o": 10, "k": "' + b"k" * 100 + b'"}'),
    _b64(b"[" * 5000),
    _b64(b"null"),
    _b64(b'"just a string"'),
    _b64(b"\xff\xfe not json"),
    "[" * 5000,
    "A" * 5000,
    _b64(b"{}").rstrip("="),
    "%%%not base64%%%",
    "1e30",
    "-5",
    "99999999999999999999999",
]


def test_forged_page_and_consistency_tokens(target: Target) -> None:
    """Whatever a token's format (plain, or signed), a forged one is INVALID_ARGUMENT."""
    tried = 0
    start = len(target.server.log())
    for rpc in ALL_RPCS:
        fields = rpc.request_class().DESCRIPTOR.fields_by_name
        for name in ("page_token", "consistency_token"):
            if name not in fields:
                continue
            for token in FORGED_TOKENS:
                payload = rpc.request_class()(**{name: token}).SerializeToString()
                outcome = invoke(target.channel, rpc, payload)
                check(target, rpc, payload, outcome, decodable=True)
                assert outcome.code == INVALID, (rpc.name, name, token[:40], outcome.code)
                tried += 1
    assert tried >= 6 * len(FORGED_TOKENS)
    assert "Traceback" not in target.server.log()[start:]


def broken_frames(descriptor: Any) -> Iterator[bytes]:
    """Frames no request parses: invalid UTF-8 in each string field, a truncated varint, a
    length running past the end, a wire type 7 (none exists)."""
    for f in descriptor.fields:
        if f.type == f.TYPE_STRING and not f.is_repeated:
            yield wire_field(f.number, 2, b"\xc3\x28\xff")
    yield b"\x08\xff\xff"
    yield b"\x0a\x32abc"
    yield b"\x0f"


def test_broken_frames_are_invalid_argument_without_tracebacks(target: Target) -> None:
    start = len(target.server.log())
    for rpc in ALL_RPCS:
        for payload in broken_frames(rpc.request_class().DESCRIPTOR):
            assert not decodes(rpc, payload)
            outcome = invoke(target.channel, rpc, payload)
            check(target, rpc, payload, outcome, decodable=False)
            assert outcome.code == INVALID, (rpc.name, payload, outcome.code)
            assert outcome.error is not None
            expected = f"the request is not a valid {rpc.request_class().DESCRIPTOR.name}"
            assert error_details(outcome.error) == expected
    log = target.server.log()[start:]
    assert "Traceback" not in log
    assert "DecodeError" not in log


def test_hostile_input_images_are_refused_and_odd_ones_accepted(target: Target) -> None:
    """As init image and as mask, through both generation commands, and as the image
    UpscaleImage upscales: every broken image is INVALID_ARGUMENT naming its field, every odd
    but valid one queues (and is upscaled); no traceback."""
    start = len(target.server.log())
    good = odd_images()["WebP"]
    cases = [(name, data, INVALID) for name, data in bad_images().items()]
    cases += [(name, data, grpc.StatusCode.OK) for name, data in odd_images().items()]
    for method in ("SubmitGeneration", "GenerateImage"):
        rpc = ALL_BY_NAME[f"CommandService.{method}"]
        for role in ("init_image", "mask_image"):
            for name, data, expected in cases:
                spec = types_pb2.GenerationSpec(prompt="p", steps=1, width=64, height=64)
                if role == "init_image":
                    spec.init_image.data = data
                else:
                    spec.init_image.data = good
                    spec.mask_image.data = data
                request: Any = rpc.request_class()()
                request.spec.CopyFrom(spec)
                payload = request.SerializeToString()
                outcome = invoke(target.channel, rpc, payload)
                check(target, rpc, payload, outcome, decodable=True)
                if expected is INVALID:
                    assert outcome.code == INVALID, (method, role, name, outcome.code)
                    assert outcome.error is not None
                    assert f"spec.{role}" in error_details(outcome.error), (method, role, name)
    # And as the image UpscaleImage makes larger (Lanczos: no model needed).
    rpc = ALL_BY_NAME["CommandService.UpscaleImage"]
    for name, data, expected in cases:
        upscale = command_service_pb2.UpscaleImageRequest(upscaler="Lanczos", scale=1.5)
        upscale.image.data = data
        payload = upscale.SerializeToString()
        outcome = invoke(target.channel, rpc, payload)
        check(target, rpc, payload, outcome, decodable=True)
        if expected is INVALID:
            assert outcome.code == INVALID, ("UpscaleImage", name, outcome.code)
            assert outcome.error is not None
            assert error_details(outcome.error).startswith("image: "), name
            continue
        with LoracleClient(target.server.address, timeout=60, stream_timeout=60) as client:
            image = types_pb2.InputImage(data=data)
            events = list(client.upscale_image(image, "Lanczos", scale=1.5))
        assert events[-1].HasField("completed"), ("UpscaleImage", name, events[-1])
    assert "Traceback" not in target.server.log()[start:]


def test_every_scheduler_with_the_fewest_steps(target: Target) -> None:
    """PNDM once failed below 4 steps (Runge-Kutta warm-up steps; "generation failed"). The
    embedded model is SD1.5: every noise-prediction sampler runs, a flow-matching one is
    INVALID_ARGUMENT naming those that apply."""
    with LoracleClient(target.server.address, timeout=60, stream_timeout=60) as client:
        for scheduler in NOISE_SCHEDULERS:
            for steps in (1, 2, 3) if scheduler == "pndm" else (1,):
                spec = types_pb2.GenerationSpec(prompt="p", steps=steps, scheduler=scheduler)
                events = list(client.generate_image(spec))
                assert events[-1].HasField("completed"), (scheduler, steps, events[-1])
        for scheduler in FLOW_SCHEDULERS:
            spec = types_pb2.GenerationSpec(prompt="p", steps=1, scheduler=scheduler)
            with pytest.raises(InvalidArgument) as refused:
                list(client.generate_image(spec))
            assert "samples with euler, euler_a" in str(refused.value)


def test_server_still_generates_and_logged_no_handler_errors(target: Target) -> None:
    """After all of the above: a fresh generation completes (no stream slot or job leaked),
    and the log has no stack trace from our code."""
    with LoracleClient(target.server.address, timeout=60, stream_timeout=60) as client:
        events = list(client.generate_image(types_pb2.GenerationSpec(prompt="after", steps=1)))
    assert events[-1].HasField("completed")
    problems = [
        block
        for block in target.server.log().split("Traceback (most recent call last):")[1:]
        if "/server/" in block
    ]
    assert not problems, "stack traces from server code in the log:\n" + problems[0][:3000]
    if target.slow:
        print("\nslow calls (> 1 s):", sorted(target.slow, key=lambda s: -s[1])[:10])
