"""``python -m olmocr.cluster.port_block``: the ports of one scheduler task, as shell assignments.

Several tasks of one array (or of several jobs) can land on the same node, and each runs its own vLLM
server(s), status service and pipeline metrics endpoint: they must never ask for the same port. A task takes a
*block* of ``BLOCK`` consecutive ports below Linux's ephemeral range (which outgoing connections use), at a slot
derived from its job id, and moves to the next slot while any port of the block is taken. Deriving the slot
from the id keeps tasks that start in the same second (an array's tasks do) away from each other, where "take
any free port" would race; checking that the ports are free covers other jobs' tasks and everything else.

Within a block: the servers take ``OLMOCR_PORT`` and the ports after it (one per GPU, see docs/slurm.md), the
pipeline's metrics ``BLOCK - 2`` and the status service ``BLOCK - 1``.

Prints ``OLMOCR_PORT=P OLMOCR_STATUS_PORT=S OLMOCR_METRICS_PORT=M`` (for ``eval``); exit 1 with one line when
no block is free.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence

#: Ports per task: room for up to 14 servers (GPUs) plus the pipeline's metrics and the status service.
BLOCK = 16
#: The blocks lie in [FLOOR, CEILING): under Linux's default ephemeral range (32768-60999).
FLOOR = 20000
CEILING = 32752


def slot_starts(seed: int, block: int = BLOCK, floor: int = FLOOR, ceiling: int = CEILING) -> Iterator[int]:
    """First ports of the blocks to try, starting at the slot ``seed`` picks and wrapping round once."""
    slots = (ceiling - floor) // block
    if slots < 1:
        raise ValueError(f"no room for a block of {block} ports in {floor}-{ceiling}")
    first = seed % slots
    for i in range(slots):
        yield floor + ((first + i) % slots) * block


def choose_block(seed: int, needed: int, is_free: Callable[[int], bool], block: int = BLOCK,
                 floor: int = FLOOR, ceiling: int = CEILING) -> int | None:
    """The first port of the first block (from ``seed``'s slot on) whose first ``needed`` ports and last two
    (metrics, status) are all free; None when there is none."""
    if needed > block - 2:
        raise ValueError(f"{needed} servers do not fit a block of {block} ports (at most {block - 2})")
    for start in slot_starts(seed, block, floor, ceiling):
        ports = [*range(start, start + needed), start + block - 2, start + block - 1]
        if all(is_free(p) for p in ports):
            return start
    return None


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now (on every address, as vLLM with --host 0.0.0.0 would)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do (uvicorn, aiohttp): a port held only by connections in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def default_seed(env: dict[str, str]) -> int:
    """The task's own job id (each array task has one), else the process id (outside Slurm)."""
    for name in ("SLURM_JOB_ID", "SLURM_JOBID"):
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return os.getpid()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m olmocr.cluster.port_block",
                                     description="Choose free ports for one task's servers, status service "
                                                 "and pipeline metrics; prints shell assignments.")
    parser.add_argument("--servers", type=int, default=1, help="servers (one per GPU) that need a port (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="slot seed (default $SLURM_JOB_ID)")
    args = parser.parse_args(argv)
    if not 1 <= args.servers <= BLOCK - 2:
        parser.error(f"--servers must be 1-{BLOCK - 2}")
    seed = default_seed(dict(os.environ)) if args.seed is None else args.seed
    start = choose_block(seed, args.servers, port_is_free)
    if start is None:
        print(f"olmocr.cluster.port_block: no free block of {BLOCK} ports in {FLOOR}-{CEILING} on this node; "
              "stop what holds them or set OLMOCR_PORT, OLMOCR_STATUS_PORT and OLMOCR_METRICS_PORT", file=sys.stderr)
        return 1
    print(f"OLMOCR_PORT={start} OLMOCR_STATUS_PORT={start + BLOCK - 1} OLMOCR_METRICS_PORT={start + BLOCK - 2}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
