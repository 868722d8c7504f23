"""Spawned benchmark processes die with the harness that spawned them.

multiprocessing terminates its children only when the parent exits normally. A harness killed
by SIGKILL (or a CI timeout) left its spawned Faust worker running, still trying to reach its
dead broker, and competing for the 2 cores with the next benchmark (seen in issue 8's runs).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Call first thing in a spawned child: SIGKILL this process when its parent dies.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. The signal follows the parent
    *thread* that started the child, so start such children from a thread that outlives them
    (the harnesses start them from their main thread)."""
    parent = multiprocessing.parent_process()
    if not sys.platform.startswith("linux") or parent is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)
