"""A sandbox server: the long-lived process that runs one executor worker's tests.

Started by `Executor` as `python -I -m rlef_hpc.sandbox.server CONFIG` from a clean environment
(never forked from the trainer), in a session of its own. It isolates itself once
(isolation.py), warms the interpreter, forks the template that every Python test's process is
forked from (child.py), and then serves requests over a pipe (protocol.py): per test a fork of
the template (Python) or a vfork+exec of a cached binary (C++, see programs.py), supervised from
outside (runner.py). Any failure of the sandbox itself ends the server (FATAL): the executor
starts a fresh one rather than trust this one with another test.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import traceback

from rlef_hpc.sandbox import _executor, child
from rlef_hpc.sandbox.isolation import set_up
from rlef_hpc.sandbox.programs import Programs
from rlef_hpc.sandbox.protocol import (
    DONE,
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
from rlef_hpc.sandbox.runner import Runner


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
    # The template, before any job: it never holds a test's input, a solution or an output.
    if _executor.start_template() == 0:
        child.run_template()
    runner.template_started()
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
        except (ProtocolError, ValueError, EOFError, TypeError):
            # The channel is out of step: nothing read from it can be trusted any more.
            write_frame(wfd, Failure(type=FATAL, message=traceback.format_exc()))
            raise
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
        except BaseException:
            # Any failure on a job ends this server: whatever state it left (a half-cleared
            # /tmp, a spare in an unknown state, unread output) must not reach the next test.
            # The executor starts a fresh one.
            write_frame(wfd, Failure(type=FATAL, message=traceback.format_exc()))
            raise


if __name__ == "__main__":
    main()
