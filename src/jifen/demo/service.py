"""The demo programme: members and a year of varied history, generated through the services.

Everything goes through the same use cases a real installation calls, so the demo is also a
year-long exercise of the ledger: orders earn pending points that become available after a
7-day return window and expire after 12 months; members spend, get refunds, return orders
(within the window, or after spending, which leaves a debt), give points to each other, have
points frozen during a review, receive manual adjustments; a monthly run expires due lots.
The history is a deterministic function of the seed and ends at the real current time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from jifen.clock import Clock, ManualClock, SystemClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import InvalidInput, Refused, SameAccount, UnknownProgram
from jifen.members import service as members_service
from jifen.points import integrity
from jifen.points import service as points
from jifen.programs import service as programs

DEMO_CODE = "demo"
DEMO_NAME = "示例会员计划 Demo loyalty programme"
DAYS = 365
RETURN_WINDOW = timedelta(days=7)
VALIDITY = timedelta(days=365)
BONUS_VALIDITY = timedelta(days=90)  # campaign points lapse sooner, so expiry runs have work


def exists(db: Database) -> bool:
    def look(uow: UnitOfWork) -> bool:
        try:
            programs.get_program(uow, code=DEMO_CODE)
        except UnknownProgram:
            return False
        return True

    return db.run(look, read_only=True)


def reset_sqlite(url: str) -> None:
    """Delete the embedded database file; refuses anything but SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        raise InvalidInput(
            field="--reset",
            problem="only the embedded SQLite demo database can be reset; drop other "
            "databases with their own tools",
        )
    for suffix in ("", "-wal", "-shm"):
        Path(parsed.database + suffix).unlink(missing_ok=True)


@dataclass
class _History:
    """What the generator remembers to act on later: orders that may be returned, spends
    that may be refunded, freezes to lift."""

    members: list[int] = field(default_factory=list)
    orders: list[tuple[int, int]] = field(default_factory=list)  # (earn id, day)
    spends: list[int] = field(default_factory=list)
    freezes: list[tuple[int, int]] = field(default_factory=list)  # (freeze id, day)
    keys: int = 0

    def key(self, kind: str) -> str:
        self.keys += 1
        return f"demo-{kind}-{self.keys}"


def build(
    db: Database,
    *,
    members: int = 2000,
    seed: int = 7,
    on_day: Callable[[int], None] | None = None,
    end: Clock | None = None,
) -> int:
    """Create the demo programme and a year of history ending now; returns its id."""
    rng = random.Random(seed)
    real_clock = db.clock
    clock = ManualClock((end or SystemClock()).now() - timedelta(days=DAYS))
    db.clock = clock
    try:
        program_id = db.run(
            lambda uow: programs.create_program(uow, code=DEMO_CODE, name=DEMO_NAME).id
        )
        history = _History()
        # Members join over the first ten months, most of them early.
        joins = sorted(int(rng.triangular(0, 300, 0)) for _ in range(members))
        for day in range(DAYS):
            start_of_day = clock.now()
            with db.transaction() as uow:
                while joins and joins[0] <= day:
                    joins.pop(0)
                    ref = f"M{len(history.members) + 1:06d}"
                    member = members_service.register_member(
                        uow, program_id=program_id, external_ref=ref
                    )
                    history.members.append(member.id)
                if history.members:
                    _one_day(uow, rng, clock, history, day)
                if day % 30 == 29:
                    _expiry_run(uow, program_id)
            clock.set(start_of_day + timedelta(days=1))
            if on_day is not None:
                on_day(day + 1)
        db.run(lambda uow: integrity.checkpoint(uow, program_id=program_id))
        return program_id
    finally:
        db.clock = real_clock


