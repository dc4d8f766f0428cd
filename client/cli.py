"""`loracle` command line: catalog management against a running server.

Human output goes through rich (tables on stdout, progress on stderr); `--json` prints one
plain JSON document on stdout instead so the output can be piped into other tools.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client._requests import DEFAULT_CATALOG_BATCH_SIZE, DEFAULT_TARGET, Tls
from client.catalog import parse_catalog_lines, read_catalog_jsonl
from client.errors import InvalidArgument, LoracleError, NotFound
from client.sync_client import LoracleClient
from loracle.v1 import command_service_pb2, types_pb2

__all__ = ["main"]

_EXIT_ERROR = 1
_EXIT_USAGE = 2
_MAX_ERRORS_SHOWN = 10
_UUID_LENGTH = 36


class _UsageError(Exception):
    """A request the parser cannot reject by itself (e.g. `loras update` with nothing to set)."""


class _LocalError(Exception):
    """A problem on this side of the wire, e.g. an unreadable catalog file."""


@dataclass(slots=True)
class _Output:
    json_mode: bool
    out: Console
    err: Console

    def json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        # A bar is noise in a pipe or a log file, and never wanted next to machine output.
        disabled = self.json_mode or not self.err.is_terminal
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
            disable=disabled,
        ) as progress:
            yield progress


_Handler = Callable[[LoracleClient, argparse.Namespace, _Output], int]


def _to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix)


def _architecture(value: int) -> str:
    return _enum_name(types_pb2.Architecture, value, "ARCHITECTURE_")


def _base_model(ref: types_pb2.BaseModelRef) -> str:
    arch = _architecture(ref.architecture)
    return f"{ref.lineage} / {arch}" if ref.lineage else arch


def _time(ts: Timestamp) -> str:
    if ts.seconds == 0 and ts.nanos == 0:
        return ""
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _resolve_lora(client: LoracleClient, text: str) -> types_pb2.Lora:
    """Accepts a full id or the 8-character prefix that `loras list` shows."""
    try:
        return client.get_lora(text)
    except (NotFound, InvalidArgument) as err:
        if len(text) >= _UUID_LENGTH:
            raise
        lookup_error = err
    prefix = text.lower()
    matches = [lora for lora in client.iter_loras(page_size=1000) if lora.id.startswith(prefix)]
    if not matches:
        raise lookup_error
    if len(matches) > 1:
        raise InvalidArgument(
            f"{text!r} matches {len(matches)} LoRAs; give more of the id"
        ) from None
    return matches[0]


# --- loras --------------------------------------------------------------------------------


def _settle(client: LoracleClient, consistency_token: str) -> None:
    """Returns once the server's read models show this write, so the next `loracle` command
    (a list, a show) sees it: read-your-writes across separate CLI runs."""
    if consistency_token:
        client.list_loras(page_size=1, consistency_token=consistency_token)


def _cmd_import(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    files: list[command_service_pb2.ImportFileResult] = []
    last = command_service_pb2.ImportLorasResponse()
    with out.progress() as progress:
        task = progress.add_task("scanning", total=None)
        for message in client.import_loras(args.directory):
            last = message
            totals = message.progress
            progress.update(
                task,
                total=totals.files_total or None,
                completed=totals.files_done,
                description=f"scanning ({totals.failed} failed)" if totals.failed else "scanning",
            )
            if message.HasField("file"):
                files.append(message.file)
    _settle(client, last.consistency_token)
    totals = last.progress
    if out.json_mode:
        out.json(
            {
                "files": [_to_dict(f) for f in files],
                "progress": _to_dict(totals),
                "consistency_token": last.consistency_token,
            }
        )
        return 0
    # Printed after the bar is gone: rich would otherwise reroute stdout to the bar's stderr.
    for result in files:
        if result.outcome == command_service_pb2.IMPORT_OUTCOME_FAILED:
            out.out.print(f"failed: {result.path}: {result.error}")
    out.out.print(
        f"registered {totals.registered}, updated {totals.updated}, "
        f"unchanged {totals.unchanged}, failed {totals.failed}, "
        f"marked unavailable {totals.marked_unavailable}"
    )
    return 0


def _cmd_import_catalog(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    try:
        if args.file == "-":
            records = list(parse_catalog_lines(sys.stdin, "<stdin>"))
        else:
            records = list(read_catalog_jsonl(args.file))
    except OSError as exc:
        raise _LocalError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise _LocalError(str(exc)) from None

    with out.progress() as progress:
        task = progress.add_task("importing", total=len(records))

        def advance(records_seen: int, _: command_service_pb2.ImportLoraCatalogResponse) -> None:
            progress.update(task, completed=records_seen)

        result = client.import_lora_catalog(records, batch_size=args.batch_size, on_batch=advance)
    _settle(client, result.consistency_token)
    if out.json_mode:
        out.json(_to_dict(result))
        return 0
    out.out.print(
        f"created {result.created}, updated {result.updated}, "
        f"unchanged {result.unchanged}, errors {len(result.errors)}"
    )
    for error in result.errors[:_MAX_ERRORS_SHOWN]:
        source = f" ({error.source_id})" if error.source_id else ""
        out.out.print(f"  record {error.index}{source}: {error.error}")
    if len(result.errors) > _MAX_ERRORS_SHOWN:
        out.out.print(f"  … and {len(result.errors) - _MAX_ERRORS_SHOWN} more")
    return 0


def _cmd_register(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    response = client.register_lora(args.path)
    _settle(client, response.consistency_token)
    if out.json_mode:
        out.json(_to_dict(response))
        return 0
    verb = "registered" if response.created else "already catalogued"
    out.out.print(f"{verb}: {response.lora.id} {response.lora.name}")
    return 0


def _cmd_list(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    limit: int = args.limit
    loras_iter = client.iter_loras(
        base_model=args.base_model,
        tag=args.tag,
        available_only=args.available_only,
        page_size=min(limit, 1000) if limit > 0 else 1000,
    )
    loras = list(islice(loras_iter, limit) if limit > 0 else loras_iter)
    if out.json_mode:
        out.json([_to_dict(lora) for lora in loras])
        return 0
    table = Table("id", "name", "base model", "available", "trigger words", "tags")
    for lora in loras:
        table.add_row(
            lora.id[:8],
            lora.name,
            _base_model(lora.base_model),
            _yes_no(lora.available),
            _truncate(", ".join(lora.trigger_words), 40),
            _truncate(", ".join(lora.tags), 40),
        )
    out.out.print(table)
    return 0


def _show(lora: types_pb2.Lora, out: _Output) -> None:
    rows: list[tuple[str, str]] = [
        ("id", lora.id),
        ("name", lora.name),
        ("base model", _base_model(lora.base_model)),
        ("available", _yes_no(lora.available)),
        ("source", _enum_name(types_pb2.LoraSource, lora.source, "LORA_SOURCE_")),
        ("source id", lora.source_id),
        ("file name", lora.file_name),
        ("trigger words", ", ".join(lora.trigger_words)),
        ("tags", ", ".join(lora.tags)),
        ("description", lora.description),
        (
            "preferred weight",
            f"{lora.preferred_weight:g}" if lora.HasField("preferred_weight") else "",
        ),
        ("rank", str(lora.rank) if lora.rank else ""),
        ("downloads", str(lora.downloads) if lora.downloads else ""),
    ]
    if lora.HasField("file"):
        rows += [
            ("file", lora.file.path),
            ("size", f"{lora.file.size_bytes:,} bytes"),
            ("sha256", lora.file.sha256),
            ("autov2", lora.file.autov2),
            ("modified", _time(lora.file.modified_time)),
        ]
    if lora.training_tags:
        shown = ", ".join(f"{t.tag} ({t.count})" for t in lora.training_tags[:20])
        more = len(lora.training_tags) - 20
        rows.append(("training tags", shown + (f", … {more} more" if more > 0 else "")))
    rows += [
        ("created", _time(lora.create_time)),
        ("updated", _time(lora.update_time)),
        ("version", str(lora.version)),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        if value:  # unknown or unset fields are left out rather than shown blank
            grid.add_row(key, value)
    out.out.print(grid)


def _cmd_show(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    lora = _resolve_lora(client, args.id)
    if out.json_mode:
        out.json(_to_dict(lora))
    else:
        _show(lora, out)
    return 0


def _cmd_update(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    trigger_words: list[str] | None = args.trigger_words
    if trigger_words is None and args.clear_trigger_words:
        trigger_words = []
    tags: list[str] | None = args.tags
    if tags is None and args.clear_tags:
        tags = []
    fields = (args.name, trigger_words, tags, args.description, args.preferred_weight)
    if all(value is None for value in fields):
        raise _UsageError("loras update: give at least one field to change")
    lora_id = _resolve_lora(client, args.id).id
    response = client.update_lora(
        lora_id,
        name=args.name,
        trigger_words=trigger_words,
        tags=tags,
        description=args.description,
        preferred_weight=args.preferred_weight,
    )
    _settle(client, response.consistency_token)
    if out.json_mode:
        out.json(_to_dict(response))
    else:
        _show(response.lora, out)
    return 0


def _cmd_delete(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    lora = _resolve_lora(client, args.id)
    response = client.delete_lora(lora.id)
    _settle(client, response.consistency_token)
    if out.json_mode:
        out.json({"id": lora.id, **_to_dict(response)})
    else:
        out.out.print(f"deleted {lora.id} {lora.name}")
    return 0


# --- recommendations -----------------------------------------------------------------------


def _recommendation_table(recs: Sequence[types_pb2.Recommendation]) -> Table:
    table = Table("#", "LoRA", "confidence", "weight", "trigger words", "why")
    for rank, rec in enumerate(recs, start=1):
        table.add_row(
            str(rank),
            f"{rec.lora.name}\n{rec.lora.id[:8]}",
            f"{rec.confidence:.2f}",
            f"{rec.weight:g}",
            _truncate(", ".join(rec.trigger_words), 60),
            "\n".join(rec.reasons),
        )
    return table


def _cmd_recommend(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    response = client.recommend_loras(
        args.prompt,
        args.base_model,
        max_loras=args.max,
        min_confidence=args.min_confidence,
        include_unavailable=args.include_unavailable,
    )
    if out.json_mode:
        out.json(_to_dict(response))
        return 0
    if not response.recommendations:
        out.out.print("no LoRA fits this prompt well enough")
        return 0
    out.out.print(_recommendation_table(response.recommendations))
    out.out.print(f"recommendation id: {response.recommendation_id}")
    return 0


def _cmd_search(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    response = client.search_loras(args.query, base_model=args.base_model, page_size=args.limit)
    if out.json_mode:
        out.json(_to_dict(response))
        return 0
    table = Table("#", "LoRA", "score", "base model", "why")
    for rank, hit in enumerate(response.results, start=1):
        table.add_row(
            str(rank),
            f"{hit.lora.name}\n{hit.lora.id[:8]}",
            f"{hit.score:.2f}",
            _base_model(hit.lora.base_model),
            "\n".join(hit.reasons),
        )
    out.out.print(table)
    return 0


# --- generation ----------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT, e.g. 512x512") from None
    return width, height


def _output_paths(base: str, count: int) -> list[str]:
    if count == 1:
        return [base]
    stem, dot, suffix = base.rpartition(".")
    return [f"{stem}-{i}.{suffix}" if dot else f"{base}-{i}" for i in range(count)]


def _lora_choice(text: str) -> types_pb2.LoraSelection:
    name, colon, weight = text.rpartition(":")
    if not colon:
        return types_pb2.LoraSelection(lora=text)
    try:
        return types_pb2.LoraSelection(lora=name, weight=float(weight))
    except ValueError:
        raise argparse.ArgumentTypeError(
            "expected NAME or NAME:WEIGHT, e.g. pixel_art:0.8"
        ) from None


def _cmd_generate(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    spec = types_pb2.GenerationSpec(
        prompt=args.prompt,
        model=args.model,
        negative_prompt=args.negative,
        steps=args.steps,
        num_images=args.images,
        scheduler=args.scheduler,
        loras=args.lora,
    )
    if args.size:
        spec.width, spec.height = args.size
    if args.seed is not None:
        spec.seed = args.seed
    if args.guidance is not None:
        spec.guidance_scale = args.guidance
    if args.detach:
        submitted = client.submit_generation(spec)
        if out.json_mode:
            out.json(_to_dict(submitted))
        else:
            out.out.print(
                f"submitted {submitted.generation_id} (queue position "
                f"{submitted.queue_position}); follow it with: loracle watch "
                f"{submitted.generation_id} -o {args.output}"
            )
        return 0
    return _follow(client.generate_image(spec), args.output, out)


def _cmd_watch(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    return _follow(client.watch_generation(args.generation_id), args.output, out)


def _cmd_cancel(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    response = client.cancel_generation(args.generation_id)
    generation = response.generation
    if out.json_mode:
        out.json(_to_dict(generation))
        return 0
    state = types_pb2.GenerationState.Name(generation.state).removeprefix("GENERATION_STATE_")
    out.out.print(f"{generation.id}: {state.lower()}")
    return 0


def _cmd_generations(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    state = (
        types_pb2.GenerationState.Value(f"GENERATION_STATE_{args.state.upper()}")
        if args.state
        else types_pb2.GENERATION_STATE_UNSPECIFIED
    )
    page = client.list_generations(state=state, page_size=args.limit)
    if out.json_mode:
        out.json([_to_dict(g) for g in page.generations])
        return 0
    table = Table("id", "state", "created", "model", "images", "prompt")
    for g in page.generations:
        table.add_row(
            g.id,
            types_pb2.GenerationState.Name(g.state).removeprefix("GENERATION_STATE_").lower(),
            _time(g.create_time),
            g.spec.model,
            str(len(g.images)),
            g.spec.prompt[:60],
        )
    out.out.print(table)
    return 0


def _follow(events: Iterator[types_pb2.GenerationEvent], output: str, out: _Output) -> int:
    """Shows a generation's stream with a progress bar, reassembles its images from chunks
    and writes them after checking each one's SHA-256."""
    images: dict[int, bytearray] = {}
    done: dict[int, types_pb2.ImageInfo] = {}
    final = types_pb2.GenerationEvent()
    with out.progress() as progress:
        task = progress.add_task("queued", total=None)
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "queued":
                progress.update(task, description=f"queued (position {event.queued.position})")
                if event.queued.warning:
                    progress.console.print(f"warning: {event.queued.warning}", markup=False)
            elif kind == "started":
                progress.update(task, description=f"started (batch of {event.started.batch_size})")
            elif kind == "progress":
                progress.update(
                    task,
                    description="denoising",
                    total=event.progress.total_steps,
                    completed=event.progress.step,
                )
            elif kind == "image_chunk":
                images.setdefault(event.image_chunk.image_index, bytearray()).extend(
                    event.image_chunk.data
                )
            elif kind == "image_complete":
                done[event.image_complete.index] = event.image_complete
            final = event
    if final.WhichOneof("event") != "completed":
        reason = final.failed.error if final.HasField("failed") else "cancelled"
        raise _LocalError(f"generation {final.generation_id} did not complete: {reason}")
    written = []
    for index, path in zip(sorted(done), _output_paths(output, len(done)), strict=True):
        data = bytes(images.get(index, b""))
        if hashlib.sha256(data).hexdigest() != done[index].sha256:
            raise _LocalError(f"image {index} arrived damaged (SHA-256 mismatch)")
        with open(path, "wb") as f:
            f.write(data)
        written.append({"path": path, "sha256": done[index].sha256, "seed": done[index].seed})
    if out.json_mode:
        out.json(
            {
                "generation_id": final.generation_id,
                "images": written,
                "timings": _to_dict(final.completed.timings),
            }
        )
        return 0
    for item in written:
        out.out.print(f"wrote {item['path']} (seed {item['seed']})")
    return 0


