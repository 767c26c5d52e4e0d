"""What a job is, when each one runs, and how a run adds up its chunks: pure data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one chunk of a run did: where the next chunk starts, whether the run is over,
    and figures to add to the run's totals."""

    cursor: int
    finished: bool
    figures: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When the worker starts a job, in the programme's time zone: a cron expression
    (minute hour day month day-of-week), or every ``seconds``."""

    cron: str | None = None
    seconds: int | None = None

    def describe(self) -> str:
        return f"cron {self.cron}" if self.cron else f"every {self.seconds} s"


SCHEDULES: dict[str, Schedule] = {
    "events.birthdays": Schedule(cron="5 0 * * *"),
    "points.expire": Schedule(cron="10 0 * * *"),
    "rewards.expire_vouchers": Schedule(cron="20 0 * * *"),
    "points.dormancy": Schedule(cron="30 0 * * *"),
    "tiers.evaluate": Schedule(cron="0 0 * * *"),
    "tiers.end_temporary": Schedule(cron="15 * * * *"),
    "ledger.reconcile": Schedule(cron="0 3 * * *"),
    "events.seal_fingerprints": Schedule(cron="30 4 * * *"),
    "points.reminders": Schedule(cron="0 10 * * *"),
    "rewards.expire_holds": Schedule(cron="*/10 * * * *"),
    "rewards.lapse_payments": Schedule(cron="*/5 * * * *"),
    "rewards.restock_alerts": Schedule(cron="*/30 * * * *"),
    "notify.deliver": Schedule(seconds=10),
}
"""Each job's default schedule: nightly runs in the small hours of the programme's day
(expiry before reminders, so a reminder never announces points already gone); tier
evaluation fires daily at the first minute of the programme's day and runs on the dates of
the tier scheme's own schedule (每季度: quarterly), so the score's window ends at that date's
midnight, the quarter's last moment; short checks every few minutes; deliveries every ten
seconds."""


def add(totals: Mapping[str, int], more: Mapping[str, int]) -> dict[str, int]:
    summed = dict(totals)
    for name, value in more.items():
        summed[name] = summed.get(name, 0) + value
    return summed


def run_moment(now: datetime) -> datetime:
    """The moment a scheduled run works for: its minute. Two workers firing the same
    schedule agree on it, so one run record serves both."""
    return now.replace(second=0, microsecond=0)
