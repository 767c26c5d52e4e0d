"""Rule evaluation, pure: an event, the member facts, the programme's rules and caps in; the
awards, each with its reason and the cap that bit, out. Nothing here reads a database or a
clock: the caller passes the time (the event's own) and what has been awarded so far.

The order of work for one event:

1. The rules for the event's type, by priority (lower first, then by code). Each is skipped,
   with the reason recorded, when the event is outside its window, the member outside its
   gray-release share, its condition false, or its exclusive group already taken; a rule that
   fires with ``stop_after`` ends the pass.
2. Each firing rule computes its points from its kind's parameters. Multipliers do not award
   on their own: after the pass they multiply, compounding in priority order, the awards of
   the kinds they apply to.
3. Caps, award by award in that order: the member's tier limits per day and month, the
   rule's per-member limits per day, week, month and lifetime, the rule's budget and the
   programme's budget. An award posts the part that fits; the rest is recorded as capped,
   with the cap that bit. Held awards (reviewed kinds) are capped when they are approved.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from jifen.ledger.errors import InvalidInput
from jifen.rules.schemas import (
    BirthdayGift,
    FirstOfKind,
    FixedAward,
    Multiplier,
    PerUnit,
    ProgramCaps,
    RandomBonus,
    Referral,
    Reviewed,
    RuleCaps,
    RuleSpec,
    SpendRate,
    StreakLadder,
    Threshold,
    TierCap,
)

Condition = Callable[[Mapping[str, Any]], bool]
"""A compiled condition: the activation (``event``, ``member``, ``now``) in, true or false
out. It raises :class:`ConditionFailed` when the expression cannot be evaluated."""

_ROUNDING = {"floor": ROUND_FLOOR, "half_up": ROUND_HALF_UP, "ceil": ROUND_CEILING}
_GRAY_SCALE = 2**64
MAX_AWARD = 10**12
"""No award is larger: a rule that computes more refuses the event rather than overflow."""
_MICRO = 10**6
"""Rates carry at most six decimals (the schemas say so)."""
_POINT = 100 * _MICRO
"""Fen × rate × 10⁶ per point."""


class EventRefused(InvalidInput):
    """The event cannot be evaluated as it is: nothing is stored or awarded for it."""

    code = "event_refused"
    en = "rule {rule}: {problem}"
    zh = "规则 {rule}:{problem}"


class ConditionFailed(Exception):
    """A condition could not be evaluated (a missing field, a wrong type); ``str()`` says why."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class OrderLine:
    sku: str
    category: str
    quantity: int
    amount_fen: int
    paid_with_points: bool = False
    """Bought by redeeming points: earns nothing (积分兑换产生的行为不再累积积分)."""


@dataclass(frozen=True)
class Event:
    key: str
    """Unique and stable per event (source and external id): seeds the random draws."""
    type: str
    occurred_at: datetime
    member_id: int
    payload: Mapping[str, Any] = field(default_factory=dict)
    lines: tuple[OrderLine, ...] = ()
    """The order's lines (``order.paid``)."""
    awarded_before: frozenset[str] = frozenset()
    """The rules that already awarded on an earlier event of the same subject (a review's
    likes): each awards once a subject, when its condition first holds."""


@dataclass(frozen=True)
class Streak:
    last_day: date
    length: int


@dataclass(frozen=True)
class Usage:
    """Points a member has already been awarded in the windows the caps count over (the
    event's day, week and month in the programme's time zone)."""

    day: int = 0
    month: int = 0
    by_rule: Mapping[tuple[str, str], int] = field(default_factory=dict)
    """(rule code, period) → points; periods ``day``, ``week``, ``month``, ``lifetime``."""


