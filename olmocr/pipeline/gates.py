"""A semaphore whose urgent waiters go first: interactive pages before queued batch pages at every gate.

The pipeline queues its pages at three gates: a page slot (pages in flight), a request slot (the fleet's
cap on concurrent requests) and a render-pool turn. A batch keeps every gate full. With FIFO gates an
olmocr-service job's page waited behind the batch pages queued before it, at each gate in turn; with
these, it waits only for the first slot to come free (measured: bench/service.py, "a one-page job during a
batch").
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

#: Slots interactive pages may take beyond a full page-slot or request-slot gate (PriorityGate's reserve), at
#: most: 16 beyond the default 1,600 requests.
INTERACTIVE_RESERVE = 16


def interactive_reserve(cap: int) -> int:
    """The reserve of a gate of ``cap`` slots: 1 % of it, at most :data:`INTERACTIVE_RESERVE`. A cap a user
    set small (``--max_concurrent_requests 1`` for a provider's quota) is never exceeded."""
    return min(INTERACTIVE_RESERVE, cap // 100)


class PriorityGate:
    """``asyncio.Semaphore``'s ``acquire``/``release``/``async with``, where a waiter for which ``urgent()``
    is true when it starts waiting goes before every waiter for which it is false (FIFO within each).

    ``hold()``: while true, only urgent waiters get a slot (the others wait, even for a free one); call
    :meth:`resume` when it turns false.

    ``reserve``: urgent waiters may take up to this many slots beyond ``value`` when none is free, so that an
    interactive page never waits for a batch page to finish (the server, which schedules by priority, is
    where it should queue). A borrowed slot is paid back before a batch waiter gets one."""

    def __init__(self, value: int, urgent: Callable[[], bool] = lambda: False,
                 hold: Callable[[], bool] = lambda: False, reserve: int = 0) -> None:
        if value < 1:
            raise ValueError(f"a gate needs at least one slot, not {value}")
        self._value = value
        self._urgent = urgent
        self._hold = hold
        self._reserve = reserve
        self._borrowed = 0
        self._waiters: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (deque(), deque())

    def locked(self) -> bool:
        return self._value == 0

    @property
    def waiting(self) -> int:
        return sum(1 for q in self._waiters for f in q if not f.done())

    async def acquire(self) -> bool:
        urgent = self._urgent()
        if self._value > 0 and not self._live(0) and (urgent or (not self._live(1) and not self._hold())):
            self._value -= 1
            return True
        if urgent and self._borrowed < self._reserve:
            self._borrowed += 1
            return True
        queue = self._waiters[0 if urgent else 1]
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # given the slot, then cancelled: pass it on
                self.release()
            else:
                try:
                    queue.remove(turn)
                except ValueError:
                    pass
            raise
        return True

    def release(self) -> None:
        """Hand the slot to the first urgent waiter, else pay back a borrowed slot, else give it to the first
        other waiter (unless held), else keep it free."""
        if self._hand_over(0):
            return
        if self._borrowed:
            self._borrowed -= 1
            return
        if not (not self._hold() and self._hand_over(1)):
            self._value += 1

    def resume(self) -> None:
        """``hold()`` turned false: the other waiters get the free slots."""
        while self._value > 0 and self._hand_over(1):
            self._value -= 1

    def _live(self, which: int) -> bool:
        return any(not f.done() for f in self._waiters[which])

    def _hand_over(self, which: int) -> bool:
        queue = self._waiters[which]
        while queue:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return True
        return False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
