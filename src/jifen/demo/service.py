"""The demo programme: members and a year of varied history, generated through the services.

Everything goes through the same use cases a real installation calls, so the demo is also a
year-long exercise of the ledger and the rules. The earning scheme is the rule pack
``rules.json`` beside this file (the scheme documents' numbers), loaded at the start of the
year; members get tiers, and their orders, check-ins and reviews are events that earn through
those rules: order points stay pending for the 7-day return window and expire after 12
months. Members redeem from the catalogue ``rewards.json`` (goods, vouchers, coupons, air
miles, the lucky wheel, donations, votes, a salon) under its redemption terms, cancel some
redemptions, use or let lapse their vouchers; they return orders
(within the window, or after spending, which leaves a debt), give points to each other, have
points frozen during a review, receive manual adjustments; a monthly run expires due lots,
and a checkpoint seals the year. The history is a deterministic function of the seed and
ends at the real current time, so balances and expiry dates look current.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Column, Table
from sqlalchemy.engine import make_url

from jifen.clock import Clock, ManualClock, SystemClock
from jifen.db.uow import Database, UnitOfWork
from jifen.demo import DAYS as DAYS
from jifen.errors import InvalidInput, Refused, SameAccount, UnknownProgram
from jifen.events import service as events_service
from jifen.events.schemas import EventIn
from jifen.expiry import service as expiry_service
from jifen.members import service as members_service
from jifen.members.schemas import MemberUpdate
from jifen.points import integrity
from jifen.points import service as points
from jifen.programs import service as programs
from jifen.rewards import service as rewards_service
from jifen.rewards.schemas import RedemptionCreate, RedemptionPolicy, RewardCreate
from jifen.rules import service as rules_service
from jifen.rules.schemas import RulePack
from jifen.tiers import service as tiers_service

DEMO_CODE = "demo"
DEMO_NAME = "示例会员计划 / Demo loyalty programme"
DEMO_TIME_ZONE = "Asia/Shanghai"
DAY = timedelta(days=1)
RETURN_WINDOW = timedelta(days=7)  # order points stay pending this long
RETURNS_ACCEPTED = 30  # days after an order during which it may still be returned
VALIDITY = timedelta(days=365)
BONUS_VALIDITY = timedelta(days=90)  # campaign points lapse sooner, so expiry runs have work
REVIEW_DAYS = 7  # a freeze is lifted after this many days
EXPIRY_RUN_EVERY = 30  # days
SHIP_EVERY = 3  # days between the fulfilment team's rounds
TIERS = (("普通", 70), ("银卡", 20), ("金卡", 8), ("钻石", 2))  # code, share in %
CATEGORIES = (("日用品", 10, 300), ("食品", 10, 200), ("服饰", 50, 800), ("家电", 200, 3000))
"""Order line categories with their price range in yuan."""


def rule_pack() -> RulePack:
    """The demo's earning scheme, shipped with jifen."""
    text = resources.files("jifen.demo").joinpath("rules.json").read_text(encoding="utf-8")
    return RulePack.model_validate(json.loads(text))


