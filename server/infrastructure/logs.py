"""Logging set-up: the familiar text lines, or one JSON object per line for log shippers.

JSON lines carry the ids of the dispatch being handled (correlation_id, request_id,
principal) and the RPC method, so a correlation id quoted from an error's ErrorInfo finds
its log lines. Lines logged outside a dispatch (the audit and error lines, logged around it)
name their ids in the text as `key=value`; those are lifted into the fields."""

from __future__ import annotations

import contextvars
import faulthandler
import json
import logging
import re
import signal
import sys
from datetime import UTC, datetime

from server.application.context import SYSTEM_CONTEXT, current_context
from server.infrastructure.diffusion.runtime import quiet_libraries

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
CONTEXT_FIELDS = ("correlation_id", "request_id", "principal", "method")

# The RPC being handled; set by the transport's interceptor.
rpc_method: contextvars.ContextVar[str] = contextvars.ContextVar("loracle_rpc_method", default="")

_KEY_VALUE = re.compile(r"\b(correlation_id|request_id|principal)=([^\s,;]+)")


class ContextFilter(logging.Filter):
    """Stamps each record with the current dispatch's ids and the RPC method, when known.
    Runs on the emitting thread, where the context variables are the caller's."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, str] = {}
        ctx = current_context()
        if ctx is not SYSTEM_CONTEXT:
            fields = {
                "correlation_id": ctx.correlation_id,
                "request_id": ctx.request_id,
                "principal": ctx.principal,
            }
        else:
            try:
                fields = dict(_KEY_VALUE.findall(record.getMessage()))
            except Exception:  # bad format arguments: the handler reports those
                fields = {}
        fields["method"] = rpc_method.get()
        for name, value in fields.items():
            if value and not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the context
    fields that are present, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, "")
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Replaces the root handlers with one stderr handler in the chosen format."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.addFilter(ContextFilter())
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Every call writes an audit line, and neither format shows where a record was made,
    # by which thread or process: the logging HOWTO's "Optimization" switches, so a record
    # no longer walks the stack (findCaller) or asks for the thread and process on each call.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    quiet_libraries(verbose=level.upper() == "DEBUG")
    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 PID` writes every thread's stack to stderr and the process goes on:
        # the way to see where a stuck request or worker waits, without a debugger.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