@dataclass(frozen=True)
class Facts:
    member_id: int
    tier: str | None = None
    state: str = "active"
    """active, frozen, banned or closed: only an active member earns (the event's member is
    refused before evaluation; an inviter that is not active gets nothing)."""
    tags: frozenset[str] = frozenset()
    registered_at: datetime | None = None
    region: str | None = None
    birthday: date | None = None
    counts: Mapping[str, int] = field(default_factory=dict)
    """Events of each type the member had before this one."""
    streaks: Mapping[str, Streak] = field(default_factory=dict)
    """The member's current run of daily events, by event type."""
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Budgets:
    """Points already awarded over all members: by rule code, and by the whole programme."""

    by_rule: Mapping[str, int] = field(default_factory=dict)
    program: int = 0


@dataclass(frozen=True)
class Rule:
    """One rule version, ready to evaluate."""

    spec: RuleSpec
    version: int = 1
    condition: Condition | None = None
    window: tuple[datetime | None, datetime | None] = field(init=False, compare=False)
    """The spec's window (start, end) in UTC: the same instants, which an event's time (in
    UTC) compares with some ten times faster than with times of a time zone object of
    their own, as parsed times have."""

    def __post_init__(self) -> None:
        starts, ends = self.spec.starts_at, self.spec.ends_at
        window = (starts and starts.astimezone(UTC), ends and ends.astimezone(UTC))
        object.__setattr__(self, "window", window)

    def active_at(self, moment: datetime) -> bool:
        """Whether ``moment`` lies in the rule's window (:func:`active_at` of its spec)."""
        starts, ends = self.window
        return (starts is None or starts <= moment) and (ends is None or moment < ends)


class RuleSet:
    """A programme's rules, grouped by event type and sorted once."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = sorted(rules, key=lambda r: (r.spec.priority, r.spec.code))
        self.by_type: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for event_type in rule.spec.event_types:
                self.by_type.setdefault(event_type, []).append(rule)


@dataclass(frozen=True)
class Program:
    zone: ZoneInfo
    caps: ProgramCaps = field(default_factory=ProgramCaps)
    tier_multipliers: Mapping[str, Decimal] = field(default_factory=dict)
    """The tier benefits matrix's earn multipliers: an implicit multiplier of spend awards
    (award rule ``TIER_BENEFIT``), unless a rule of the event names factors by tier."""
    birthday_gifts: Mapping[str, int] = field(default_factory=dict)
    """The matrix's birthday gifts: points on ``member.birthday`` by tier (award rule
    ``TIER_BENEFIT``), unless a birthday gift rule is live for the event."""
    draw_key: bytes = b""
    """The installation's key for random draws (see :func:`draw`)."""
    tier_order: tuple[str, ...] = ()
    """The programme's tiers, lowest first: a member without a tier is taken as the first
    (the entry tier), and a tier the caps do not name takes the caps of the nearest lower
    tier they name (see :func:`tier_cap_of`)."""


def tier_cap_of(
    by_tier: Mapping[str, TierCap], order: Sequence[str], tier: str | None
) -> TierCap | None:
    """The caps of a member of ``tier``: the tier's own; or, where the caps do not name it,
    those of the nearest lower tier they name (by the tiers' ``order``, lowest first); or,
    with none lower, those of the lowest tier they name. None when they name no tier of
    the programme."""
    own = by_tier.get(tier or "")
    if own is not None:
        return own
    named = [code for code in order if code in by_tier]
    if not named:
        return None
    if tier in order:
        lower = [code for code in order[: order.index(tier)] if code in by_tier]
        if lower:
            return by_tier[lower[-1]]
    return by_tier[named[0]]


TIER_BENEFIT = "tier_benefit"
"""The rule code of the awards the benefits matrix gives (earn multiplier, birthday gift)."""


# --------------------------------------------------------------------------- outputs


# Awards and skips are made by the dozen an event, and a frozen dataclass costs five times
# as much to build (each field set through object.__setattr__): these are plain slotted
# dataclasses, never changed once made (a capped award is a new one).
@dataclass(slots=True)
class Award:
    rule: str
    version: int
    kind: str
    member_id: int
    points: int
    """What posts (after caps)."""
    wanted: int
    """What the rule computed (before caps)."""
    cap: str | None = None
    """The cap that bit, when ``points < wanted``."""
    held: bool = False
    """Waiting for a reviewer; nothing posts yet."""
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def capped(self) -> int:
        return self.wanted - self.points


