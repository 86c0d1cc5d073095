"""Is a TCP port free, and if not, who holds it? One line for a taken port, before anything is started.

Used by the manager, the wrapper (so every supervisord program checks its port before starting vLLM),
internal mode and the demo; the health listener uses :func:`listening_pids` to make sure the program on its
port is the one it supervises, not a stranger answering there.

The owner comes from psutil (``/proc/net/tcp`` and ``/proc/*/fd`` on Linux): the pid and command line of the
process listening on the port, when this user may see it.
"""

from __future__ import annotations

import errno
import socket


def port_taken(host: str, port: int) -> bool:
    """True when nothing can listen on ``host:port`` now (another program holds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not count
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def listening_pids(port: int) -> set[int] | None:
    """Pids of the processes listening on TCP ``port`` (any address); None when this user cannot tell."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError, OSError):
        return None
    return {c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def describe_pid(pid: int) -> str:
    """``pid 123 (python3 -m http.server 8000)``, or ``pid 123`` when its command line cannot be read."""
    import psutil

    try:
        cmdline = " ".join(" ".join(psutil.Process(pid).cmdline()).split())[:120]
    except psutil.Error:
        cmdline = ""
    return f"pid {pid} ({cmdline})" if cmdline else f"pid {pid}"


def port_owner(port: int) -> str | None:
    """Who listens on ``port`` (see :func:`describe_pid`), or None when unknown."""
    pids = listening_pids(port)
    if not pids:
        return None
    return ", ".join(describe_pid(pid) for pid in sorted(pids))


def port_problem(host: str, port: int, what: str, fix: str) -> str | None:
    """One line when ``host:port`` is taken: names the port, the owner where it can be known, and ``fix``;
    None when it is free."""
    if not port_taken(host, port):
        return None
    owner = port_owner(port)
    return (f"port {port} on {host} ({what}) is already in use"
            + (f" by {owner}" if owner else " by another program (its owner is not visible to this user)")
            + f": {fix}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    """``python -m olmocr.port_owner pick DEFAULT`` prints DEFAULT if it is free, else a free port;
    ``python -m olmocr.port_owner check PORT WHAT FIX`` prints PORT if it is free, else the one line (exit 2)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "pick":
        port = int(args[1])
        print(port if not port_taken("127.0.0.1", port) else free_port())
        return 0
    if len(args) == 4 and args[0] == "check":
        port = int(args[1])
        problem = port_problem("127.0.0.1", port, args[2], args[3])
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        print(port)
        return 0
    print("usage: python -m olmocr.port_owner pick DEFAULT | check PORT WHAT FIX", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
