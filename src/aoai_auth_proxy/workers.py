"""PROXY_WORKERS: several proxy processes on one port (SO_REUSEPORT), under one supervisor.

For the shared-gateway deployment, where one process (one core) is not enough. Each worker is
a whole proxy: its own listener on the shared port (the kernel spreads connections over the
listeners), its own token source and upstream pool; nothing is shared, so a worker's failure
is its own. Metrics and probes on PROXY_ADMIN_PORT are per worker (the admin port is shared
the same way): scrape them as a sample, or run one worker per pod and scale pods instead.

The supervisor, like gunicorn's arbiter but simpler: it forks the workers before any event
loop or thread exists, passes SIGTERM/SIGINT on to them, and exits when they have all exited.
A worker that exits on its own (a bind error, a crash) stops the others and the supervisor
exits 1, so the orchestrator restarts the whole process rather than run it half-sized.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("aoai_auth_proxy")


def supervise(count: int, run_worker: Callable[[int], int]) -> int:
    """Fork `count` workers running `run_worker(index)`; return the exit code for them all."""
    stopping = False
    children: dict[int, int] = {}

    def pass_on(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _kill(pid, signum)

    # Installed before the first fork: a signal that arrives meanwhile still reaches every
    # worker started so far.
    signal.signal(signal.SIGTERM, pass_on)
    signal.signal(signal.SIGINT, pass_on)
    for index in range(count):
        if stopping:
            break
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                code = run_worker(index)
            finally:
                logging.shutdown()  # os._exit runs no atexit hooks: flush the log here
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index
    log.info("supervising %d workers: %s", len(children), ", ".join(map(str, children)))
    exit_code = 0
    while children:
        pid, status = os.wait()
        if pid not in children:
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if not stopping:
            log.error("worker %d (pid %d) exited with %d: stopping the others", index, pid, code)
            stopping = True
            exit_code = 1
            for other in children:
                _kill(other, signal.SIGTERM)
        elif code != 0:
            exit_code = code if code > 0 else 1
    return exit_code


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited already: os.wait() reports it
        os.kill(pid, signum)