@dataclass(slots=True)
class Skip:
    rule: str
    why: str


@dataclass
class Evaluation:
    awards: list[Award] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    streaks: dict[tuple[int, str], Streak] = field(default_factory=dict)
    """(member id, event type) → the run after this event, for the caller to keep."""

    @property
    def total(self) -> int:
        return sum(a.points for a in self.awards if not a.held)


# --------------------------------------------------------------------------- helpers


def rounded(value: Fraction | Decimal, rounding: str) -> int:
    """``value`` as whole points by the rule's rounding policy."""
    as_decimal = (
        Decimal(value.numerator) / Decimal(value.denominator)
        if isinstance(value, Fraction)
        else value
    )
    return int(as_decimal.to_integral_value(rounding=_ROUNDING[rounding]))


def _divide(numerator: int, denominator: int, rounding: str) -> int:
    """``numerator / denominator`` (neither negative) as whole points by ``rounding``."""
    if rounding == "floor":
        return numerator // denominator
    if rounding == "ceil":
        return -(-numerator // denominator)
    return (2 * numerator + denominator) // (2 * denominator)  # half up


def in_gray_share(code: str, member_id: int, share: Decimal) -> bool:
    """Whether the member is in the rule's share: a stable hash of the two, so that a member
    stays in (or out) as long as the share does not shrink below it."""
    if share >= 1:
        return True
    digest = hashlib.sha256(f"{code}:{member_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < int(share * _GRAY_SCALE)


def local_day(moment: datetime, zone: ZoneInfo) -> date:
    return moment.astimezone(zone).date()


def draw_seed(key: bytes, event_key: str, rule: Rule) -> str:
    """The seed of one rule's draw on one event: HMAC-SHA256 under the installation's
    ``key`` of the event's key and the rule version, as 64 hex digits. The sender chooses
    its event ids but cannot compute which of them win; the seed is recorded, so the draw
    can be replayed (:func:`draw`) and, by whoever holds the key, checked."""
    message = f"{event_key}|{rule.spec.code}|{rule.version}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def draw(seed: str) -> random.Random:
    """The random source a draw's ``seed`` gives: the same seed draws the same."""
    return random.Random(int(seed, 16))


def reversal_due(
    *, awarded: int, eligible_fen: int, refunded_fen: int, already_reversed: int
) -> int:
    """Points to take back after a refund: the awarded points in the proportion of the
    eligible amount refunded so far (``refunded_fen``, all refunds together), less what
    earlier refunds took back. Counting from the whole each time keeps the rounding from
    drifting: refunding everything, in any number of parts, takes back exactly ``awarded``."""
    if eligible_fen <= 0 or awarded <= 0:
        return 0
    share = Fraction(min(refunded_fen, eligible_fen), eligible_fen)
    return max(0, rounded(awarded * share, "half_up") - already_reversed)


def activation(event: Event, facts: Facts) -> dict[str, Any]:
    """What a condition sees: the event (its payload, type and time), the member's facts and
    ``now`` (the event's time). Times inside ``event`` and ``member`` are RFC 3339 text."""
    return {
        "event": {
            **event.payload,
            "type": event.type,
            "time": event.occurred_at.isoformat(),
            "amount_fen": sum(line.amount_fen for line in event.lines),
        },
        "member": {
            "id": facts.member_id,
            "tier": facts.tier or "",
            "tags": sorted(facts.tags),
            "region": facts.region or "",
            "registered_at": facts.registered_at.isoformat() if facts.registered_at else "",
            "birthday": facts.birthday.isoformat() if facts.birthday else "",
            "counts": dict(facts.counts),
        },
        "now": event.occurred_at,
    }


# --------------------------------------------------------------------------- evaluation


@dataclass
class _Pass:
    """The state of one evaluation while the rules are walked."""

    event: Event
    program: Program
    facts: Mapping[int, Facts]
    result: Evaluation = field(default_factory=Evaluation)
    taken_groups: dict[str, str] = field(default_factory=dict)
    wanted: list[Award] = field(default_factory=list)
    multipliers: list[tuple[Rule, Decimal]] = field(default_factory=list)
    specs: dict[str, RuleSpec] = field(default_factory=dict)
    bindings: dict[str, Any] | None = None
    tiered: bool = False
    """A multiplier naming factors by tier applies to the event: it says what tiers earn."""
    gifting: bool = False
    """A birthday gift rule applies to the event: it says what tiers get."""

    @property
    def member(self) -> Facts:
        return self.facts[self.event.member_id]

    def skip(self, rule: Rule, why: str) -> None:
        self.result.skipped.append(Skip(rule.spec.code, why))

    def award(self, rule: Rule, points: int, *, member_id: int | None = None,
              held: bool = False, **detail: Any) -> None:  # fmt: skip
        if points > MAX_AWARD:
            raise EventRefused(
                rule=rule.spec.code,
                problem=f"computes {points} points, more than the {MAX_AWARD} an award may be",
            )
        self.specs[rule.spec.code] = rule.spec
        self.wanted.append(
            Award(
                rule=rule.spec.code,
                version=rule.version,
                kind=rule.spec.params.kind,
                member_id=self.event.member_id if member_id is None else member_id,
                points=points,
                wanted=points,
                held=held,
                detail=detail,
            )
        )


def evaluate(
    event: Event,
    rules: RuleSet,
    program: Program,
    facts: Mapping[int, Facts],
    budgets: Budgets | None = None,
) -> Evaluation:
    """The awards ``rules`` give for ``event``. ``facts`` holds the event's member and anyone
    else an award may go to (a referral's inviter)."""
    if event.member_id not in facts:
        raise EventRefused(rule="-", problem=f"no facts were given for member {event.member_id}")
    state = _Pass(event, program, _entry_tier(program, facts))
    if event.lines and _eligible_fen(event) == 0:
        # Paid wholly by redeeming points: what came from points earns nothing.
        for rule in rules.by_type.get(event.type, ()):
            state.skip(rule, "paid wholly with points: earns nothing")
        return state.result
    for rule in rules.by_type.get(event.type, ()):
        if _fires(state, rule) and rule.spec.stop_after:
            break
    _tier_benefit(state)
    _tier_birthday_gift(state)
    _multiply(state)
    _apply_caps(state, budgets or Budgets())
    return state.result


def release(
    award: Award,
    spec: RuleSpec,
    event: Event,
    program: Program,
    facts: Mapping[int, Facts],
    budgets: Budgets | None = None,
) -> Award:
    """A held award that a reviewer approves, capped as any award is (the member's tier
    caps, the rule's per-member caps and budget, the programme's budget) by ``facts`` and
    ``budgets``: what it posts, and the cap that bit."""
    state = _Pass(event, program, _entry_tier(program, facts))
    state.specs[spec.code] = spec
    state.wanted.append(
        Award(award.rule, award.version, award.kind, award.member_id, award.points,
              award.wanted, None, False, award.detail)
    )  # fmt: skip
    _apply_caps(state, budgets or Budgets())
    return state.result.awards[0]


def _entry_tier(program: Program, facts: Mapping[int, Facts]) -> Mapping[int, Facts]:
    """A member without a tier earns as one of the entry tier: its caps, its rates."""
    if not program.tier_order or all(f.tier is not None for f in facts.values()):
        return facts
    entry = program.tier_order[0]
    return {m: f if f.tier is not None else replace(f, tier=entry) for m, f in facts.items()}


def _tier_benefit(state: _Pass) -> None:
    """The benefits matrix's multiplier of the member's tier, on its spend awards. It comes
    before the rules' multipliers, which compound on it (1.5 and a 双11 2 make 3)."""
    tier = state.member.tier
    factor = state.program.tier_multipliers.get(tier or "")
    if factor is None or factor <= 1:
        return
    # A rule that names factors by tier says what tiers earn on the events it applies to
    # (in its window and share, its condition true): the matrix does not add to it there.
    if state.tiered:
        return
    base_kinds = frozenset({"spend_rate"})
    member_id = state.event.member_id
    mine = [a for a in state.wanted if a.kind in base_kinds and a.member_id == member_id]
    base = sum(a.wanted for a in mine)
    bonus = rounded(Decimal(base) * (factor - 1), "floor")
    if bonus <= 0:
        return
    summed: dict[int, dict[str, int] | None] = {}
    for award in mine:
        _add_weights(summed, member_id, award.detail.get("weights"))
    weights = summed.get(member_id, {})
    state.wanted.append(
        Award(
            rule=TIER_BENEFIT,
            version=0,
            kind="multiplier",
            member_id=member_id,
            points=bonus,
            wanted=bonus,
            detail={"factor": str(factor), "base": base, "base_kinds": base_kinds,
                    "weights": weights, "tier": tier},
        )
    )  # fmt: skip


def _tier_birthday_gift(state: _Pass) -> None:
    """The benefits matrix's birthday gift of the member's tier, when no birthday gift rule
    applies to the event (in its window and share, its condition true): a rule that gives
    one says what tiers get."""
    event = state.event
    if event.type != "member.birthday" or not state.program.birthday_gifts or state.gifting:
        return
    tier = state.member.tier
    points = state.program.birthday_gifts.get(tier or "", 0)
    if points <= 0:
        return
    state.wanted.append(
        Award(rule=TIER_BENEFIT, version=0, kind="birthday_gift", member_id=event.member_id,
              points=points, wanted=points, detail={"tier": tier})
    )  # fmt: skip


def _fires(state: _Pass, rule: Rule) -> bool:
    spec, event = rule.spec, state.event
    if not rule.active_at(event.occurred_at):
        state.skip(rule, "outside the rule's window")
        return False
    if not in_gray_share(spec.code, event.member_id, spec.gray_share):
        state.skip(rule, f"member outside the gray-release share {spec.gray_share}")
        return False
    if spec.code in event.awarded_before:
        state.skip(rule, "already awarded for this subject")
        return False
    if spec.exclusive_group is not None and spec.exclusive_group in state.taken_groups:
        taken_by = state.taken_groups[spec.exclusive_group]
        state.skip(rule, f"exclusive group {spec.exclusive_group!r} taken by {taken_by}")
        return False
    if rule.condition is not None:
        if state.bindings is None:
            state.bindings = activation(event, state.member)
        try:
            holds = rule.condition(state.bindings)
        except ConditionFailed as exc:
            raise EventRefused(rule=spec.code, problem=f"its condition failed: {exc}") from exc
        if not holds:
            state.skip(rule, "condition false")
            return False
    before = len(state.wanted) + len(state.multipliers)
    _KINDS[type(spec.params)](state, rule)
    fired = len(state.wanted) + len(state.multipliers) > before
    if fired and spec.exclusive_group is not None:
        state.taken_groups[spec.exclusive_group] = spec.code
    return fired


def _spend_rate(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, SpendRate)
    event = state.event
    if params.channels is not None and event.payload.get("channel") not in params.channels:
        state.skip(
            rule, f"channel {event.payload.get('channel')!r} not among {sorted(params.channels)}"
        )
        return
    if params.stores is not None and event.payload.get("store") not in params.stores:
        state.skip(rule, f"store {event.payload.get('store')!r} not among {sorted(params.stores)}")
        return
    # In integers: a rate has at most six decimals, so fen × rate × 10⁶ is exact, and the
    # points are that divided by 10⁸ (fen to yuan, and the rate's decimals).
    eligible = 0
    exact = 0
    whole = 0
    weights: dict[str, int] = {}
    for line in event.lines:
        if (
            line.paid_with_points
            or line.sku in params.excluded_skus
            or line.category in params.excluded_categories
        ):
            continue
        rate = params.category_rates.get(line.category, params.rate)
        scaled = line.amount_fen * int(rate * _MICRO)
        eligible += line.amount_fen
        exact += scaled
        whole += _divide(scaled, _POINT, params.rounding)
        weights[line.sku] = weights.get(line.sku, 0) + scaled
    total = whole if params.round_each_line else _divide(exact, _POINT, params.rounding)
    if total <= 0:
        state.skip(rule, "no eligible amount")
        return
    # What each sku contributed: a refund of some lines takes back their share of the award.
    state.award(rule, total, eligible_fen=eligible, weights=weights)


def _fixed(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, FixedAward)
    state.award(rule, params.points)


def _number(state: _Pass, rule: Rule, name: str) -> Decimal:
    value = state.event.payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise EventRefused(rule=rule.spec.code, problem=f"the event needs a number in {name!r}")
    try:
        number = Decimal(str(value))
        if not number.is_finite() or number < 0 or number > MAX_AWARD:
            raise ValueError(number)
        return number
    except (ArithmeticError, ValueError) as exc:
        raise EventRefused(
            rule=rule.spec.code, problem=f"{name!r} must be a number from 0 to {MAX_AWARD}"
        ) from exc


def _per_unit(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, PerUnit)
    units = _number(state, rule, params.field)
    points = rounded(units * params.points_per_unit, params.rounding)
    if points <= 0:
        state.skip(rule, f"{params.field} gives no points")
        return
    state.award(rule, points, units=str(units))


def _multiplier(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, Multiplier)
    member = state.member
    if params.birthday_month:
        month = state.event.occurred_at.astimezone(state.program.zone).month
        if member.birthday is None or member.birthday.month != month:
            state.skip(rule, "not the member's birthday month")
            return
    state.tiered = state.tiered or bool(params.by_tier)
    factor = params.by_tier.get(member.tier or "", params.factor)
    if factor <= 1:
        state.skip(rule, f"factor {factor} for tier {member.tier!r}")
        return
    state.multipliers.append((rule, factor))


def _eligible_fen(event: Event) -> int:
    return sum(line.amount_fen for line in event.lines if not line.paid_with_points)


def _threshold(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, Threshold)
    amount = _eligible_fen(state.event)
    times = amount // params.min_amount_fen
    if not params.repeat:
        times = min(times, 1)
    if times == 0:
        state.skip(rule, f"{amount} fen is below {params.min_amount_fen}")
        return
    state.award(rule, times * params.points, eligible_fen=amount, times=times)


def _first_of_kind(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, FirstOfKind)
    before = state.member.counts.get(state.event.type, 0)
    if before:
        state.skip(rule, f"not the first {state.event.type} ({before} before)")
        return
    state.award(rule, params.points)


def _streak(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, StreakLadder)
    event, member = state.event, state.member
    today = local_day(event.occurred_at, state.program.zone)
    key = (member.member_id, event.type)
    current = state.result.streaks.get(key) or member.streaks.get(event.type)
    if current is not None and current.last_day >= today and key not in state.result.streaks:
        # the same day again, or a day before the run's last (an event that came late): the
        # run neither grows nor goes back
        state.skip(
            rule,
            f"already counted on {today}"
            if current.last_day == today
            else f"{today} is before the run's last day {current.last_day}",
        )
        return
    if key in state.result.streaks:  # a second streak rule on the same event: same run
        length = state.result.streaks[key].length
    elif current is not None and current.last_day == today - timedelta(days=1):
        length = current.length + 1
        if params.cycle and length > max(params.ladder):
            length = 1
    else:
        length = 1
    state.result.streaks[key] = Streak(today, length)
    rung = max(day for day in params.ladder if day <= length)
    state.award(rule, params.ladder[rung], day=length)


def _random(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, RandomBonus)
    seed = draw_seed(state.program.draw_key, state.event.key, rule)
    rng = draw(seed)
    roll = rng.randrange(1_000_000)
    if roll >= int(params.probability * 1_000_000):
        state.skip(
            rule,
            f"draw {roll} of 1000000 missed (needs below {params.probability}); seed {seed}",
        )
        return
    state.award(rule, rng.randint(params.minimum, params.maximum), roll=roll, seed=seed)


def _referral(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, Referral)
    inviter = state.event.payload.get("inviter_member_id")
    if isinstance(inviter, bool) or not isinstance(inviter, int):
        raise EventRefused(rule=rule.spec.code, problem="the event needs inviter_member_id")
    if inviter == state.event.member_id:
        raise EventRefused(rule=rule.spec.code, problem="a member cannot invite itself")
    if inviter not in state.facts:
        raise EventRefused(rule=rule.spec.code, problem=f"unknown inviter {inviter}")
    standing = state.facts[inviter].state
    if params.inviter_points and standing != "active":
        state.skip(rule, f"the inviter {inviter} is {standing}: its side earns nothing")
    elif params.inviter_points:
        state.award(rule, params.inviter_points, member_id=inviter, side="inviter")
    if params.invitee_points:
        state.award(rule, params.invitee_points, side="invitee")


def _birthday_gift(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, BirthdayGift)
    state.gifting = True
    tier = state.member.tier or ""
    points = params.by_tier.get(tier, params.default)
    if points <= 0:
        state.skip(rule, f"no gift for tier {tier!r}")
        return
    state.award(rule, points, tier=tier)


def _reviewed(state: _Pass, rule: Rule) -> None:
    params = rule.spec.params
    assert isinstance(params, Reviewed)
    asked = state.event.payload.get("requested_points", params.points)
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 0:
        raise EventRefused(rule=rule.spec.code, problem="requested_points must be 0 or more")
    points = min(asked, params.max_points)
    if points <= 0:
        state.skip(rule, "nothing requested")
        return
    state.award(rule, points, held=True, requested=asked)


_KINDS: dict[type, Callable[[_Pass, Rule], None]] = {
    SpendRate: _spend_rate,
    FixedAward: _fixed,
    PerUnit: _per_unit,
    Multiplier: _multiplier,
    Threshold: _threshold,
    FirstOfKind: _first_of_kind,
    StreakLadder: _streak,
    RandomBonus: _random,
    Referral: _referral,
    BirthdayGift: _birthday_gift,
    Reviewed: _reviewed,
}


def _multiply(state: _Pass) -> None:
    """Each multiplier adds ``(factor - 1)`` times what the awards it applies to come to so
    far, its own earlier multiplied bonuses included (so 1.5 and 2 make 3). A held award
    (a reviewed rule's) is not multiplied: nothing of it posts before a reviewer approves
    it, and a bonus posted at once would stay when it is rejected."""
    for rule, factor in state.multipliers:
        params = rule.spec.params
        assert isinstance(params, Multiplier)
        applies_to = params.applies_to
        by_member: dict[int, int] = {}
        weights: dict[int, dict[str, int] | None] = {}
        for award in state.wanted:
            if award.held:
                continue
            if award.kind in applies_to or (
                award.kind == "multiplier" and award.detail.get("base_kinds") == applies_to
            ):
                member_id = award.member_id
                by_member[member_id] = by_member.get(member_id, 0) + award.wanted
                _add_weights(weights, member_id, award.detail.get("weights"))
        extra = factor - 1
        for member_id, base in by_member.items():
            bonus = rounded(Decimal(base) * extra, params.rounding)
            if bonus > 0:
                state.award(
                    rule,
                    bonus,
                    member_id=member_id,
                    factor=str(factor),
                    base=base,
                    base_kinds=applies_to,
                    weights=weights[member_id],
                )


def _add_weights(
    into: dict[int, dict[str, int] | None], member_id: int, weights: Mapping[str, int] | None
) -> None:
    """Add an award's weights by sku to the member's sum in ``into``; the sum is None as
    soon as one award has none (then a refund weighs the multiplied award by money)."""
    if member_id not in into:
        into[member_id] = None if weights is None else dict(weights)
        return
    summed = into[member_id]
    if summed is None:
        return
    if weights is None:
        into[member_id] = None
        return
    for sku, weight in weights.items():
        summed[sku] = summed.get(sku, 0) + weight


def refunded_share(
    weights: Mapping[str, int], paid_by_sku: Mapping[str, int], refunded_by_sku: Mapping[str, int]
) -> Fraction:
    """The share of an award that refunds so far take back: each sku's weight in the award,
    times the share of that sku's money refunded (all refunds together)."""
    total = sum(weights.values())
    if total <= 0:
        return Fraction(0)
    taken = Fraction(0)
    for sku, weight in weights.items():
        paid = paid_by_sku.get(sku, 0)
        if paid > 0:
            taken += Fraction(weight) * Fraction(min(refunded_by_sku.get(sku, 0), paid), paid)
    return taken / total


_NO_RULE_CAPS = RuleCaps()


def _apply_caps(state: _Pass, budgets: Budgets) -> None:
    caps = state.program.caps
    by_tier, program_budget = caps.by_tier, caps.budget
    awards, facts, specs = state.result.awards, state.facts, state.specs
    # What this event's earlier awards took: a member's day and month grow alike.
    used_member: dict[int, int] = {}
    used_rule: dict[tuple[int, str, str], int] = {}
    spent_rule = dict(budgets.by_rule)
    spent_program = budgets.program
    for award in state.wanted:
        if award.held:
            awards.append(award)
            continue
        member_id, code, wanted = award.member_id, award.rule, award.wanted
        member = facts.get(member_id)
        if member is None:  # an award can only go to a member whose facts were given
            raise EventRefused(rule=code, problem=f"no facts for member {member_id}")
        spec = specs.get(code)  # none for the tier benefit: no caps of its own
        spec_caps = spec.caps if spec is not None else _NO_RULE_CAPS
        # The tightest cap below what is wanted (the first of equals): the room it leaves,
        # its name and the figures it names, formatted only if it bites.
        room, bit = wanted, None
        tier_cap = by_tier.get(member.tier or "")
        if tier_cap is None and by_tier:
            tier_cap = tier_cap_of(by_tier, state.program.tier_order, member.tier)
        if tier_cap is not None:
            earlier = used_member.get(member_id, 0)
            if tier_cap.day is not None:
                left = tier_cap.day - member.usage.day - earlier
                if left < room:
                    room, bit = left, ("tier_day", member.tier, tier_cap.day)
            if tier_cap.month is not None:
                left = tier_cap.month - member.usage.month - earlier
                if left < room:
                    room, bit = left, ("tier_month", member.tier, tier_cap.month)
        for period, limit in spec_caps.per_member.items():
            left = (
                limit
                - member.usage.by_rule.get((code, period), 0)
                - used_rule.get((member_id, code, period), 0)
            )
            if left < room:
                room, bit = left, (f"rule_{period}", code, limit)
        if spec_caps.budget is not None:
            left = spec_caps.budget - spent_rule.get(code, 0)
            if left < room:
                room, bit = left, ("rule_budget", code, spec_caps.budget)
        if program_budget is not None:
            left = program_budget - spent_program
            if left < room:
                room, bit = left, ("program_budget", None, program_budget)
        points = wanted
        if bit is not None and max(room, 0) < wanted:  # an award of 0 has nothing to cap
            points = max(room, 0)
            name, whose, bound = bit
            cap = f"{name} ({whose}: {bound})" if whose is not None else f"{name} ({bound})"
            # Built directly: dataclasses.replace costs more than the rest.
            award = Award(code, award.version, award.kind, member_id, points, wanted, cap,
                          award.held, award.detail)  # fmt: skip
        awards.append(award)
        used_member[member_id] = used_member.get(member_id, 0) + points
        for period in spec_caps.per_member:
            slot = (member_id, code, period)
            used_rule[slot] = used_rule.get(slot, 0) + points
        spent_rule[code] = spent_rule.get(code, 0) + points
        spent_program += points
