"""Pacing one server under its rate limits: requests per minute and tokens per minute (``URL#rpm=N&tpm=N``).

A hosted provider refuses what goes over its quota (HTTP 429). Rather than be refused, the pipeline spaces
its requests to such a server: one every ``60 / rpm`` seconds, and one every ``tokens / tpm * 60`` seconds
where ``tokens`` is the running average of the answers' ``usage.total_tokens`` (a guess until the first
answer). Spacing (not a burst of ``rpm`` then a pause) keeps every 60-second window under the quota
whatever window the provider counts in. The spacing is ``SAFETY`` longer than the quota's, so that the
jitter of the network never brings two requests closer than the provider allows.

A ``Retry-After`` answer moves the next turn past it (:meth:`Pacer.hold`). Pure bookkeeping over the
monotonic clock; the fleet sleeps.
"""

from __future__ import annotations

#: Spacing longer than the quota's by this factor: the pace reaches 1/SAFETY of the quota.
SAFETY = 1.02
#: Tokens a page request is assumed to cost before the first answer says (about 1,800 in, 750 out).
FIRST_TOKENS_GUESS = 3000.0
#: Weight of the newest answer in the running average of tokens per request.
TOKENS_EWMA = 0.2


class Pacer:
    """The turns of one server's requests."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.next_turn = 0.0  # monotonic: the earliest time the next request may be sent
        self.tokens_per_request = FIRST_TOKENS_GUESS
        self._answers = 0

    def spacing(self) -> float:
        """Seconds between two requests."""
        seconds = 0.0
        if self.rpm:
            seconds = 60.0 / self.rpm
        if self.tpm:
            seconds = max(seconds, 60.0 * self.tokens_per_request / self.tpm)
        return seconds * SAFETY

    def take(self, now: float) -> float:
        """Reserve the next turn; returns when (monotonic) the request may be sent."""
        turn = max(now, self.next_turn)
        self.next_turn = turn + self.spacing()
        return turn

    def hold(self, until: float) -> None:
        """No turn before ``until`` (a Retry-After)."""
        self.next_turn = max(self.next_turn, until)

    def ready_at(self) -> float:
        """When the server may be chosen for another request: while one request already waits for its
        turn, more would only hold page images."""
        return self.next_turn - self.spacing()

    def answered(self, total_tokens: int) -> None:
        """An answer's ``usage.total_tokens``: the running estimate for token pacing."""
        if total_tokens <= 0:
            return
        self._answers += 1
        if self._answers == 1:
            self.tokens_per_request = float(total_tokens)
        else:
            self.tokens_per_request += TOKENS_EWMA * (total_tokens - self.tokens_per_request)


def make_pacer(rpm: float | None, tpm: float | None) -> Pacer | None:
    """A pacer when the server has a limit, else None (no pacing at all)."""
    return Pacer(rpm, tpm) if rpm or tpm else None