# --- models, events -----------------------------------------------------------------------


def _cmd_models(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    models = client.list_base_models()
    if out.json_mode:
        out.json([_to_dict(model) for model in models])
        return 0
    table = Table("name", "architecture", "ready", "dtype", "scheduler", "path", "note")
    for model in models:
        note = model.error or ("placeholder (random weights)" if model.is_placeholder else "")
        table.add_row(
            model.name,
            _architecture(model.architecture),
            _yes_no(model.ready),
            model.dtype,
            model.default_scheduler,
            model.path,
            note,
        )
    out.out.print(table)
    return 0


def _cmd_events(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    limit: int = args.limit
    events_iter = client.iter_events(
        aggregate_id=args.aggregate,
        type=args.type,
        principal=args.principal,
        page_size=min(limit, 1000) if limit > 0 else 1000,
    )
    events = list(islice(events_iter, limit) if limit > 0 else events_iter)
    if out.json_mode:
        out.json([_to_dict(event) for event in events])
        return 0
    table = Table("position", "time", "type", "aggregate id", "principal")
    for event in events:
        table.add_row(
            str(event.position),
            _time(event.occur_time),
            event.type,
            event.aggregate_id,
            event.principal,
        )
    out.out.print(table)
    return 0


# --- wiring -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracle", description="Manage the Loracle LoRA catalog.")
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get("LORACLE_SERVER") or DEFAULT_TARGET,
        help="server address (default: $LORACLE_SERVER or %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("LORACLE_TOKEN") or None,
        help="bearer token (default: $LORACLE_TOKEN)",
    )
    parser.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA bundle")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="client private key (mutual TLS)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each call; 0 for none (default: %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loras = commands.add_parser("loras", help="manage the LoRA catalog")
    loras_commands = loras.add_subparsers(dest="loras_command", required=True, metavar="COMMAND")

    p = loras_commands.add_parser("import", help="scan a directory under a LoRA root")
    p.add_argument(
        "directory",
        metavar="DIR",
        nargs="?",
        default="",
        help="absolute, or relative to the first root (default: the whole root)",
    )
    p.set_defaults(handler=_cmd_import)

    p = loras_commands.add_parser("import-catalog", help="import JSON Lines metadata records")
    p.add_argument("file", metavar="FILE.jsonl", help="JSON Lines file, or - for stdin")
    p.add_argument(
        "--batch-size", type=_positive_int, default=DEFAULT_CATALOG_BATCH_SIZE, metavar="N"
    )
    p.set_defaults(handler=_cmd_import_catalog)

    p = loras_commands.add_parser("register", help="register one .safetensors file")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(handler=_cmd_register)

    p = loras_commands.add_parser("list", help="list the catalog")
    p.add_argument("--base-model", default="", metavar="X")
    p.add_argument("--tag", default="", metavar="T")
    p.add_argument("--available-only", action="store_true")
    p.add_argument("--limit", type=_non_negative_int, default=50, metavar="N", help="0 for all")
    p.set_defaults(handler=_cmd_list)

    p = loras_commands.add_parser("show", help="show one LoRA")
    p.add_argument("id", metavar="ID", help="full id or a unique prefix")
    p.set_defaults(handler=_cmd_show)

    p = loras_commands.add_parser("update", help="change editable fields")
    p.add_argument("id", metavar="ID", help="full id or a unique prefix")
    p.add_argument("--name")
    p.add_argument("--trigger-word", dest="trigger_words", action="append", metavar="WORD")
    p.add_argument("--clear-trigger-words", action="store_true")
    p.add_argument("--tag", dest="tags", action="append", metavar="TAG")
    p.add_argument("--clear-tags", action="store_true")
    p.add_argument("--description")
    p.add_argument("--preferred-weight", type=float, metavar="W")
    p.set_defaults(handler=_cmd_update)

    p = loras_commands.add_parser("delete", help="remove a LoRA from the catalog")
    p.add_argument("id", metavar="ID", help="full id or a unique prefix")
    p.set_defaults(handler=_cmd_delete)

    p = commands.add_parser("recommend", help="recommend LoRAs for a prompt")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--base-model", required=True, metavar="X", help='e.g. "SD 1.5" or SDXL')
    p.add_argument("--max", type=_positive_int, default=3, metavar="N")
    p.add_argument("--min-confidence", type=float, metavar="C")
    p.add_argument(
        "--include-unavailable", action="store_true", help="also catalog entries without a file"
    )
    p.set_defaults(handler=_cmd_recommend)

    p = commands.add_parser("generate", help="generate an image")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-o", "--output", default="out.png", metavar="FILE")
    p.add_argument("--model", default="", metavar="NAME")
    p.add_argument("--negative", default="", metavar="PROMPT")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=_non_negative_int, default=0, metavar="N")
    p.add_argument("--size", type=_size, metavar="WxH")
    p.add_argument("--images", type=_positive_int, default=1, metavar="N")
    p.add_argument("--guidance", type=float, metavar="CFG")
    p.add_argument("--scheduler", default="", metavar="NAME", help="e.g. euler_a, dpmpp_2m")
    p.add_argument(
        "--lora",
        type=_lora_choice,
        action="append",
        default=[],
        metavar="NAME[:WEIGHT]",
        help="apply a catalogued LoRA (repeatable); <lora:NAME:W> in the prompt works too",
    )
    p.add_argument(
        "--detach", action="store_true", help="submit and print the id instead of waiting"
    )
    p.set_defaults(handler=_cmd_generate)

    p = commands.add_parser("watch", help="follow a generation (from any connection)")
    p.add_argument("generation_id", metavar="ID")
    p.add_argument("-o", "--output", default="out.png", metavar="FILE")
    p.set_defaults(handler=_cmd_watch)

    p = commands.add_parser("cancel", help="cancel a queued or running generation")
    p.add_argument("generation_id", metavar="ID")
    p.set_defaults(handler=_cmd_cancel)

    p = commands.add_parser("generations", help="list generations, newest first")
    p.add_argument(
        "--state",
        default="",
        choices=["", "queued", "running", "succeeded", "failed", "cancelled"],
    )
    p.add_argument("--limit", type=_positive_int, default=20, metavar="N")
    p.set_defaults(handler=_cmd_generations)

    p = commands.add_parser("search", help="search the catalog")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--base-model", default="", metavar="X")
    p.add_argument("--limit", type=_positive_int, default=20, metavar="N")
    p.set_defaults(handler=_cmd_search)

    p = commands.add_parser("models", help="list the configured base models")
    p.set_defaults(handler=_cmd_models)

    p = commands.add_parser("events", help="show the audit trail, oldest first")
    p.add_argument("--aggregate", default="", metavar="ID")
    p.add_argument("--type", default="", metavar="T")
    p.add_argument("--principal", default="", metavar="P")
    p.add_argument("--limit", type=_non_negative_int, default=50, metavar="N", help="0 for all")
    p.set_defaults(handler=_cmd_events)
    return parser


def _report(err: LoracleError, server: str) -> None:
    if err.code == grpc.StatusCode.UNAVAILABLE and not err.reason:
        # No ErrorInfo: the channel failed, not the server's logic.
        print(
            f"error: UNAVAILABLE: the server at {server} could not be reached ({err.message})",
            file=sys.stderr,
        )
        return
    print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
    for field, description in err.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)
    if err.correlation_id:
        print(f"  correlation id: {err.correlation_id}", file=sys.stderr)
    if err.retry_after is not None:
        print(f"  retry after {err.retry_after:g}s", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else _EXIT_USAGE
    handler: _Handler = args.handler
    out = _Output(
        json_mode=args.json,
        out=Console(markup=False, highlight=False),
        err=Console(stderr=True, markup=False, highlight=False),
    )
    timeout = args.timeout if args.timeout > 0 else None
    try:
        tls = (
            Tls.from_files(args.tls_ca, args.tls_cert, args.tls_key)
            if args.tls or args.tls_ca or args.tls_cert
            else None
        )
        with LoracleClient(args.server, timeout=timeout, token=args.token, tls=tls) as client:
            return handler(client, args, out)
    except LoracleError as err:
        _report(err, args.server)
        return _EXIT_ERROR
    except _LocalError as err:
        print(f"error: {err}", file=sys.stderr)
        return _EXIT_ERROR
    except OSError as err:  # e.g. a TLS file that cannot be read
        print(f"error: {err}", file=sys.stderr)
        return _EXIT_ERROR
    except _UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"loracle: error: {err}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