def _one_day(
    uow: UnitOfWork, rng: random.Random, clock: ManualClock, history: _History, day: int
) -> None:
    people = history.members
    actions = max(1, int(len(people) * rng.uniform(0.035, 0.06)))
    for _ in range(actions):
        clock.advance(timedelta(seconds=rng.randint(30, 600)))
        now = clock.now()
        who = rng.choice(people)
        roll = rng.random()
        try:
            if roll < 0.45:  # an order paid: 1 point per yuan, pending for the return window
                earned = points.earn(
                    uow, member_id=who, amount=rng.randint(20, 800), key=history.key("order"),
                    available_at=now + RETURN_WINDOW, expires_at=now + VALIDITY,
                    reason="order paid 订单支付",
                )  # fmt: skip
                history.orders.append((earned.id, day))
            elif roll < 0.72:  # a redemption
                spent = points.spend(
                    uow, member_id=who, amount=rng.choice([100, 200, 500, 1000]),
                    key=history.key("redeem"), reason="reward redeemed 兑换礼品",
                )  # fmt: skip
                history.spends.append(spent.id)
            elif roll < 0.77 and history.spends:  # a redemption cancelled, wholly or in part
                spend_id = history.spends.pop(rng.randrange(len(history.spends)))
                points.refund(
                    uow, spend_id=spend_id, key=history.key("refund"),
                    amount=None if rng.random() < 0.6 else rng.randint(1, 100),
                    reason="redemption cancelled 兑换取消",
                )  # fmt: skip
            elif roll < 0.82 and history.orders:  # an order returned: its points clawed back
                earn_id, _ = history.orders.pop(rng.randrange(len(history.orders)))
                points.reverse(
                    uow, earn_id=earn_id, key=history.key("return"), reason="order returned 退货"
                )
            elif roll < 0.88:  # points given to another member
                points.transfer(
                    uow, from_member_id=who, to_member_id=rng.choice(people),
                    amount=rng.randint(10, 200), key=history.key("gift"), reason="gift 转赠",
                )  # fmt: skip
            elif roll < 0.91:  # a risk review holds points for a while
                frozen = points.freeze(
                    uow, member_id=who, amount=rng.randint(50, 300), key=history.key("freeze"),
                    reason="risk review 风控审核", actor="risk-officer",
                )  # fmt: skip
                history.freezes.append((frozen.id, day))
            elif roll < 0.95:  # goodwill or correction by an operator
                points.adjust(
                    uow, member_id=who, amount=rng.choice([100, 50, -30]),
                    key=history.key("adjust"), reason="customer care 客服关怀", actor="operator",
                )  # fmt: skip
            else:  # registration and profile bonuses, available at once
                points.earn(
                    uow, member_id=who, amount=rng.choice([10, 50, 100]), key=history.key("bonus"),
                    expires_at=now + BONUS_VALIDITY, reason="activity bonus 活动奖励",
                )  # fmt: skip
        except (Refused, SameAccount):
            # Refused before anything was written (not enough points, a gift to oneself drawn
            # at random): the day's transaction goes on.
            continue
    # Lift reviews that have lasted a week.
    still_frozen = []
    for freeze_id, since in history.freezes:
        if day - since >= 7:
            points.unfreeze(
                uow, freeze_id=freeze_id, key=history.key("unfreeze"),
                reason="review passed 审核通过", actor="risk-officer",
            )  # fmt: skip
        else:
            still_frozen.append((freeze_id, since))
    history.freezes = still_frozen
    # Orders older than the return window can no longer be returned.
    history.orders = [(e, d) for e, d in history.orders if day - d < 30]


def _expiry_run(uow: UnitOfWork, program_id: int) -> None:
    after = 0
    while True:
        due = points.members_with_due_lots(uow, program_id=program_id, after_member_id=after)
        if not due:
            return
        for member_id in due:
            points.expire_member(uow, member_id=member_id)
        after = due[-1]


@dataclass(frozen=True)
class Summary:
    program_code: str
    program_name: str
    members: int
    postings: dict[str, int]
    system_balances: dict[str, int]
    member_total: int
    reconcile_problems: list[str]
    verify_problems: list[str]


def summary(db: Database) -> Summary:
    def read(uow: UnitOfWork) -> Summary:
        program = programs.get_program(uow, code=DEMO_CODE)
        reconciled = integrity.reconcile(uow, program_id=program.id)
        verified = integrity.verify(uow, program_id=program.id)
        return Summary(
            program_code=program.code,
            program_name=program.name,
            members=members_service.count_members(uow, program_id=program.id),
            postings=points.posting_counts(uow, program_id=program.id),
            system_balances=reconciled.system_balances,
            member_total=reconciled.member_total,
            reconcile_problems=[str(p) for p in reconciled.problems],
            verify_problems=[str(p) for p in verified.problems],
        )

    return db.run(read, read_only=True)


def print_summary(result: Summary, console: Console) -> None:
    console.print(f"[bold]{result.program_name}[/bold] (programme `{result.program_code}`)")
    console.print(f"{result.members:,} members, {sum(result.postings.values()):,} postings")
    kinds = Table("kind", "postings", title="postings by kind")
    for kind, count in sorted(result.postings.items(), key=lambda item: -item[1]):
        kinds.add_row(kind, f"{count:,}")
    console.print(kinds)
    balances = result.system_balances
    figures = Table("points", "amount", title="where the points are")
    figures.add_row("issued 已发放", f"{-balances.get('issued', 0):,}")
    figures.add_row("redeemed 已兑换", f"{balances.get('redeemed', 0):,}")
    figures.add_row("expired 已过期", f"{balances.get('expired', 0):,}")
    figures.add_row("frozen 冻结中", f"{balances.get('frozen', 0):,}")
    figures.add_row("adjusted 人工调整", f"{-balances.get('adjustments', 0):,}")
    figures.add_row("held by members 会员持有", f"{result.member_total:,}")
    figures.add_row("owed by members 会员欠分", f"{-balances.get('receivable', 0):,}")
    console.print(figures)
    for label, problems in (("reconcile", result.reconcile_problems),
                            ("verify", result.verify_problems)):  # fmt: skip
        if problems:
            console.print(f"[red]{label}: {len(problems)} problem(s)[/red]")
            for problem in problems:
                console.print(f"  {problem}", markup=False)
        else:
            console.print(f"{label}: ok")
