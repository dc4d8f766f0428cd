"""`loracle` command line: catalog management against a running server.

Human output goes through rich (tables on stdout, progress on stderr); `--json` prints one
plain JSON document on stdout instead so the output can be piped into other tools.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.metadata
import itertools
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client._requests import DEFAULT_CATALOG_BATCH_SIZE, DEFAULT_TARGET, Tls
from client.catalog import parse_catalog_lines, read_catalog_jsonl
from client.errors import FailedPrecondition, LoracleError
from client.sync_client import LoracleClient
from loracle.v1 import command_service_pb2, types_pb2

__all__ = ["main"]

_EXIT_ERROR = 1
_EXIT_USAGE = 2
_MAX_ERRORS_SHOWN = 10
_SHORT_ID = 8  # the id prefix tables show; every id argument accepts it
_FULL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ID_PREFIX = re.compile(r"[0-9a-f-]+")
_MAX_CANDIDATES_SHOWN = 5
_PAGE = 1000
_MIN_CUT = 6  # a cut column keeps at least this many cells
_T = TypeVar("_T")


class _UsageError(Exception):
    """A request the parser cannot reject by itself (e.g. `loras update` with nothing to set)."""


class _LocalError(Exception):
    """A problem on this side of the wire, e.g. an unreadable catalog file."""


@dataclass(slots=True)
class _Output:
    json_mode: bool
    out: Console
    err: Console
    wide: bool = False

    def id(self, full: str) -> str:
        """An id as tables show it: the prefix every id argument accepts, whole with --wide."""
        return full if self.wide else full[:_SHORT_ID]

    def table(self, columns: Sequence[_Column], rows: Iterable[Sequence[str]]) -> None:
        width = None if self.wide else self.out.width
        listed = list(rows)
        if listed:  # an empty result is said in words (`note`), not as a lone header
            sys.stdout.write(_render(columns, listed, width))

    def note(self, text: str) -> None:
        """A remark about the result (what was left out, why nothing matched), on stderr."""
        print(text, file=sys.stderr)

    @contextmanager
    def waiting(self, message: str) -> Iterator[None]:
        """A spinner on stderr while waiting; one plain line when stderr is not a terminal."""
        if self.err.is_terminal and not self.json_mode:
            with self.err.status(message):
                yield
        else:
            print(message, file=sys.stderr)
            yield

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


@dataclass(frozen=True, slots=True)
class _Column:
    header: str
    shrink: bool = False  # may be cut (with "…") to fit the terminal; ids and types never are


def _cells(text: str) -> int:
    return len(text) if text.isascii() else cell_len(text)


def _fit(text: str, width: int) -> str:
    """`text` padded or cut to `width` terminal cells."""
    size = _cells(text)
    if size <= width:
        return text + " " * (width - size)
    if text.isascii():
        return text[: width - 1] + "…"
    return set_cell_size(text, width - 1) + "…"


def _render(columns: Sequence[_Column], rows: list[Sequence[str]], width: int | None) -> str:
    """A plain aligned table, cut to `width` cells (None: never cut). Rich's Table measures
    every cell several times, which costs seconds on a catalog of thousands of rows."""
    cells = [[" ".join(cell.split()) for cell in row] for row in rows]
    widths = [_cells(column.header) for column in columns]
    for row in cells:
        for i, cell in enumerate(row):
            size = _cells(cell)
            if size > widths[i]:
                widths[i] = size
    gap = 2
    if width is not None:
        excess = sum(widths) + gap * (len(columns) - 1) - width
        # Cut the widest shrinkable column first, down to _MIN_CUT cells at most.
        while excess > 0:
            shrinkable = [i for i, c in enumerate(columns) if c.shrink and widths[i] > _MIN_CUT]
            if not shrinkable:
                break
            widest = max(shrinkable, key=lambda i: widths[i])
            floor = _MIN_CUT
            others = sorted((widths[i] for i in shrinkable if i != widest), reverse=True)
            target = max(floor, others[0] if others else floor, widths[widest] - excess)
            if target >= widths[widest]:
                target = widths[widest] - 1
            excess -= widths[widest] - target
            widths[widest] = target
    last = len(columns) - 1
    lines = []
    for row in [[column.header for column in columns], *cells]:
        parts = [_fit(cell, widths[i]) for i, cell in enumerate(row)]
        parts[last] = parts[last].rstrip()
        lines.append((" " * gap).join(parts).rstrip())
    return "\n".join(lines) + "\n"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


class _NoMatch(_LocalError):
    """An id or prefix that names nothing (exit 1, like NOT_FOUND)."""


def _resolve_id(
    text: str, kind: str, candidates: Callable[[], Iterable[str]], settle: float = 0.0
) -> str:
    """The one id rule: a full id is used as given; a prefix (the 8 characters tables show, or
    more) is looked up among `candidates()`, and must name exactly one. With `settle`, a
    prefix that names nothing is looked up again for that many seconds: lists are read
    models, which show what was just written a moment later (another process's `--detach`
    carries no consistency token here)."""
    wanted = text.strip().lower()
    if _FULL_ID.fullmatch(wanted):
        return wanted
    if not _ID_PREFIX.fullmatch(wanted):
        raise _NoMatch(f"NOT_FOUND: {text!r} is not a {kind} id or the start of one")
    deadline = time.monotonic() + settle
    matches = sorted({c for c in candidates() if c.startswith(wanted)})
    while not matches and time.monotonic() < deadline:
        time.sleep(0.2)
        matches = sorted({c for c in candidates() if c.startswith(wanted)})
    if not matches:
        raise _NoMatch(f"NOT_FOUND: no {kind} has an id starting with {text!r}")
    if len(matches) > 1:
        shown = ", ".join(m[: len(wanted) + 4] + "…" for m in matches[:_MAX_CANDIDATES_SHOWN])
        more = len(matches) - _MAX_CANDIDATES_SHOWN
        shown += f" and {more} more" if more > 0 else ""
        raise _NoMatch(f"{text!r} matches {len(matches)} {kind}s ({shown}); give more of the id")
    return matches[0]


def _lora_id(client: LoracleClient, text: str) -> str:
    return _resolve_id(
        text, "LoRA", lambda: (lora.id for lora in client.iter_loras(page_size=_PAGE))
    )


def _iter_generations(client: LoracleClient) -> Iterator[types_pb2.Generation]:
    token = ""
    while True:
        page = client.list_generations(page_size=_PAGE, page_token=token)
        yield from page.generations
        token = page.next_page_token
        if not token or not page.generations:
            return


def _generation_id(client: LoracleClient, text: str) -> str:
    return _resolve_id(
        text, "generation", lambda: (g.id for g in _iter_generations(client)), settle=3.0
    )


def _aggregate_id(client: LoracleClient, text: str) -> str:
    """A LoRA, generation or recommendation id: whatever the audit trail has events of."""
    return _resolve_id(
        text,
        "event aggregate",
        lambda: (e.aggregate_id for e in client.iter_events(page_size=_PAGE)),
    )


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
        kind=args.kind,
    )
    loras = list(islice(loras_iter, limit) if limit > 0 else loras_iter)
    if out.json_mode:
        out.json([_to_dict(lora) for lora in loras])
        return 0
    # The kind column only when there is something to tell apart (a catalog of LoRAs reads
    # as it always did).
    kinds = any(lora.kind == types_pb2.LORA_KIND_EMBEDDING for lora in loras)
    columns = [
        _Column("id"),
        _Column("name", shrink=True),
        *([_Column("kind")] if kinds else []),
        _Column("base model", shrink=True),
        _Column("available"),
        _Column("trigger words", shrink=True),
        _Column("tags", shrink=True),
    ]
    out.table(
        columns,
        (
            (
                out.id(lora.id),
                lora.name,
                *([_kind(lora.kind)] if kinds else []),
                _base_model(lora.base_model),
                _yes_no(lora.available),
                ", ".join(lora.trigger_words),
                ", ".join(lora.tags),
            )
            for lora in loras
        ),
    )
    if not loras:
        filtered = args.base_model or args.tag or args.available_only or args.kind
        out.note("no LoRA matches these filters" if filtered else "the catalog is empty")
    return 0


def _kind(kind: types_pb2.LoraKind.ValueType) -> str:
    """ "lora" or "embedding", as `--kind` takes them (an older server sends no kind: LoRAs)."""
    return "embedding" if kind == types_pb2.LORA_KIND_EMBEDDING else "lora"


def _show(lora: types_pb2.Lora, out: _Output) -> None:
    rows: list[tuple[str, str]] = [
        ("id", lora.id),
        ("name", lora.name),
        ("kind", _kind(lora.kind)),
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
    lora = client.get_lora(_lora_id(client, args.id))
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
    lora_id = _lora_id(client, args.id)
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
    lora = client.get_lora(_lora_id(client, args.id))
    response = client.delete_lora(lora.id)
    _settle(client, response.consistency_token)
    if out.json_mode:
        out.json({"id": lora.id, **_to_dict(response)})
    else:
        out.out.print(f"deleted {lora.id} {lora.name}")
    return 0


# --- recommendations -----------------------------------------------------------------------


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
    recs = list(response.recommendations)
    # A row that reads 0.00 looks like a match; unless asked for (--min-confidence), it is
    # left out and counted instead.
    weak = [] if args.min_confidence is not None else [r for r in recs if r.confidence < 0.005]
    shown = [r for r in recs if r not in weak]
    if shown:
        columns = [
            _Column("#"),
            _Column("id"),
            _Column("LoRA", shrink=True),
            _Column("confidence"),
            _Column("weight"),
            _Column("trigger words", shrink=True),
            _Column("why", shrink=True),
        ]
        out.table(
            columns,
            (
                (
                    str(rank),
                    out.id(rec.lora.id),
                    rec.lora.name,
                    f"{rec.confidence:.2f}",
                    f"{rec.weight:g}",
                    ", ".join(rec.trigger_words),
                    "; ".join(rec.reasons),
                )
                for rank, rec in enumerate(shown, start=1)
            ),
        )
        out.out.print(f"recommendation id: {response.recommendation_id}")
    else:
        out.out.print("no LoRA fits this prompt well enough")
    if weak:
        out.note(
            f"{len(weak)} more matched too weakly to show (confidence under 0.005); "
            "--min-confidence 0 shows them"
        )
    if not args.include_unavailable:
        left_out = _catalog_only(client, args.base_model)
        if left_out:
            out.note(
                f"{left_out} catalog-only LoRAs for {args.base_model} (no file on this "
                "server) were not considered; --include-unavailable considers them"
            )
    return 0


def _catalog_only(client: LoracleClient, base_model: str) -> int:
    """How many LoRAs for `base_model` have no file here (0 when ListLoras cannot tell, e.g.
    for a model name, which `recommend` accepts and ListLoras does not)."""
    try:
        everything = client.list_loras(base_model=base_model, page_size=1).total_size
        with_file = client.list_loras(
            base_model=base_model, available_only=True, page_size=1
        ).total_size
    except LoracleError:
        return 0
    return max(everything - with_file, 0)


def _cmd_search(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    response = client.search_loras(args.query, base_model=args.base_model, page_size=args.limit)
    if out.json_mode:
        out.json(_to_dict(response))
        return 0
    columns = [
        _Column("#"),
        _Column("id"),
        _Column("LoRA", shrink=True),
        _Column("score"),
        _Column("base model", shrink=True),
        _Column("why", shrink=True),
    ]
    out.table(
        columns,
        (
            (
                str(rank),
                out.id(hit.lora.id),
                hit.lora.name,
                f"{hit.score:.2f}",
                _base_model(hit.lora.base_model),
                "; ".join(hit.reasons),
            )
            for rank, hit in enumerate(response.results, start=1)
        ),
    )
    if not response.results:
        out.note("nothing in the catalog matches this query")
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


def _lora_choice(text: str) -> str:
    """Checks NAME[:WEIGHT]; the text is kept, so an error can quote the option as given."""
    _, colon, weight = text.rpartition(":")
    if colon:
        try:
            float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(
                "expected NAME or NAME:WEIGHT, e.g. pixel_art:0.8"
            ) from None
    return text


def _lora_selection(text: str) -> types_pb2.LoraSelection:
    name, colon, weight = text.rpartition(":")
    if not colon:
        return types_pb2.LoraSelection(lora=text)
    return types_pb2.LoraSelection(lora=name, weight=float(weight))


def _primed(events: Iterator[types_pb2.GenerationEvent]) -> Iterator[types_pb2.GenerationEvent]:
    """The stream with its first event already read, so a refusal is raised here."""
    first = next(events, None)
    return events if first is None else itertools.chain([first], events)


def _until_model_ready(call: Callable[[], _T], args: argparse.Namespace, out: _Output) -> _T:
    """Calls again while the server says the model is still loading (MODEL_NOT_READY with a
    retry delay); a model that is broken, or --no-wait, fails at once."""
    try:
        return call()
    except FailedPrecondition as err:
        if err.reason != "MODEL_NOT_READY" or err.retry_after is None or args.no_wait:
            raise
        first = err
    with out.waiting(f"waiting: {first.message} (--no-wait fails at once)"):
        delay = first.retry_after or 1.0
        while True:
            time.sleep(delay)
            try:
                return call()
            except FailedPrecondition as err:
                if err.reason != "MODEL_NOT_READY" or err.retry_after is None:
                    raise
                delay = err.retry_after or 1.0


def _cmd_generate(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    spec = types_pb2.GenerationSpec(
        prompt=args.prompt,
        model=args.model,
        negative_prompt=args.negative,
        steps=args.steps,
        num_images=args.images,
        scheduler=args.scheduler,
        loras=[_lora_selection(text) for text in args.lora],
    )
    if args.size:
        spec.width, spec.height = args.size
    if args.seed is not None:
        spec.seed = args.seed
    if args.guidance is not None:
        spec.guidance_scale = args.guidance
    if args.true_cfg is not None:
        spec.true_cfg_scale = args.true_cfg
    _image_options(client, args, spec)
    if args.detach:
        submitted = _until_model_ready(lambda: client.submit_generation(spec), args, out)
        if out.json_mode:
            out.json(_to_dict(submitted))
        else:
            out.out.print(
                f"submitted {submitted.generation_id} (queue position "
                f"{submitted.queue_position}); follow it with: loracle watch "
                f"{submitted.generation_id} -o {args.output}"
            )
        return 0
    events = _until_model_ready(lambda: _primed(client.generate_image(spec)), args, out)
    return _follow(events, args.output, out)


def _image_options(
    client: LoracleClient, args: argparse.Namespace, spec: types_pb2.GenerationSpec
) -> None:
    """img2img and inpainting: the init image from a file or an earlier generation, the
    mask from a file, and their settings."""
    if args.init_image is not None:
        spec.init_image.data = _read_image(args.init_image)
    elif args.init_from is not None:
        text, _, index = args.init_from.partition(":")
        spec.init_image.generated.generation_id = _generation_id(client, text)
        spec.init_image.generated.image_index = int(index or 0)
    if args.strength is not None:
        spec.strength = args.strength
    if args.mask is not None:
        spec.mask_image.data = _read_image(args.mask)
    if args.mask_blur is not None:
        spec.mask_blur = args.mask_blur
    spec.inpaint_only_masked = args.only_masked
    if args.padding is not None:
        spec.inpaint_padding = args.padding
    if args.hires is not None:
        spec.hires.scale = args.hires
        spec.hires.steps = args.hires_steps
        spec.hires.upscaler = args.hires_upscaler
        if args.denoise is not None:
            spec.hires.denoising_strength = args.denoise
    elif args.hires_steps or args.hires_upscaler or args.denoise is not None:
        raise _LocalError("--hires-steps, --hires-upscaler and --denoise need --hires")
    for name, path, scale in args.control:
        control = spec.controls.add(controlnet=name)
        control.image.data = _read_image(path)
        if scale is not None:
            control.conditioning_scale = scale


def _control_choice(text: str) -> tuple[str, str, float | None]:
    """NAME:IMAGE[:SCALE]; a path may hold colons, so a last part that is a number is the
    scale and the rest after the first colon the image."""
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:IMAGE[:SCALE]")
    path, _, last = rest.rpartition(":")
    if path:
        try:
            return name, path, float(last)
        except ValueError:
            pass
    return name, rest, None


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _LocalError(f"cannot read {path}: {exc.strerror or exc}") from None


def _scale(text: str) -> float:
    """An upscale factor, as A1111 users write it: 2, 2x, 1.5x."""
    try:
        return float(text.lower().removesuffix("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected a factor, e.g. 2x or 1.5") from None


def _image_reference(text: str) -> str:
    _, _, index = text.partition(":")
    if index and not index.isdigit():
        raise argparse.ArgumentTypeError("expected ID[:INDEX], e.g. 3f2a9c1e:0")
    return text


def _cmd_upscale(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    image = types_pb2.InputImage()
    if args.image is not None:
        image.data = _read_image(args.image)
    else:
        text, _, index = args.source.partition(":")
        image.generated.generation_id = _generation_id(client, text)
        image.generated.image_index = int(index or 0)
    suffix = Path(args.output).suffix.lower()
    output_format = _OUTPUT_FORMATS.get(suffix, types_pb2.IMAGE_FORMAT_PNG)
    events = client.upscale_image(image, args.model, scale=args.scale, output_format=output_format)
    return _follow(_primed(events), args.output, out)


# The encoding `loracle upscale` asks for, by the output file's extension (else PNG).
_OUTPUT_FORMATS = {
    ".jpg": types_pb2.IMAGE_FORMAT_JPEG,
    ".jpeg": types_pb2.IMAGE_FORMAT_JPEG,
    ".webp": types_pb2.IMAGE_FORMAT_WEBP,
}


def _cmd_watch(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    generation_id = _generation_id(client, args.generation_id)
    return _follow(client.watch_generation(generation_id), args.output, out)


def _cmd_cancel(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    response = client.cancel_generation(_generation_id(client, args.generation_id))
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
        if args.state is not None
        else types_pb2.GENERATION_STATE_UNSPECIFIED
    )
    page = client.list_generations(
        state=state, page_size=args.limit, all_owners=args.all, owner=args.owner
    )
    if out.json_mode:
        out.json([_to_dict(g) for g in page.generations])
        return 0
    # Listing everyone's, the table says whose each one is.
    owners = [_Column("owner")] if args.all else []
    columns = [
        _Column("id"),
        *owners,
        _Column("state"),
        _Column("created"),
        _Column("model", shrink=True),
        _Column("images"),
        _Column("prompt", shrink=True),
    ]
    out.table(
        columns,
        (
            (
                out.id(g.id),
                *([g.owner] if args.all else []),
                types_pb2.GenerationState.Name(g.state).removeprefix("GENERATION_STATE_").lower(),
                _time(g.create_time),
                g.spec.model,
                str(len(g.images)),
                g.spec.prompt,
            )
            for g in page.generations
        ),
    )
    if not page.generations:
        out.note(f"no {args.state} generations" if args.state else "no generations yet")
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
    listing = client.model_listing()
    if out.json_mode:
        out.json(_to_dict(listing))
        return 0
    columns = [
        _Column("name"),
        _Column("architecture"),
        _Column("ready"),
        _Column("dtype"),
        _Column("scheduler", shrink=True),
        _Column("path", shrink=True),
        _Column("note", shrink=True),
    ]
    out.table(
        columns,
        (
            (
                model.name,
                _architecture(model.architecture),
                _yes_no(model.ready),
                model.dtype,
                model.default_scheduler,
                model.path,
                model.error
                or ("placeholder (random weights)" if model.is_placeholder else "")
                or ("inpainting checkpoint" if model.inpainting else ""),
            )
            for model in listing.models
        ),
    )
    if listing.controlnets:
        sys.stdout.write("\nControlNets (--control NAME:IMAGE[:SCALE]):\n")
        out.table(
            [
                _Column("controlnet"),
                _Column("architecture"),
                _Column("ready"),
                _Column("path", shrink=True),
                _Column("note", shrink=True),
            ],
            (
                (
                    c.name,
                    _architecture(c.architecture),
                    _yes_no(c.ready),
                    c.path,
                    c.error,
                )
                for c in listing.controlnets
            ),
        )
    models = [u for u in listing.upscalers if u.path]
    if models:
        sys.stdout.write(
            "\nUpscaler models (--hires-upscaler NAME, loracle upscale --model NAME):\n"
        )
        out.table(
            [
                _Column("upscaler"),
                _Column("network"),
                _Column("scale"),
                _Column("ready"),
                _Column("path", shrink=True),
                _Column("note", shrink=True),
            ],
            (
                (
                    u.name,
                    u.architecture,
                    f"{u.scale}x" if u.scale else "",
                    _yes_no(u.ready),
                    u.path,
                    u.error,
                )
                for u in models
            ),
        )
    builtin = ", ".join(u.name for u in listing.upscalers if not u.path)
    if builtin:
        sys.stdout.write(f"\nBuilt-in hires upscalers (--hires-upscaler): {builtin}\n")
    return 0


def _cmd_events(client: LoracleClient, args: argparse.Namespace, out: _Output) -> int:
    aggregate = _aggregate_id(client, args.aggregate) if args.aggregate else ""
    events_iter = client.iter_events(
        aggregate_id=aggregate, type=args.type, principal=args.principal, page_size=_PAGE
    )
    if args.tail is not None:
        events = list(deque(events_iter, maxlen=args.tail))[::-1]  # newest first
    else:
        limit: int = args.limit
        events = list(islice(events_iter, limit) if limit > 0 else events_iter)
    if out.json_mode:
        out.json([_to_dict(event) for event in events])
    else:
        columns = [
            _Column("position"),
            _Column("time"),
            _Column("type"),
            _Column("aggregate"),
            _Column("principal", shrink=True),
        ]
        out.table(
            columns,
            (
                (
                    str(event.position),
                    _time(event.occur_time),
                    event.type,
                    out.id(event.aggregate_id),
                    event.principal,
                )
                for event in events
            ),
        )
    if not events:
        filtered = aggregate or args.type or args.principal
        out.note(_why_no_events(client, args, aggregate) if filtered else "no events yet")
    return 0


def _why_no_events(client: LoracleClient, args: argparse.Namespace, aggregate: str) -> str:
    if args.type:
        types = sorted({e.type for e in client.iter_events(page_size=_PAGE)})
        if args.type not in types:
            close = difflib.get_close_matches(args.type, types, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return (
                f"no event in the log has the type {args.type!r}; {hint}"
                f"types in the log: {', '.join(types) or 'none yet'}"
            )
    given = [
        f"--aggregate {aggregate}" if aggregate else "",
        f"--type {args.type}" if args.type else "",
        f"--principal {args.principal}" if args.principal else "",
    ]
    return f"no events match {' '.join(g for g in given if g)}"


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


def _version() -> str:
    try:
        return importlib.metadata.version("loracle")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def _add_global_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    """The options every command takes. The top-level parser sets their defaults; each
    command's parser has them again without defaults (SUPPRESS), so `loracle loras list
    --json` works as well as `loracle --json loras list` and neither overrides the other."""

    def add(*flags: str, default: Any = None, **kwargs: Any) -> None:
        parser.add_argument(
            *flags, default=default if with_defaults else argparse.SUPPRESS, **kwargs
        )

    add(
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get("LORACLE_SERVER") or DEFAULT_TARGET,
        help=f"server address (default: $LORACLE_SERVER or {DEFAULT_TARGET})",
    )
    add("--json", action="store_true", default=False, help="print JSON on stdout")
    add(
        "--wide",
        action="store_true",
        default=False,
        help="tables show whole ids and cells instead of fitting the terminal",
    )
    add(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("LORACLE_TOKEN") or None,
        help="bearer token (default: $LORACLE_TOKEN)",
    )
    add("--tls-ca", metavar="PEM", help="use TLS, trusting this CA bundle")
    add("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    add("--tls-key", metavar="PEM", help="client private key (mutual TLS)")
    add("--tls", action="store_true", default=False, help="use TLS with the system's CAs")
    add(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each call; 0 for none (default: 30)",
    )


_ID_HELP = "the id, or its first 8 characters as tables show them"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracle", description="Manage the Loracle LoRA catalog.")
    _add_global_options(parser, with_defaults=True)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, with_defaults=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: Any, name: str, help_text: str, handler: _Handler
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        sub.set_defaults(handler=handler)
        return sub

    loras = commands.add_parser("loras", help="manage the LoRA catalog")
    loras_commands = loras.add_subparsers(dest="loras_command", required=True, metavar="COMMAND")

    p = command(loras_commands, "import", "scan a directory under a LoRA root", _cmd_import)
    p.add_argument(
        "directory",
        metavar="DIR",
        nargs="?",
        default="",
        help="absolute, or relative to the first root (default: the whole root)",
    )

    p = command(
        loras_commands, "import-catalog", "import JSON Lines metadata records", _cmd_import_catalog
    )
    p.add_argument("file", metavar="FILE.jsonl", help="JSON Lines file, or - for stdin")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_CATALOG_BATCH_SIZE,
        metavar="N",
        help=f"records per request (default: {DEFAULT_CATALOG_BATCH_SIZE})",
    )

    p = command(loras_commands, "register", "register one .safetensors file", _cmd_register)
    p.add_argument("path", metavar="PATH", help="the file, under a LoRA root")

    p = command(loras_commands, "list", "list the catalog", _cmd_list)
    p.add_argument(
        "--base-model", default="", metavar="X", help="only LoRAs for this base model, e.g. SDXL"
    )
    p.add_argument("--tag", default="", metavar="T", help="only LoRAs with this tag")
    p.add_argument(
        "--available-only", action="store_true", help="only LoRAs with a file on the server"
    )
    p.add_argument(
        "--kind",
        choices=("lora", "embedding"),
        default="",
        help="only LoRAs, or only textual-inversion embeddings (default: both)",
    )
    p.add_argument(
        "--limit", type=_non_negative_int, default=50, metavar="N", help="at most N; 0 for all"
    )

    p = command(loras_commands, "show", "show one LoRA", _cmd_show)
    p.add_argument("id", metavar="ID", help=_ID_HELP)

    p = command(loras_commands, "update", "change editable fields", _cmd_update)
    p.add_argument("id", metavar="ID", help=_ID_HELP)
    p.add_argument("--name", help="the new name")
    p.add_argument(
        "--trigger-word",
        dest="trigger_words",
        action="append",
        metavar="WORD",
        help="replace the trigger words (repeatable)",
    )
    p.add_argument("--clear-trigger-words", action="store_true", help="remove every trigger word")
    p.add_argument(
        "--tag", dest="tags", action="append", metavar="TAG", help="replace the tags (repeatable)"
    )
    p.add_argument("--clear-tags", action="store_true", help="remove every tag")
    p.add_argument("--description", help="the new description")
    p.add_argument(
        "--preferred-weight", type=float, metavar="W", help="weight used when none is given"
    )

    p = command(loras_commands, "delete", "remove a LoRA from the catalog", _cmd_delete)
    p.add_argument("id", metavar="ID", help=_ID_HELP)

    p = command(commands, "recommend", "recommend LoRAs for a prompt", _cmd_recommend)
    p.add_argument("prompt", metavar="PROMPT", help="the prompt to find LoRAs for")
    p.add_argument("--base-model", required=True, metavar="X", help='e.g. "SD 1.5" or SDXL')
    p.add_argument(
        "--max", type=_positive_int, default=3, metavar="N", help="at most N LoRAs (default: 3)"
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="C",
        help="only LoRAs at or above this confidence, 0 to 1 (0 shows every match)",
    )
    p.add_argument(
        "--include-unavailable",
        action="store_true",
        help="also consider catalog-only LoRAs (no file on this server)",
    )

    p = command(commands, "generate", "generate an image", _cmd_generate)
    p.add_argument("prompt", metavar="PROMPT", help="what to draw; <lora:NAME:W> applies a LoRA")
    p.add_argument(
        "-o", "--output", default="out.png", metavar="FILE", help="where to write the image"
    )
    p.add_argument("--model", default="", metavar="NAME", help="base model (default: the first)")
    p.add_argument("--negative", default="", metavar="PROMPT", help="negative prompt")
    p.add_argument("--seed", type=int, help="seed (default: random); image i uses seed + i")
    p.add_argument(
        "--steps",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="denoising steps (default: the model's)",
    )
    p.add_argument("--size", type=_size, metavar="WxH", help="e.g. 512x512 (default: the model's)")
    p.add_argument(
        "--images", type=_positive_int, default=1, metavar="N", help="images to generate"
    )
    p.add_argument("--guidance", type=float, metavar="CFG", help="guidance scale, 0 to 30")
    p.add_argument(
        "--true-cfg",
        type=float,
        metavar="CFG",
        help="FLUX: true CFG with the negative prompt beside the distilled guidance, 1 to 30",
    )
    p.add_argument("--scheduler", default="", metavar="NAME", help="e.g. euler_a, dpmpp_2m")
    p.add_argument(
        "--lora",
        type=_lora_choice,
        action="append",
        default=[],
        metavar="NAME[:WEIGHT]",
        help="apply a catalogued LoRA (repeatable); <lora:NAME:W> in the prompt works too",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--init-image", metavar="FILE", help="img2img: start from this PNG, JPEG or WebP"
    )
    source.add_argument(
        "--init-from",
        type=_image_reference,
        metavar="ID[:INDEX]",
        help="img2img: start from an earlier generation's image (id or prefix; index 0)",
    )
    p.add_argument(
        "--strength",
        type=float,
        metavar="S",
        help="img2img: how much is noised again, above 0 to 1 (default 0.75)",
    )
    p.add_argument("--mask", metavar="FILE", help="inpaint: white is painted again, black kept")
    p.add_argument(
        "--mask-blur",
        type=_non_negative_int,
        metavar="PX",
        help="inpaint: blur of the mask's edge in pixels (default 4)",
    )
    p.add_argument(
        "--only-masked",
        action="store_true",
        help="inpaint: paint only the masked region at --size, pasted back (A1111's only masked)",
    )
    p.add_argument(
        "--padding",
        type=_non_negative_int,
        metavar="PX",
        help="with --only-masked: context around the region in pixels (default 32)",
    )
    p.add_argument(
        "--hires",
        type=_scale,
        metavar="FACTOR",
        help="hires fix: upscale the first pass by FACTOR (e.g. 2x) and paint it again",
    )
    p.add_argument(
        "--hires-steps",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="hires fix: steps of the second pass (default: --steps)",
    )
    p.add_argument(
        "--denoise",
        type=float,
        metavar="S",
        help="hires fix: denoising strength of the second pass (default 0.7)",
    )
    p.add_argument(
        "--hires-upscaler",
        default="",
        metavar="NAME",
        help='hires fix: "Latent" (default), "Latent (bicubic)", ..., "Lanczos", "Nearest"',
    )
    p.add_argument(
        "--control",
        type=_control_choice,
        action="append",
        default=[],
        metavar="NAME:IMAGE[:SCALE]",
        help="ControlNet NAME guided by the control image IMAGE (already preprocessed: edges, "
        "depth...), weight SCALE from 0 to 2 (default 1); repeatable",
    )
    p.add_argument(
        "--detach", action="store_true", help="submit and print the id instead of waiting"
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once if the model is still loading (default: wait for it)",
    )

    p = command(commands, "upscale", "make an image larger with an upscaler", _cmd_upscale)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("image", nargs="?", metavar="IMAGE", help="a PNG, JPEG or WebP file")
    source.add_argument(
        "--from",
        dest="source",
        type=_image_reference,
        metavar="ID[:INDEX]",
        help="an earlier generation's image instead of a file (id or prefix; index 0)",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME",
        help="a configured upscaler model (loracle models lists them), or Lanczos / Nearest",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=0.0,
        metavar="S",
        help="the factor, above 1 to 8 (default: the model's own; 2 for Lanczos / Nearest)",
    )
    p.add_argument(
        "-o",
        "--output",
        default="upscaled.png",
        metavar="FILE",
        help="where to write it (.jpg/.webp ask for that encoding; default PNG)",
    )

    p = command(commands, "watch", "follow a generation (from any connection)", _cmd_watch)
    p.add_argument("generation_id", metavar="ID", help=_ID_HELP)
    p.add_argument(
        "-o", "--output", default="out.png", metavar="FILE", help="where to write the image"
    )

    p = command(commands, "cancel", "cancel a queued or running generation", _cmd_cancel)
    p.add_argument("generation_id", metavar="ID", help=_ID_HELP)

    p = command(commands, "generations", "list generations, newest first", _cmd_generations)
    p.add_argument(
        "--state",
        choices=["queued", "running", "succeeded", "failed", "cancelled"],
        help="only generations in this state (default: all)",
    )
    p.add_argument(
        "--limit", type=_positive_int, default=20, metavar="N", help="at most N (default: 20)"
    )
    whose = p.add_mutually_exclusive_group()
    whose.add_argument(
        "--all",
        action="store_true",
        help="every principal's generations, with an OWNER column (needs the admin scope)",
    )
    whose.add_argument(
        "--owner",
        default="",
        metavar="NAME",
        help="only this principal's generations (another's needs the admin scope)",
    )

    p = command(commands, "search", "search the catalog", _cmd_search)
    p.add_argument("query", metavar="QUERY", help="words to look for")
    p.add_argument("--base-model", default="", metavar="X", help="only LoRAs for this base model")
    p.add_argument(
        "--limit", type=_positive_int, default=20, metavar="N", help="at most N (default: 20)"
    )

    command(commands, "models", "list the configured base models", _cmd_models)

    p = command(commands, "events", "show the audit trail (oldest first, or --tail)", _cmd_events)
    p.add_argument(
        "--aggregate",
        default="",
        metavar="ID",
        help="only this LoRA, generation or recommendation: " + _ID_HELP,
    )
    p.add_argument(
        "--type", default="", metavar="T", help="only this event type, e.g. LoraRegistered"
    )
    p.add_argument(
        "--principal", default="", metavar="P", help="only events caused by this principal"
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--limit",
        type=_non_negative_int,
        default=50,
        metavar="N",
        help="the oldest N (default: 50); 0 for all",
    )
    shown.add_argument(
        "--tail", type=_positive_int, metavar="N", help="the newest N instead, newest first"
    )
    return parser


# Request fields in the CLI's terms: an option (or argument) and how to show its value.
_FIELDS: dict[str, tuple[str, str | None]] = {
    # field: (option or METAVAR, the attribute holding its value, None for none shown)
    "spec.prompt": ("PROMPT", None),
    "spec.negative_prompt": ("--negative", None),
    "spec.model": ("--model", "model"),
    "spec.width": ("--size", "size"),
    "spec.height": ("--size", "size"),
    "spec.steps": ("--steps", "steps"),
    "spec.guidance_scale": ("--guidance", "guidance"),
    "spec.true_cfg_scale": ("--true-cfg", "true_cfg"),
    "spec.num_images": ("--images", "images"),
    "spec.seed": ("--seed", "seed"),
    "spec.scheduler": ("--scheduler", "scheduler"),
    "spec.loras": ("--lora", None),
    "prompt": ("PROMPT", None),
    "base_model": ("--base-model", "base_model"),
    "max_loras": ("--max", "max"),
    "min_confidence": ("--min-confidence", "min_confidence"),
    "path": ("PATH", None),
    "query": ("QUERY", None),
    "page_size": ("--limit", "limit"),
    "lora.name": ("--name", "name"),
    "lora.description": ("--description", None),
    "lora.tags": ("--tag", None),
    "lora.trigger_words": ("--trigger-word", None),
    "lora.preferred_weight": ("--preferred-weight", "preferred_weight"),
    "aggregate_id": ("--aggregate", "aggregate"),
    "type": ("--type", "type"),
    "principal": ("--principal", "principal"),
}
_SUB_FIELDS = {"spec.width": "width", "spec.height": "height"}
_LORA_FIELD = re.compile(r"spec\.loras\[(\d+)\]\.(\w+)")
_BARE_DESCRIPTION = re.compile(r"(a|an|from|one of|at most|between|in) ")


def _option_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return str(value)


def _violation(field: str, description: str, args: argparse.Namespace) -> str:
    """One violation as the user typed it: `--size 7x7: width must be a multiple of 8 …`."""
    sentence = f"must be {description}" if _BARE_DESCRIPTION.match(description) else description
    lora = _LORA_FIELD.fullmatch(field)
    if lora and int(lora.group(1)) < len(getattr(args, "lora", [])):
        return f"--lora {args.lora[int(lora.group(1))]}: {lora.group(2)} {sentence}"
    if field not in _FIELDS:
        return f"{field}: {sentence}"
    option, attribute = _FIELDS[field]
    value = getattr(args, attribute, None) if attribute else None
    shown = f"{option} {_option_value(value)}" if value not in (None, "") else option
    label = _SUB_FIELDS.get(field, "")
    return f"{shown}: {label} {sentence}" if label else f"{shown}: {sentence}"


def _report(err: LoracleError, args: argparse.Namespace) -> None:
    if err.code == grpc.StatusCode.UNAVAILABLE and not err.reason:
        # No ErrorInfo: the channel failed, not the server's logic.
        print(
            f"error: UNAVAILABLE: the server at {args.server} could not be reached ({err.message})",
            file=sys.stderr,
        )
        return
    if err.field_violations:
        # The violations are the message: each once, in the options' names.
        for field, description in err.field_violations:
            print(f"error: {_violation(field, description, args)}", file=sys.stderr)
    else:
        print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
    if err.correlation_id and err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        # Only where the user has something to quote: the server's log has the rest.
        print(f"  correlation id: {err.correlation_id}", file=sys.stderr)
    if err.retry_after is not None:
        print(f"  retry after {err.retry_after:g}s", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else _EXIT_USAGE
    handler: _Handler = args.handler
    out = _Output(
        json_mode=args.json,
        out=Console(markup=False, highlight=False, soft_wrap=True),  # commands stay whole
        err=Console(stderr=True, markup=False, highlight=False),
        wide=args.wide,
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
        _report(err, args)
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
