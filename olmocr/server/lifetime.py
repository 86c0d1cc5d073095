"""Tie a child process's life to its parent's (Linux ``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent_pid: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, even by SIGKILL.

    Call it in the child (a ``preexec_fn`` or a pool initializer); ``parent_pid`` is the parent it
    expects, so a parent that died before the call took effect is noticed too. Not Linux: no-op
    (Ctrl+C and SIGTERM still stop everything in order).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