def catalogue() -> dict[str, Any]:
    """The demo's redemption policy and rewards (``rewards.json``)."""
    text = resources.files("jifen.demo").joinpath("rewards.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _open_shop(uow: UnitOfWork, program_id: int, start: datetime) -> list[str]:
    """Set the demo's redemption terms and stock its catalogue; the codes of the rewards.
    Days in the file (``opens_after_days``, ``starts_after_days``) count from ``start``."""
    shop = catalogue()
    settings = programs.get_settings(uow, program_id=program_id)
    policy = RedemptionPolicy.model_validate(shop["policy"])
    programs.set_settings(
        uow, program_id=program_id, settings=settings.model_copy(update={"redemption": policy})
    )
    codes = []
    for spec in shop["rewards"]:
        fields = dict(spec)
        opens = fields.pop("opens_after_days", None)
        if opens is not None:
            fields["sales_start"] = start + opens * DAY
        if "event" in fields:
            event = dict(fields["event"])
            event["starts_at"] = start + event.pop("starts_after_days") * DAY
            fields["event"] = event
        body = RewardCreate.model_validate(fields)
        rewards_service.create_reward(uow, program_id=program_id, body=body)
        codes.append(body.code)
    return codes


def exists(db: Database, *, code: str = DEMO_CODE) -> bool:
    """Whether the demo programme has been created on this database."""

    def look(uow: UnitOfWork) -> bool:
        try:
            programs.get_program(uow, code=code)
        except UnknownProgram:
            return False
        return True

    return db.run(look, read_only=True)


def refuse_beside_other_programmes(db: Database, *, code: str = DEMO_CODE) -> None:
    """Refuse to build the demo into a database that holds other programmes: it would add
    made-up members to it and staff users, a super administrator among them, whose passwords
    it prints."""
    others = [p.code for p in db.run(programs.list_programs, read_only=True) if p.code != code]
    if others:
        shown = ", ".join(others)
        raise InvalidInput(
            field="demo",
            problem=f"this database holds other programmes ({shown}): the demo, its made-up "
            "members and its staff users with printed passwords are not built into it; give "
            "the demo its own database (--database-url)",
            problem_zh=f"此数据库中已有其他计划({shown}):示例计划及其虚构会员、密码会被打印的"
            "员工账户不会建在其中;请为示例使用单独的数据库(--database-url)",
        )


def reset_sqlite(url: str) -> None:
    """Delete the embedded database file; refuses anything but an SQLite file."""
    parsed = make_url(url)
    path = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if not path or path == ":memory:":
        raise InvalidInput(
            field="--reset",
            problem="only the embedded SQLite demo database can be reset; drop or clean other "
            "databases with their own tools",
            problem_zh="只能重置内置的 SQLite 示例数据库;其他数据库请用其自带的工具删除或清理",
        )
    database = Path(path)
    if database.is_dir() or (database.exists() and not _is_sqlite(database)):
        raise InvalidInput(
            field="--reset",
            problem=f"{database} is not an SQLite database, so it was left as it is: give the "
            "demo database's URL (JIFEN_DATABASE_URL or --database-url)",
            problem_zh=f"{database} 不是 SQLite 数据库,未做任何删除:请给出示例数据库的地址"
            "(JIFEN_DATABASE_URL 或 --database-url)",
        )
    try:
        others = _other_programmes(database) if database.exists() else []
    except sqlite3.Error as exc:  # damaged, or locked by a server still running on it
        raise InvalidInput(
            field="--reset",
            problem=f"{database} cannot be read ({exc}), so it was left as it is: stop what "
            "uses it, or delete it yourself if it holds the demo alone",
            problem_zh=f"无法读取 {database}({exc}),未做任何删除:请停止正在使用它的程序;"
            "若其中只有示例计划,可自行删除",
        ) from None
    if others:
        shown = ", ".join(others)
        raise InvalidInput(
            field="--reset",
            problem=f"{database} holds other programmes than the demo ({shown}), so it was "
            "left as it is: give the demo its own database (--database-url)",
            problem_zh=f"{database} 中除示例计划外还有其他计划({shown}),未做任何删除:"
            "请为示例使用单独的数据库(--database-url)",
        )
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)


def _other_programmes(path: Path) -> list[str]:
    """The codes of the programmes other than the demo's in an SQLite file (none where it
    has no schema yet), read without writing to it."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        found = connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'programs'"
        ).fetchone()
        if found is None:
            return []
        rows = connection.execute(
            "SELECT code FROM programs WHERE code <> ? ORDER BY id", (DEMO_CODE,)
        ).fetchall()
    finally:
        connection.close()
    return [str(code) for (code,) in rows]


def _is_sqlite(path: Path) -> bool:
    """Whether the file is an SQLite database (its 16-byte header), or still empty."""
    with path.open("rb") as handle:
        head = handle.read(16)
    return head in (b"", b"SQLite format 3\x00")


# --------------------------------------------------------------------------- generating


@dataclass
class _History:
    """What the generator remembers to act on later: orders that may be returned, spends
    that may be refunded, freezes to lift; and how many requests the rules refused."""

    program_id: int = 0
    members: list[int] = field(default_factory=list)
    orders: list[tuple[str, int, dict[str, Any], int]] = field(default_factory=list)
    """(order id, member, its first line, day) of orders that may be returned."""
    rewards: list[str] = field(default_factory=list)
    redemptions: list[int] = field(default_factory=list)
    """Orders that may still be cancelled."""
    vouchers: list[str] = field(default_factory=list)
    freezes: list[tuple[int, int]] = field(default_factory=list)  # (freeze id, day)
    checked_in: set[tuple[int, date]] = field(default_factory=set)  # (member, its day)
    refused: Counter[str] = field(default_factory=Counter)
    keys: int = 0

    def key(self, kind: str) -> str:
        self.keys += 1
        return f"demo-{kind}-{self.keys}"


@dataclass(frozen=True)
class Built:
    """What :func:`build` made."""

    program_id: int
    refused: dict[str, int]
    """Requests the ledger refused (not enough points, …), by error code: a real programme
    sees those too, and each left the day's transaction usable."""


