"""The one small interface every teacher backend implements, and the values that cross it.

A backend turns label requests into outcomes. It owns how requests are made (concurrency, retries) but not
what happens to the results: the labelling loop journals, writes and counts them, whatever the backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

from qc_assets.categories import Category

Status = Literal["labeled", "quarantined", "stopped", "absent"]


class TeacherConfigError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown model, wrong URL): stop instead of quarantining all."""


@dataclass(frozen=True)
class LabelRequest:
    doc_id: str
    shard: str
    category: Category
    text: str


@dataclass
class Usage:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cost_usd += other.cost_usd


@dataclass
class LabelOutcome:
    """What became of one key. `stopped`: the budget ran out before a usable answer (retried next run);
    `absent`: a replay source has no label for the key."""

    request: LabelRequest
    status: Status
    query: str | None = None
    reasoning: str | None = None
    raw_output: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    attempts: int = 0
    retries: Counter = field(default_factory=Counter)
    latency_s: float | None = None


class Budget:
    """When no new request may start: a spend cap (USD) per run and an optional wall-clock deadline."""

    def __init__(self, max_usd: float | None = None, stop_at: datetime | None = None) -> None:
        self.max_usd = max_usd
        self.stop_at = stop_at
        self.spent_usd = 0.0
        self.stopped_because: str | None = None

    def charge(self, usd: float) -> None:
        self.spent_usd += usd

    def may_start(self) -> bool:
        if self.stopped_because is not None:
            return False
        if self.max_usd is not None and self.spent_usd >= self.max_usd:
            self.stopped_because = (
                f"spend cap reached: ${self.spent_usd:.4f} spent of QC_TEACHER_MAX_USD=${self.max_usd:g}"
            )
        elif self.stop_at is not None and datetime.now(UTC) >= self.stop_at:
            self.stopped_because = f"stop time {self.stop_at.isoformat()} reached (end of the discount window)"
        return self.stopped_because is None


class TeacherBackend(Protocol):
    teacher: str
    """Stored in every label's key: changing it labels again and keeps the old labels."""

    def prompt_version(self, category: Category) -> str: ...

    def label_all(
        self, requests: Iterable[LabelRequest], budget: Budget, record: Callable[[LabelOutcome], None] | None = None
    ) -> AsyncIterator[LabelOutcome]:
        """Yield one outcome per request, in any order, as they complete; start nothing once the budget says no.

        `record` gets each final outcome first, before the request's slot is given to another request: answers
        paid for but not yet recorded are never more than the requests in flight, whatever the consumer's pace."""
        ...

    async def aclose(self) -> None: ...
