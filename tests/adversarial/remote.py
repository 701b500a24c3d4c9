"""An executor in a process of its own, driven over stdin/stdout by
tests/test_sandbox_adversarial.py: so that the suite runs the sandbox as root and as an
unprivileged user (started by the test through unshare + setpriv) alike, with a terminal as the
executor's controlling terminal. One JSON request a line in, one JSON answer a line out.

    python remote.py WORKERS CACHE_DIR

Requests: {"op": "run", "jobs": [{"language", "source", "tests": [[input, output], ...],
"limits": {...}, "compare"}]} -> {"results": [[result, ...], ...]} (or {"error": ...});
{"op": "info"} -> capabilities, worker pids, restarts, the executor's directory.
Written against the executor's oldest public API too, so that the suite can be pointed at an
older checkout (PYTHONPATH) to show each hole there.
"""

from __future__ import annotations

import json
import sys
import traceback

from rlef_hpc.sandbox import Executor, Job, Limits, TestCase


def main() -> None:
    workers, cache_dir = int(sys.argv[1]), sys.argv[2]
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing printed by accident may corrupt the channel
    with Executor(workers=workers, cache_dir=cache_dir) as ex:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                answer = serve(ex, request)
            except Exception:  # noqa: BLE001 - the test reports it
                answer = {"error": traceback.format_exc()}
            out.write(json.dumps(answer) + "\n")
            out.flush()


def serve(ex: Executor, request: dict) -> dict:
    if request["op"] == "info":
        return {
            "capabilities": {k: v for k, v in ex.capabilities.items() if k != "kernel"},
            "worker_pids": ex.worker_pids(),
            "worker_restarts": getattr(ex, "worker_restarts", None),
            "root": ex._root,
            "uid": __import__("os").getuid(),
        }
    jobs = [
        Job.build(
            j["language"],
            j["source"],
            [TestCase(i, o) for i, o in j["tests"]],
            Limits(**j.get("limits", {})),
            compare=j.get("compare", "tokens"),
        )
        for j in request["jobs"]
    ]
    results = ex.run_many(jobs)
    return {"results": [[r.to_json() for r in rs] for rs in results]}


if __name__ == "__main__":
    main()