def build(
    db: Database,
    *,
    members: int = 2000,
    seed: int = 7,
    on_day: Callable[[int], None] | None = None,
    end: Clock | None = None,
    code: str = DEMO_CODE,
    name: str = DEMO_NAME,
    days: int = DAYS,
) -> Built:
    """Create the demo programme and ``days`` (a year) of history ending at ``end`` (now).

    One transaction per simulated day, so the year takes a few hundred commits. The
    checkpoint that seals the year is written last: a programme without one is an
    interrupted build (see :attr:`Summary.complete`).
    """
    if members < 1 or days < 1:
        raise InvalidInput(
            field="members" if members < 1 else "days",
            problem=f"give at least 1, got {min(members, days)}",
            problem_zh=f"至少为 1,收到的是 {min(members, days)}",
        )
    rng = random.Random(seed)
    finish = (end or SystemClock()).now()
    clock = ManualClock(finish - days * DAY)
    real_clock = db.clock
    db.clock = clock  # every unit of work opened below reads the simulated time
    try:

        def create(uow: UnitOfWork) -> int:
            made = programs.create_program(uow, code=code, name=name, time_zone=DEMO_TIME_ZONE)
            rules_service.load_pack(
                uow, program_id=made.id, pack=rule_pack(), actor="jifen demo", activate=True
            )
            return made.id

        program_id = db.run(create)
        history = _History(program_id=program_id)
        history.rewards = db.run(lambda uow: _open_shop(uow, program_id, clock.now()))
        # Members join over the first ten months, most of them early.
        joins = Counter(int(rng.triangular(0, days * 300 / 365, 0)) for _ in range(members))
        for day in range(days):
            start_of_day = clock.now()
            with db.transaction() as uow:
                for _ in range(joins[day]):
                    _join(uow, rng, program_id, start_of_day, history)
                if history.members:
                    _one_day(uow, rng, clock, start_of_day, history, day)
                if day % SHIP_EVERY == SHIP_EVERY - 1:
                    _ship(uow, program_id)
                if day % EXPIRY_RUN_EVERY == EXPIRY_RUN_EVERY - 1:
                    _expiry_run(uow, program_id)
            # Next day; the last one ends exactly at ``finish``, never after it.
            clock.set(start_of_day + DAY)
            if on_day is not None:
                on_day(day + 1)
        db.run(lambda uow: integrity.checkpoint(uow, program_id=program_id))
        return Built(program_id=program_id, refused=dict(history.refused))
    finally:
        db.clock = real_clock


def _join(
    uow: UnitOfWork, rng: random.Random, program_id: int, now: datetime, history: _History
) -> None:
    """A new member: a tier, a birthday for most, and the welcome points of the rules."""
    ref = f"M{len(history.members) + 1:06d}"
    member = members_service.register_member(uow, program_id=program_id, external_ref=ref)
    history.members.append(member.id)
    tier = rng.choices([t for t, _ in TIERS], weights=[w for _, w in TIERS])[0]
    tiers_service.set_member_tier(uow, program_id=program_id, member_id=member.id, tier=tier,
                                  reason="demo", set_by="jifen demo")  # fmt: skip
    if rng.random() < 0.7:
        birthday = date(rng.randint(1960, 2005), rng.randint(1, 12), rng.randint(1, 28))
        members_service.update_profile(
            uow, program_id=program_id, member_id=member.id, body=MemberUpdate(birthday=birthday)
        )
    _event(uow, history, member.id, "member.registered", now, {})


