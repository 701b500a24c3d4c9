"""A sandbox server: the long-lived process that runs one executor worker's tests.

Started by `Executor` as `python -I -m rlef_hpc.sandbox.server CONFIG` from a clean environment
(never forked from the trainer). It isolates itself once (isolation.py), warms the interpreter
that Python tests fork from (child.py), and then serves requests over a pipe (protocol.py): per
test a fork of this warm interpreter (Python) or a vfork+exec of a cached binary (C++, see
programs.py), supervised from outside (runner.py).
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import traceback

from rlef_hpc.sandbox import child
from rlef_hpc.sandbox.isolation import set_up
from rlef_hpc.sandbox.programs import Programs
from rlef_hpc.sandbox.protocol import (
    DONE,
    ERROR,
    EXIT,
    FATAL,
    HELLO,
    RUN,
    STOP,
    TO_SERVER,
    Done,
    Failure,
    Hello,
    ProtocolError,
    ServerConfig,
    check_keys,
    read_message,
    write_frame,
)
from rlef_hpc.sandbox.runner import Runner, SandboxSetupError


def main() -> None:
    config: ServerConfig = json.loads(sys.argv[1])
    check_keys(config, ServerConfig)
    # The executor's channel moves off stdin/stdout so that nothing printed by accident (or by
    # a test, whose stdio are its own pipes) can corrupt it.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # The executor owns this process's life (end of the channel ends it): the SIGTERM/SIGUSR1/
    # SIGUSR2 that Slurm sends to every process of a job step must not take it away from a
    # trainer that is finishing its iteration before it checkpoints.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)

    sandbox = set_up(config)
    child.preload()
    runner = Runner(sandbox, Programs(sandbox))
    child.prepare_stdio()
    gc.freeze()  # a collection in a test's process would touch (and copy) every page
    runner.measure_baseline()
    write_frame(wfd, Hello(type=HELLO, capabilities=sandbox.capabilities))
    runner.ensure_spare()
    job = None

    def stop_requested() -> bool:
        while select.select([rfd], [], [], 0)[0]:
            message = read_message(rfd, TO_SERVER)
            if message is None or message["type"] == EXIT:
                sys.exit(0)
            if message["type"] == STOP and message["job"] == job:
                return True
        return False

    while True:
        try:
            req = read_message(rfd, TO_SERVER)
        except ProtocolError:  # the executor's bug: fail this request, keep serving
            write_frame(wfd, Failure(type=ERROR, message=traceback.format_exc()))
            continue
        if req is None or req["type"] == EXIT:
            return
        if req["type"] != RUN:
            continue  # a stop for a job that already finished
        job = req["job"]
        try:
            runner.run_job(req, lambda report: write_frame(wfd, report), stop_requested)
            write_frame(wfd, Done(type=DONE))
            if req["language"] == "python":  # the next job is likely Python too: be ready
                runner.ensure_spare()
        except SandboxSetupError as e:
            write_frame(wfd, Failure(type=FATAL, message=str(e)))
            raise
        except Exception:  # noqa: BLE001 - the job fails, the server keeps serving
            write_frame(wfd, Failure(type=ERROR, message=traceback.format_exc()))


if __name__ == "__main__":
    main()
