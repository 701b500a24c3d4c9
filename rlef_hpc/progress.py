"""Progress of a long phase (episodes, the update, the warm start, sandbox jobs): a tqdm bar on
a terminal; elsewhere (a file, a pipe: `make run | tee`, Slurm's output files) one plain line
when the phase ends, since a bar's carriage-return frames would fill the file."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any


class LineProgress:
    """tqdm's interface as the product uses it (iterate, update, set_postfix, close, with),
    reporting once: `desc: n/total unit in Ns (postfix)`."""

    def __init__(
        self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
        unit: str = "it",
    ) -> None:  # fmt: skip
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.postfix, self.closed = 0, "", False
        self.start = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        total = f"/{self.total}" if self.total is not None else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        seconds = time.monotonic() - self.start
        print(f"{self.desc}: {self.n}{total} {self.unit} in {seconds:.1f}s{extra}",
              file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str, unit: str
) -> Any:
    """A tqdm bar where stderr is a terminal, else a LineProgress."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit)
    return LineProgress(iterable, total, desc, unit)