def _event(
    uow: UnitOfWork, history: _History, member_id: int, kind: str, now: datetime,
    payload: dict[str, Any],
) -> int:  # fmt: skip
    """Send an event through the rules as a source system would; the points it earned."""
    program_id = history.program_id
    event = EventIn(
        source="demo", external_id=history.key(kind), type=kind, occurred_at=now,
        member_id=member_id, payload=payload,
    )  # fmt: skip
    return events_service.ingest(uow, program_id=program_id, event=event).points


def _moments(rng: random.Random, start_of_day: datetime, count: int) -> list[datetime]:
    """``count`` times within the day, in order: however many actions a day has, the
    clock never runs past the start of the next day (so never past the real now)."""
    seconds = sorted(rng.randrange(1, 86_400) for _ in range(count))
    return [start_of_day + timedelta(seconds=s) for s in seconds]


def _one_day(
    uow: UnitOfWork,
    rng: random.Random,
    clock: ManualClock,
    start_of_day: datetime,
    history: _History,
    day: int,
) -> None:
    people = history.members
    actions = max(1, int(len(people) * rng.uniform(0.035, 0.06)))
    for moment in _moments(rng, start_of_day, actions):
        clock.set(moment)
        who = rng.choice(people)
        try:
            _one_action(uow, rng, moment, history, day, who)
        except (Refused, SameAccount) as refusal:
            # The services check before they write, so a refusal (not enough points, a gift
            # to oneself drawn at random) leaves nothing half-written and the day's
            # transaction goes on; the PostgreSQL test of the demo proves it, since there a
            # failed statement would abort the transaction.
            history.refused[refusal.code] += 1
    # Lift reviews that have lasted a week.
    still_frozen = []
    for freeze_id, since in history.freezes:
        if day - since >= REVIEW_DAYS:
            points.unfreeze(
                uow, freeze_id=freeze_id, key=history.key("unfreeze"),
                reason="review passed 审核通过", actor="risk-officer",
            )  # fmt: skip
        else:
            still_frozen.append((freeze_id, since))
    history.freezes = still_frozen
    # Orders are accepted back for a month; after that they can no longer be returned.
    history.orders = [order for order in history.orders if day - order[3] < RETURNS_ACCEPTED]


