"""Reading the JSON Lines catalog format accepted by `import_lora_catalog`.

One JSON object per line with the keys source_id, name, base_model, tags, trigger_words,
file_name, description, downloads; blank lines are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["parse_catalog_lines", "read_catalog_jsonl"]


def parse_catalog_lines(lines: Iterable[str], source: str = "<input>") -> Iterator[dict[str, Any]]:
    """Yields one dict per non-blank line; a malformed line raises ValueError with its number."""
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number}: invalid JSON: {exc.msg}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{source}:{number}: expected a JSON object")
        yield value


def read_catalog_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        yield from parse_catalog_lines(handle, os.fspath(path))
