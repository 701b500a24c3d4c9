"""What this kernel offers a sandbox, whether or not the sandbox uses it: reported with
`sandbox.capabilities()` under "kernel", so that a log says what a machine could have given."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rlef_hpc.sandbox import _executor


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cgroup_controllers() -> tuple[list[str], list[str]]:
    """(cgroup v1 controllers mounted, controllers the cgroup v2 hierarchy offers)."""
    v1: set[str] = set()
    v2: list[str] = []
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if " - " not in line:
            continue
        after = line.split(" - ", 1)[1].split()
        fstype, options = after[0], after[2] if len(after) > 2 else ""
        if fstype == "cgroup":
            v1.update(o for o in options.split(",") if o not in ("rw", "ro") and "=" not in o)
        elif fstype == "cgroup2" and not v2:
            v2 = (_read(os.path.join(fields[4], "cgroup.controllers")) or "").split()
    return sorted(v1), v2


def kernel_facts() -> dict[str, Any]:
    v1, v2 = cgroup_controllers()
    max_userns = _read("/proc/sys/user/max_user_namespaces")
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")  # Debian's switch, where it exists
    return {
        "release": os.uname().release,
        "cgroup_v1": v1,
        "cgroup_v2": v2,
        "landlock_abi": _executor.landlock_abi(),
        "seccomp": _executor.seccomp_available(),
        "user_namespaces": max_userns not in (None, "0") and clone != "0",
        "legacy_tiocsti": _read("/proc/sys/dev/tty/legacy_tiocsti"),
    }
