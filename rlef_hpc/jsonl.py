"""JSON lines, read the one way every input file of this project is read: blank lines
skipped, each record's place ("file:line") given with it, a broken line named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonLinesError(ValueError):
    """A file that cannot be read, or a line that is not JSON; the message says which."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line of `path`."""
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below, after the last yield
    except OSError as e:
        raise JsonLinesError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise JsonLinesError(f"{where}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise JsonLinesError(f"cannot read {path}: not UTF-8 ({e.reason})") from None