def _one_action(
    uow: UnitOfWork, rng: random.Random, now: datetime, history: _History, day: int, who: int
) -> None:
    roll = rng.random()
    if roll < 0.45:  # an order paid: it earns through the rules, pending for the return window
        order_id = history.key("order")
        lines: list[dict[str, Any]] = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            category, low, high = rng.choice(CATEGORIES)
            lines.append({"sku": f"{category}-{rng.randint(1, 300):03d}", "category": category,
                          "amount_fen": rng.randint(low, high) * 100})  # fmt: skip
        payload = {
            "order_id": order_id, "store": f"S{rng.randint(1, 12):02d}", "lines": lines,
            "channel": rng.choice(["store", "store", "online", "livestream"]),
            "pickup": rng.random() < 0.2,
        }  # fmt: skip
        _event(uow, history, who, "order.paid", now, payload)
        history.orders.append((order_id, who, lines[0], day))
    elif roll < 0.72:  # a redemption from the catalogue, under the tier's terms
        _redeem(uow, rng, history, who)
    elif roll < 0.77 and (history.redemptions or history.vouchers):
        if history.vouchers and rng.random() < 0.6:  # a voucher used at a till
            code = history.vouchers.pop(rng.randrange(len(history.vouchers)))
            rewards_service.use_voucher(
                uow, program_id=history.program_id, code=code, store=f"S{rng.randint(1, 12):02d}",
                actor="cashier", order_amount_fen=rng.randint(50, 400) * 100,
            )  # fmt: skip
        elif history.redemptions:  # a redemption cancelled before it shipped
            redemption = history.redemptions.pop(rng.randrange(len(history.redemptions)))
            rewards_service.move(
                uow, program_id=history.program_id, order_id=redemption, action="cancel",
                actor=f"member:{who}", note="changed my mind 不想要了",
            )  # fmt: skip
    elif roll < 0.82 and history.orders:  # an order returned, wholly or a line of it
        # Within the return window the pending points simply go; later, what the member
        # has spent meanwhile and cannot cover becomes a debt.
        order_id, buyer, first_line, _ = history.orders.pop(rng.randrange(len(history.orders)))
        whole = rng.random() < 0.6
        returned = (
            [] if whole else [{"sku": first_line["sku"], "amount_fen": first_line["amount_fen"]}]
        )
        payload = {"order_id": order_id, "whole": whole, "lines": returned}
        _event(uow, history, buyer, "order.refunded", now, payload)
    elif roll < 0.88:  # points given to another member
        points.transfer(
            uow, from_member_id=who, to_member_id=rng.choice(history.members),
            amount=rng.randint(10, 200), key=history.key("gift"), reason="gift 转赠",
        )  # fmt: skip
    elif roll < 0.91:  # a risk review holds points for a while
        frozen = points.freeze(
            uow, member_id=who, amount=rng.randint(50, 300), key=history.key("freeze"),
            reason="risk review 风控审核", actor="risk-officer",
        )  # fmt: skip
        history.freezes.append((frozen.id, day))
    elif roll < 0.93:  # goodwill or a correction by an operator
        points.adjust(
            uow, member_id=who, amount=rng.choice([100, 50, -30]),
            key=history.key("adjust"), reason="customer care 客服关怀", actor="operator",
        )  # fmt: skip
    elif roll < 0.975:  # a campaign bonus granted by hand, available at once, short-lived
        points.earn(
            uow, member_id=who, amount=rng.choice([10, 50, 100]), key=history.key("bonus"),
            expires_at=now + BONUS_VALIDITY, reason="activity bonus 活动奖励",
        )  # fmt: skip
    elif roll < 0.99:  # a daily check-in (once a day: the app sends no second one)
        zone = ZoneInfo(programs.time_zone(uow, program_id=history.program_id))
        today = (who, now.astimezone(zone).date())
        if today not in history.checked_in:
            history.checked_in.add(today)
            _event(uow, history, who, "member.checked_in", now, {})
    else:  # a review of an order
        media = rng.choice(["text", "image", "image", "video"])
        _event(uow, history, who, "review.posted", now,
               {"review_id": history.key("review"), "media": media})  # fmt: skip


def _redeem(uow: UnitOfWork, rng: random.Random, history: _History, who: int) -> None:
    """One redemption of a reward drawn at random, with what its kind asks for."""
    code = rng.choice(history.rewards)
    fields: dict[str, Any] = {"reward": code}
    if code == "kettle":
        fields["payment_ref"] = history.key("pay")
    elif code == "miles":
        fields.update(partner_account=f"MU{who:08d}", quantity=rng.randint(1, 3))
    elif code == "hope":
        fields["quantity"] = rng.choice([1, 5, 10])
    elif code == "vote-new":
        fields["choice"] = rng.choice(["定制运动鞋", "家庭体检", "咖啡月卡"])
    order = rewards_service.redeem(
        uow, program_id=history.program_id, member_id=who,
        body=RedemptionCreate.model_validate(fields), key=history.key("redeem"),
        actor=f"member:{who}",
    )  # fmt: skip
    if order.state in ("created", "held") and order.kind == "physical":
        history.redemptions.append(order.id)
    if order.voucher is not None and rng.random() < 0.7:  # the rest lapse: 90 % comes back
        history.vouchers.append(order.voucher.code)


def _ship(uow: UnitOfWork, program_id: int) -> None:
    """Staff ship and deliver the goods waiting, and members confirm held redemptions."""
    while True:
        waiting, _ = rewards_service.list_orders(
            uow, program_id=program_id, state="created", limit=200
        )
        movable = [o for o in waiting if o.voucher is None]
        for order in movable:
            for action in ("ship", "deliver"):
                rewards_service.move(uow, program_id=program_id, order_id=order.id,
                                     action=action, actor="fulfilment")  # fmt: skip
        if len(waiting) < 200 or not movable:
            break
    held, _ = rewards_service.list_orders(uow, program_id=program_id, state="held", limit=200)
    for order in held:
        if order.hold_until is not None and order.hold_until <= uow.clock.now():
            try:
                rewards_service.confirm_held(uow, program_id=program_id,
                                             member_id=order.member_id, order_id=order.id,
                                             actor=f"member:{order.member_id}")  # fmt: skip
            except Refused:
                continue


