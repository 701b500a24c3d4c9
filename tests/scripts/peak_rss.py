"""For the scripts that measure memory (importable: torchrun_command puts this folder on the
path): the peak resident memory a block adds, as the kernel counts it (VmHWM, reset through
/proc/self/clear_refs on entry). It sees every allocation, torch's included, and every mapped
page of a file, unlike tracemalloc."""

from __future__ import annotations

import re
from pathlib import Path


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


class PeakRSS:
    """with PeakRSS() as peak: ...; then peak.bytes: the most the block held above its start."""

    bytes = 0

    def __enter__(self) -> PeakRSS:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = (_status_kib("VmHWM") - self.before) << 10