def _expiry_run(uow: UnitOfWork, program_id: int) -> None:
    while rewards_service.expire_vouchers(uow, program_id=program_id, limit=500).found == 500:
        pass
    rewards_service.expire_holds(uow, program_id=program_id, limit=10_000)
    while expiry_service.expire_chunk(uow, program_id=program_id, limit=1000).found:
        pass


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Summary:
    """The demo programme at a glance, with the results of reconcile and verify."""

    program_code: str
    program_name: str
    members: int
    postings: dict[str, int]
    system_balances: dict[str, int]
    member_total: int
    checkpoints: int
    reconcile_problems: list[str]
    verify_problems: list[str]

    @property
    def complete(self) -> bool:
        """Whether the build ran to its end (it seals the year with a checkpoint last)."""
        return self.checkpoints > 0

    @property
    def ok(self) -> bool:
        return not self.reconcile_problems and not self.verify_problems

    def figure(self, account: str) -> int:
        """A system account's balance with the sign an operator expects (issued: positive)."""
        balance = self.system_balances.get(account, 0)
        # issued, adjustments and receivable are sources: their balances are negative.
        return -balance if account in ("issued", "adjustments", "receivable") else balance


def summary(db: Database, *, code: str = DEMO_CODE) -> Summary:
    """Read the demo programme's figures and check its ledger (reconcile and verify)."""

    def read(uow: UnitOfWork) -> Summary:
        program = programs.get_program(uow, code=code)
        reconciled = integrity.reconcile(uow, program_id=program.id)
        verified = integrity.verify(uow, program_id=program.id)
        return Summary(
            program_code=program.code,
            program_name=program.name,
            members=members_service.count_members(uow, program_id=program.id),
            postings=points.posting_counts(uow, program_id=program.id),
            system_balances=reconciled.system_balances,
            member_total=reconciled.member_total,
            checkpoints=verified.checkpoints,
            reconcile_problems=[str(p) for p in reconciled.problems],
            verify_problems=[str(p) for p in verified.problems],
        )

    return db.run(read, read_only=True)


def print_summary(result: Summary, console: Console, *, chinese: bool = False) -> None:
    console.print(f"{result.program_name} (programme `{result.program_code}`)", markup=False)
    console.print(f"{result.members:,} members, {sum(result.postings.values()):,} postings")
    kinds = Table("kind", Column("postings", justify="right"), title="postings by kind")
    for kind, count in sorted(result.postings.items(), key=lambda item: (-item[1], item[0])):
        kinds.add_row(kind, f"{count:,}")
    console.print(kinds, soft_wrap=False)
    figures = Table("points", Column("amount", justify="right"), title="where the points are")
    figures.add_row("issued 已发放", f"{result.figure('issued'):,}")
    figures.add_row("redeemed 已兑换", f"{result.figure('redeemed'):,}")
    figures.add_row("donated 已捐赠", f"{result.figure('charity'):,}")
    figures.add_row("exchanged to partners 兑出联盟", f"{result.figure('partners'):,}")
    figures.add_row("expired 已过期", f"{result.figure('expired'):,}")
    figures.add_row("frozen 冻结中", f"{result.figure('frozen'):,}")
    figures.add_row("adjusted (net) 人工调整", f"{result.figure('adjustments'):,}")
    figures.add_row("outstanding, held by members 会员持有", f"{result.member_total:,}")
    figures.add_row("owed by members as debt 会员欠分", f"{result.figure('receivable'):,}")
    console.print(figures, soft_wrap=False)
    for label, problems in (("reconcile", result.reconcile_problems),
                            ("verify", result.verify_problems)):  # fmt: skip
        if problems:
            console.print(f"[red]{label}: {len(problems)} problem(s)[/red]")
            for problem in problems:
                console.print(f"  {problem}", markup=False, soft_wrap=True)
        else:
            console.print(f"{label}: ok")
    if not result.complete:
        said = (
            "示例计划未生成完毕(是否曾被中断?);请运行 `jifen demo --reset` 重新生成"
            if chinese
            else "this demo was not built to the end (interrupted?); "
            "run `jifen demo --reset` to build it again"
        )
        console.print(f"[yellow]{said}[/yellow]", soft_wrap=True)
