"""Rewards use cases: the catalogue, quotes, redemption, orders, vouchers and lotteries.

A redemption is one transaction: it holds the member's points account (as every posting to
it does), so the member's limits are counted under the same lock the debit takes; prices the
reward with the pure core; debits the points (FIFO lots) or, above the tier's cooling-off
line, freezes them until the member confirms; writes the order, its voucher or its draw; and
takes the stock last, by a conditional decrement, so the reward's row is held only for the
last moment of the transaction and can never go below zero. Cancelling or returning refunds
the very lots the debit took and puts the stock back.

A cash part not paid with the redemption (a member's own app names no payment) freezes the
points too: the order awaits the payment system's confirmation (:func:`pay_order`) until its
``pay_by``, then moves on as a redemption paid at once would have, or lapses
(:func:`lapse_payments`) and gives the points and the stock back.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, Row, bindparam, func, or_, select, update

from jifen import crypto
from jifen.db.bulk import among
from jifen.db.prepared import Prepared, Read, read_one, read_together
from jifen.db.uow import LostRace, UnitOfWork
from jifen.errors import (
    DuplicateReference,
    IdempotencyConflict,
    InvalidInput,
    LimitReached,
    NotOnSale,
    OutOfStock,
    PaymentAmountMismatch,
    PaymentUsed,
    PriceChanged,
    RedemptionPaymentMismatch,
    Refused,
    StateConflict,
    TierNotAllowed,
    UnknownOrder,
    UnknownReward,
    UnknownVoucher,
    VoucherNotUsable,
)
from jifen.expiry import service as expiry_service
from jifen.ledger import SystemAccount
from jifen.members import service as members_service
from jifen.members.core import ERASED_VALUE, PersonalValues
from jifen.notify import service as notify_service
from jifen.points import service as points_service
from jifen.points.schemas import PostingRead
from jifen.programs import service as programs_service
from jifen.rewards import core
from jifen.rewards import store as storage
from jifen.rewards.models import order_steps, prize_stock, reward_orders, rewards, stock_alerts
from jifen.rewards.models import vouchers as vouchers_table
from jifen.rewards.schemas import (
    Available,
    CouponTerms,
    ExpiryReport,
    HoldsReport,
    OrderRead,
    OrderState,
    OrderStep,
    PriceStep,
    Quote,
    RedemptionCreate,
    RedemptionPolicy,
    RewardCreate,
    RewardDef,
    RewardRead,
    StockAlert,
    StoredTerms,
    Texts,
    TierTerms,
    VoucherRead,
    VoucherUsed,
    WhatCanIGet,
)
from jifen.tiers import service as tiers_service
from jifen.tiers.core import Naming, namings

T = TypeVar("T")

_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud at a till
_BUDGET = "*"
_FINAL_KINDS = frozenset({"lottery", "charity", "partner", "vote"})
"""Redemptions that are done once made: a draw, a gift, an exchange out, a ballot."""


# --------------------------------------------------------------------------- the catalogue


def _policy(uow: UnitOfWork, program_id: int) -> RedemptionPolicy:
    # The settings' policy, with the tier benefits matrix's discounts for the tiers it has
    # no terms for.
    return tiers_service.redemption_policy(uow, program_id=program_id)


def _stored_terms(uow: UnitOfWork, row: Any) -> RewardDef:
    """The reward's terms as its operator wrote them, parsed once per version (keyed by its
    id and last change)."""
    key = f"reward_terms:{row.id}:{row.updated_at.isoformat()}"
    cached: RewardDef | None = uow.cache.get(key)
    if cached is None:
        cached = StoredTerms.model_validate(row.terms)
        uow.cache[key] = cached
    return cached


def _terms(uow: UnitOfWork, row: Any) -> RewardDef:
    """The reward's terms as they apply: with the tier benefits matrix's early access for
    each tier the reward names none of its own."""
    cached = _stored_terms(uow, row)
    if cached.sales_start is None:
        return cached
    hours = tiers_service.early_access(uow, program_id=row.program_id)
    added = {t: h for t, h in hours.items() if t not in cached.early_access}
    if not added:
        return cached
    return cached.model_copy(update={"early_access": {**added, **cached.early_access}})


_REWARD_BY_CODE = Prepared(
    select(rewards).where(
        rewards.c.program_id == bindparam("program"), rewards.c.code == bindparam("code")
    ),
    named=True,
)


def _reward_row(uow: UnitOfWork, program_id: int, code: str) -> Any:
    return _known(read_one(uow.conn, _reward_lookup(program_id, code)), code)


def _reward_lookup(program_id: int, code: str) -> Read[Any]:
    """The reward's row, or ``None``, as a read to run together with others."""
    return Read(_REWARD_BY_CODE, {"program": program_id, "code": code}, lambda row: row)


def _known(row: Any, code: str) -> Any:
    if row is None:
        raise UnknownReward(reward=code)
    return row


def _reward_read(uow: UnitOfWork, row: Any, policy: RedemptionPolicy) -> RewardRead:
    # The terms as written, not as the matrix completes them: what is read is what an edit
    # sends back, and the matrix's hours written into the reward would no longer follow it.
    terms = _stored_terms(uow, row)
    return RewardRead(
        **terms.model_dump(),
        id=row.id,
        state=row.state,
        stock_left=row.stock_left,
        stock_total=row.stock_total,
        sold=row.sold,
        band=core.band(terms.points, policy.price_bands),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _terms_json(body: RewardDef) -> dict[str, Any]:
    return body.model_dump(mode="json", include=set(RewardDef.model_fields))


def _check_tiers(uow: UnitOfWork, program_id: int, body: RewardDef) -> None:
    """Refuse a reward naming a tier the programme does not define: no member of it could
    see the reward, or redeem it early."""
    tiers_service.require_defined(uow, program_id=program_id, named=_tiers_named(body))


def tier_namings(uow: UnitOfWork, *, program_id: int) -> list[Naming]:
    """Where the programme's rewards not retired name tiers (their visibility, their early
    access), for refusing to remove one of them. A retired reward is never sold again."""
    rows = uow.conn.execute(
        select(rewards.c.id, rewards.c.code, rewards.c.terms, rewards.c.updated_at)
        .where(rewards.c.program_id == program_id, rewards.c.state != "retired")
        .order_by(rewards.c.code)
    ).all()
    return [
        naming
        for row in rows
        for naming in namings(
            f"reward {row.code}", f"礼品 {row.code}", _tiers_named(_stored_terms(uow, row)),
            "edit the reward to leave it out, or retire the reward",
            "请编辑该礼品去掉该等级,或停用该礼品",
        )
    ]  # fmt: skip


def _tiers_named(body: RewardDef) -> dict[str, list[str]]:
    return {"visible_tiers": body.visible_tiers or [], "early_access": list(body.early_access)}


def create_reward(uow: UnitOfWork, *, program_id: int, body: RewardCreate) -> RewardRead:
    """Add a reward to the catalogue, active at once (its sales window still applies)."""
    _check_tiers(uow, program_id, body)
    exists = uow.conn.execute(
        select(rewards.c.id).where(rewards.c.program_id == program_id, rewards.c.code == body.code)
    ).first()
    if exists is not None:
        raise DuplicateReference(what="Reward", what_zh="礼品", value=body.code)
    now = uow.clock.now()
    reward_id = uow.conn.execute(
        rewards.insert()
        .values(
            program_id=program_id,
            code=body.code,
            kind=body.kind,
            category=body.category,
            points=body.points,
            terms=_terms_json(body),
            stock_left=body.stock,
            stock_total=body.stock,
            safety_stock=body.safety_stock,
            created_at=now,
            updated_at=now,
        )
        .returning(rewards.c.id)
    ).scalar_one()
    if body.lottery is not None:
        _set_prizes(uow, reward_id, body)
    if body.stock is not None and body.stock <= body.safety_stock:
        _raise_alert(uow, program_id, reward_id, body.stock, body.safety_stock)
    return get_reward(uow, program_id=program_id, code=body.code)


def _set_prizes(uow: UnitOfWork, reward_id: int, body: RewardDef) -> None:
    """Make the lottery's prize stock and budget match its terms, keeping what was given.
    The rows are locked first and changed in place, so a draw running meanwhile is counted
    (it waits, or this waits for it) and never given out twice."""
    assert body.lottery is not None
    query = select(prize_stock.c.prize_code, prize_stock.c.given).where(
        prize_stock.c.reward_id == reward_id
    )
    if uow.dialect == "postgresql":
        query = query.order_by(prize_stock.c.prize_code).with_for_update()
    given = dict(uow.conn.execute(query).all())
    wanted = {prize.code: prize.quantity for prize in body.lottery.prizes}
    wanted[_BUDGET] = body.lottery.budget
    for code, total in wanted.items():
        taken = given.get(code, 0)
        remaining = None if total is None else max(total - taken, 0)
        if code in given:
            uow.conn.execute(
                prize_stock.update()
                .where(prize_stock.c.reward_id == reward_id, prize_stock.c.prize_code == code)
                .values(remaining=remaining)
            )
        else:
            uow.conn.execute(
                prize_stock.insert().values(
                    reward_id=reward_id, prize_code=code, given=0, remaining=remaining
                )
            )
    gone = [code for code in given if code not in wanted]
    if gone:  # prizes no longer offered: none left to draw
        uow.conn.execute(
            prize_stock.update()
            .where(prize_stock.c.reward_id == reward_id, prize_stock.c.prize_code.in_(gone))
            .values(remaining=0)
        )


def update_reward(uow: UnitOfWork, *, program_id: int, code: str, body: RewardDef) -> RewardRead:
    """Replace a reward's terms (its kind and stock stay; restock changes the stock)."""
    if body.code != code:
        raise InvalidInput(
            field="code",
            problem=f"the body names {body.code!r}, the path {code!r}",
            problem_zh=f"请求体中的代码 {body.code!r} 与路径中的 {code!r} 不一致。",
        )
    row = _reward_row(uow, program_id, code)
    if body.kind != row.kind:
        raise InvalidInput(
            field="kind",
            problem=f"a {row.kind} reward cannot become {body.kind}; add a new reward instead",
            problem_zh=f"{row.kind} 类礼品不能改为 {body.kind};请新建礼品。",
        )
    pickup = _terms(uow, row).pickup
    if body.pickup != pickup and _has_orders(uow, row.id):
        # Its orders were made to be collected (with a voucher) or shipped (without one):
        # read the other way, one could be shipped and collected too, or never delivered.
        how, how_zh = ("collected at a store", "门店自提") if pickup else ("shipped", "快递发货")
        raise InvalidInput(
            field="pickup",
            problem=f"reward {code!r} has orders made to be {how}; it cannot change how it "
            "is fulfilled: add a new reward instead",
            problem_zh=f"礼品 {code!r} 已有按{how_zh}方式下的订单,不能更改交付方式;请新建礼品。",
        )
    _check_tiers(uow, program_id, body)
    left = uow.conn.execute(
        rewards.update()
        .where(rewards.c.id == row.id)
        .values(
            category=body.category,
            points=body.points,
            terms=_terms_json(body),
            safety_stock=body.safety_stock,
            updated_at=_later(uow, row.updated_at),
        )
        .returning(rewards.c.stock_left)
    ).scalar_one()
    if body.lottery is not None:
        _set_prizes(uow, row.id, body)
    if left is not None:  # the safety line may have moved past the stock, either way
        if left <= body.safety_stock and row.state != "retired":
            _raise_alert(uow, program_id, row.id, left, body.safety_stock)
        else:
            _clear_alert(uow, row.id)
    return get_reward(uow, program_id=program_id, code=code)


def _has_orders(uow: UnitOfWork, reward_id: int) -> bool:
    found = uow.conn.execute(
        select(reward_orders.c.id).where(reward_orders.c.reward_id == reward_id).limit(1)
    ).first()
    return found is not None


def _later(uow: UnitOfWork, previous: datetime) -> datetime:
    """Now, or just after ``previous``: each version of a reward has its own stamp."""
    return max(uow.clock.now(), previous + timedelta(microseconds=1))


def set_state(uow: UnitOfWork, *, program_id: int, code: str, state: str) -> RewardRead:
    """Pause, resume or retire a reward (orders already made are not touched); a retired
    reward's open restock alert is cleared."""
    row = _reward_row(uow, program_id, code)
    if row.state == "retired" and state != "retired":
        raise StateConflict(
            problem=f"Reward {code!r} is retired and cannot come back; add a new reward.",
            problem_zh=f"礼品 {code!r} 已下架,不能恢复;请新建礼品。",
        )
    uow.conn.execute(
        rewards.update()
        .where(rewards.c.id == row.id)
        .values(state=state, updated_at=_later(uow, row.updated_at))
    )
    if state == "retired":  # never sold again: nothing to restock
        _clear_alert(uow, row.id)
    return get_reward(uow, program_id=program_id, code=code)


def restock(uow: UnitOfWork, *, program_id: int, code: str, add: int) -> RewardRead:
    """Add units to a reward's stock; an open restock alert clears once above safety stock."""
    row = _reward_row(uow, program_id, code)
    if row.stock_left is None:
        raise StateConflict(
            problem=f"Reward {code!r} has unlimited stock; there is nothing to add to.",
            problem_zh=f"礼品 {code!r} 库存不限,无需补货。",
        )
    left = uow.conn.execute(
        update(rewards)
        .where(rewards.c.id == row.id)
        .values(stock_left=rewards.c.stock_left + add, stock_total=rewards.c.stock_total + add)
        .returning(rewards.c.stock_left)
    ).scalar_one()
    if left > row.safety_stock:
        _clear_alert(uow, row.id)
    return get_reward(uow, program_id=program_id, code=code)


def get_reward(uow: UnitOfWork, *, program_id: int, code: str) -> RewardRead:
    return _reward_read(uow, _reward_row(uow, program_id, code), _policy(uow, program_id))


def list_rewards(
    uow: UnitOfWork,
    *,
    program_id: int,
    kind: str | None = None,
    category: str | None = None,
    state: str | None = None,
    min_points: int | None = None,
    max_points: int | None = None,
    after_id: int = 0,
    limit: int = 50,
) -> tuple[list[RewardRead], str | None]:
    """The catalogue in id order, filtered; the cursor is the last id of the page."""
    query = select(rewards).where(rewards.c.program_id == program_id, rewards.c.id > after_id)
    for column, value in ((rewards.c.kind, kind), (rewards.c.category, category),
                          (rewards.c.state, state)):  # fmt: skip
        if value is not None:
            query = query.where(column == value)
    if min_points is not None:
        query = query.where(rewards.c.points >= min_points)
    if max_points is not None:
        query = query.where(rewards.c.points <= max_points)
    rows = uow.conn.execute(query.order_by(rewards.c.id).limit(limit + 1)).all()
    policy = _policy(uow, program_id)
    items = [_reward_read(uow, row, policy) for row in rows[:limit]]
    return items, str(items[-1].id) if len(rows) > limit else None


def open_alerts(
    uow: UnitOfWork, *, program_id: int, after_id: int = 0, limit: int = 50
) -> tuple[list[StockAlert], str | None]:
    """Rewards at or below their safety stock, since when (cleared by a restock), oldest
    alert first; and the cursor of the next page (the last alert's id) if there is one."""
    rows = uow.conn.execute(
        select(stock_alerts.c.id, rewards.c.code, stock_alerts.c.stock_left,
               stock_alerts.c.safety_stock, stock_alerts.c.raised_at)
        .join(rewards, rewards.c.id == stock_alerts.c.reward_id)
        .where(stock_alerts.c.program_id == program_id, stock_alerts.c.cleared_at.is_(None),
               stock_alerts.c.id > after_id)
        .order_by(stock_alerts.c.id)
        .limit(limit + 1)
    ).all()  # fmt: skip
    items = [
        StockAlert(id=r.id, reward=r.code, stock_left=r.stock_left, safety_stock=r.safety_stock,
                   raised_at=r.raised_at)
        for r in rows[:limit]
    ]  # fmt: skip
    return items, str(items[-1].id) if len(rows) > limit else None


# --------------------------------------------------------------------------- quotes


def _buyer(
    uow: UnitOfWork, program_id: int, member_id: int, birthday: date | bool | None = False
) -> core.Buyer:
    """The member's tier and whether this is its birthday month (``birthday``: the date if
    the caller has read it already, ``False`` to read it here)."""
    tier = tiers_service.tiers_of(uow, member_ids=[member_id]).get(member_id)
    if birthday is False:
        facts = members_service.rule_facts(uow, program_id=program_id, member_ids=[member_id])
        birthday = facts[member_id].birthday if member_id in facts else None
    born = birthday if isinstance(birthday, date) else None
    return core.Buyer(tier=tier, birthday_month=_birthday_month(uow, program_id, born))


def _birthday_month(uow: UnitOfWork, program_id: int, birthday: date | None) -> bool:
    if birthday is None:
        return False
    zone = ZoneInfo(programs_service.time_zone(uow, program_id=program_id))
    return uow.clock.now().astimezone(zone).month == birthday.month


def _quote(
    uow: UnitOfWork, row: Any, terms: RewardDef, buyer: core.Buyer, quantity: int,
    policy: RedemptionPolicy,
) -> Quote:  # fmt: skip
    return core.quote(
        terms, quantity=quantity, buyer=buyer, policy=policy, sold=row.sold,
        stock_total=row.stock_total,
    )  # fmt: skip


def quote(
    uow: UnitOfWork, *, program_id: int, member_id: int, code: str, quantity: int = 1
) -> Quote:
    """What ``quantity`` of the reward costs the member now, and how the price was reached;
    refused, as its redemption would be, for a reward hidden from the member's tier or more
    units than one redemption of it takes."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    row = _reward_row(uow, program_id, code)
    buyer = _buyer(uow, program_id, member_id)
    terms = _terms(uow, row)
    core.check_visible(terms, buyer.tier)
    core.check_quantity(terms, quantity)
    return _quote(uow, row, terms, buyer, quantity, _policy(uow, program_id))


# --------------------------------------------------------------------------- redemption


def _fingerprint(member_id: int, body: RedemptionCreate, merchant: str | None) -> str:
    payload = {"member": member_id, "merchant": merchant, **body.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _counts(
    uow: UnitOfWork, program_id: int, member_id: int, reward_id: int, terms: RewardDef
) -> tuple[int, int]:
    """Units of this reward the member redeemed in its limit period, and the member's
    redemptions this calendar month (cancelled and returned ones do not count)."""
    zone = programs_service.time_zone(uow, program_id=program_id)
    now = uow.clock.now()
    counted = reward_orders.c.state.not_in(["cancelled", "returned"])
    month_start = core.period_start("month", now, zone)
    reward_start = core.period_start(terms.limit_period, now, zone)
    of_reward = func.coalesce(
        func.sum(reward_orders.c.quantity).filter(
            reward_orders.c.reward_id == reward_id,
            *([reward_orders.c.created_at >= reward_start] if reward_start else []),
        ),
        0,
    )
    this_month = func.count().filter(reward_orders.c.created_at >= month_start)
    row = uow.conn.execute(
        select(of_reward, this_month).where(reward_orders.c.member_id == member_id, counted)
    ).one()
    return int(row[0]), int(row[1])


def _replay(uow: UnitOfWork, program_id: int, key: str, request_hash: str) -> OrderRead | None:
    """The order a key already made (``None``: none), if the request is the same one."""
    row = uow.conn.execute(
        select(reward_orders.c.id, reward_orders.c.request_hash).where(
            reward_orders.c.program_id == program_id, reward_orders.c.idempotency_key == key
        )
    ).one_or_none()
    if row is None:
        return None
    if row.request_hash != request_hash:
        raise IdempotencyConflict(key=key)
    return _order_read(uow, _order_row(uow, program_id, row.id), replayed=True)


_Admitted = tuple[Any, RewardDef, RedemptionPolicy, Quote, TierTerms]
"""An admitted redemption: the reward's row and terms, the policy, the price, the tier's
terms."""


def redeem(
    uow: UnitOfWork,
    *,
    program_id: int,
    member_id: int,
    body: RedemptionCreate,
    key: str,
    actor: str,
    merchant: str | None = None,
    store: str | None = None,
) -> OrderRead:
    """Redeem ``body.quantity`` of a reward for the member, all or nothing. Every check comes
    before the first write; the stock is taken last.

    On PostgreSQL a redemption whose limits need no count of the member's past orders is
    admitted before the member's lock, and its debit takes the lock in the statement that
    writes it (:func:`points_service.spend`); one that counts them takes the lock first, so
    that two of them cannot both pass the count."""
    request_hash = _fingerprint(member_id, body, merchant)
    # The member (the programme's, and active), the reward and the programme's policy (which
    # the redemption policy below takes from the transaction) in one round trip, with
    # whether any webhook may hear of the order.
    birthday, reward, _, _ = read_together(
        uow.conn,
        members_service.active_birthday_read(program_id, member_id),
        _reward_lookup(program_id, body.reward),
        programs_service.settings_read(uow, program_id),
        notify_service.subscriptions_read(uow, program_id),
    )
    now = uow.clock.now()
    admitted: _Admitted | OrderRead | None = None
    if uow.dialect == "postgresql":
        admitted = _or_replay(
            uow, program_id, key, request_hash,
            lambda: _admit(uow, program_id, member_id, body, reward, birthday, now, locked=False),
        )  # fmt: skip
    if admitted is None:
        if points_service.lock_account(uow, member_id=member_id, key=key, spending=True):
            replayed = _replay(uow, program_id, key, request_hash)
            if replayed is None:  # the key already posted something that is not an order
                raise IdempotencyConflict(key=key)
            return replayed
        admitted = _or_replay(
            uow, program_id, key, request_hash,
            lambda: _admit(uow, program_id, member_id, body, reward, birthday, now, locked=True),
        )  # fmt: skip
    if isinstance(admitted, OrderRead):
        return admitted
    assert admitted is not None
    row, terms, policy, price, tier_terms = admitted
    # A cash part not paid yet: the order awaits its payment (the cooling-off, if any, is
    # decided when the payment comes).
    awaiting = price.cash_fen > 0 and body.payment_ref is None
    wait = None if awaiting else core.cooling_off(price.points, tier_terms)
    pay_by = now + timedelta(minutes=policy.payment_minutes) if awaiting else None
    frozen = awaiting or wait is not None
    reason = f"redeem {terms.code} × {body.quantity}"
    hold_posting = spend_posting = None

    def pay() -> PostingRead:
        if frozen:
            why = "awaiting payment" if awaiting else "hold"
            return points_service.freeze(
                uow, member_id=member_id, amount=price.points, key=key, reason=f"{why}: {reason}",
                actor=actor, require_active=True,
            )  # fmt: skip
        return _spend(uow, member_id, price.points, key, reason, actor, terms)

    paid = _or_replay(uow, program_id, key, request_hash, pay)
    if isinstance(paid, OrderRead):
        return paid
    if paid.replayed:
        # A twin of this request (same key) committed after the checks above: its order, or,
        # if the key paid for something other than an order, a conflict.
        replayed = _replay(uow, program_id, key, request_hash)
        if replayed is None:
            raise IdempotencyConflict(key=key)
        return replayed
    if frozen:
        hold_posting = paid.id
    else:
        spend_posting = paid.id
    steps = [step.model_dump() for step in price.steps]
    state = "awaiting_payment" if awaiting else "held" if wait else "created"
    order = {
        "program_id": program_id, "member_id": member_id, "reward_id": row.id,
        "idempotency_key": key, "request_hash": request_hash, "state": state,
        "quantity": body.quantity, "points": price.points, "cash_fen": price.cash_fen,
        "value_fen": price.value_fen, "payment_ref": body.payment_ref, "price": steps,
        "outcome": _request_outcome(body, terms), "hold_until": now + wait if wait else None,
        "pay_by": pay_by, "spend_posting_id": spend_posting, "hold_posting_id": hold_posting,
        "refund_posting_id": None, "merchant": merchant, "store": store, "created_at": now,
        "updated_at": now,
    }  # fmt: skip
    limited = row.stock_left is not None
    voucher = None
    if frozen or (terms.kind == "physical" and not terms.pickup):
        # Nothing to fulfil now: the order, its step and the stock in one write.
        note = ""
        if pay_by is not None:
            note = (
                f"awaiting payment of {price.cash_fen} fen until {_local(uow, program_id, pay_by)}"
            )
        elif wait is not None:
            note = f"cooling-off until {_local(uow, program_id, now + wait)}"
        first = OrderStep(state=state, at=now, by=actor, note=note)
        order_id, left = storage.finish(uow.conn, order, first.model_dump(), limited=limited)
        if order_id is None:
            raise LostRace(f"reward {row.code} sold out or paused since it was checked")
        order["id"] = order_id
        made = [first]
        _announce(uow, program_id, order_id, state)
    else:
        first = OrderStep(state="created", at=now, by=actor)
        order["id"] = storage.insert_order(uow.conn, order, first.model_dump())
        _announce(uow, program_id, order["id"], "created")  # its fulfilment tells its own
        fulfilled, outcome, voucher, more = _fulfil(uow, program_id, order, terms, policy, actor)
        order.update(state=fulfilled, outcome=outcome)
        made = [first, *more]
        left = _take_stock(uow, row, body.quantity) if limited else None
        if not limited and not storage.still_on_sale(uow.conn, row.id):
            # Paused or retired since it was read (before the member's lock): the stock's
            # decrement would have seen it; without one, this does. Run it again.
            raise LostRace(f"reward {row.code} paused since it was checked")
    if left is not None:
        _alert(uow, program_id, row, left, body.quantity)
    return OrderRead(
        **{k: v for k, v in order.items() if k in OrderRead.model_fields and k != "price"},
        reward=terms.code,
        kind=terms.kind,
        price=price.steps,
        voucher=voucher,
        steps=made,
    )


def _or_replay(
    uow: UnitOfWork, program_id: int, key: str, request_hash: str, work: Callable[[], T]
) -> T | OrderRead:
    """``work()``, or, where it refuses, the order a twin of this request (same key) made if
    one has committed since: the refusal may be only what that twin did (it took the stock,
    the points, the limit, or the key itself). A request found malformed against the
    reward's terms of now (an option no longer offered) is answered the same way: a twin's
    order stands whatever the terms became since. A key that made another posting, and no
    order, is a conflict, as it is when the checks pass (the debit finds the key) and as it
    was when the key was looked up first."""
    try:
        return work()
    except (Refused, InvalidInput) as refused:
        replayed = _replay(uow, program_id, key, request_hash)
        if replayed is not None:
            return replayed
        if not isinstance(refused, IdempotencyConflict) and points_service.key_used(
            uow, program_id=program_id, key=key
        ):
            raise IdempotencyConflict(key=key) from None
        raise


def _admit(
    uow: UnitOfWork, program_id: int, member_id: int, body: RedemptionCreate, reward: Any,
    birthday: date | None, now: datetime, *, locked: bool,
) -> _Admitted | None:  # fmt: skip
    """Every check of a redemption, before anything is written: the reward (its row read,
    ``None`` if there is none) on sale to the member, its details, the price, the limits,
    the stock, the payment of a cash part. ``None`` when the limits count the member's past
    orders and the member's account is not ``locked`` yet: they are counted under the lock."""
    row = _known(reward, body.reward)
    terms = _terms(uow, row)
    policy = _policy(uow, program_id)
    if policy.tiers or terms.visible_tiers is not None or terms.early_access:
        buyer = _buyer(uow, program_id, member_id, birthday)
    else:  # nothing here depends on the member's tier: one read fewer
        buyer = core.Buyer(tier=None, birthday_month=_birthday_month(uow, program_id, birthday))
    tier_terms = policy.for_tier(buyer.tier)
    counted = terms.limit_per_member is not None or tier_terms.per_month is not None
    if counted and not locked:
        return None
    zone = programs_service.time_zone(uow, program_id=program_id)
    core.check_on_sale(terms, state=row.state, tier=buyer.tier, now=now, zone=zone)
    _check_prizes_left(uow, row.id, terms)
    _check_event_ahead(terms, now, zone)
    _check_details(terms, body)
    price = _quote(uow, row, terms, buyer, body.quantity, policy)
    if body.expected_points is not None and body.expected_points != price.points:
        raise PriceChanged(reward=terms.code, points=price.points, expected=body.expected_points)
    if body.payment_ref is not None and price.cash_fen == 0:
        # Recorded, it would spend the reference on an order that owes no cash: its money,
        # taken by the till, would never be said to be due back.
        raise InvalidInput(
            field="payment_ref",
            problem=f"reward {terms.code!r} has no cash part, so no payment pays for it; "
            f"nothing was recorded: refund payment {body.payment_ref!r} if one was taken, and "
            "redeem it without payment_ref",
            problem_zh=f"礼品 {terms.code!r} 没有现金部分,无需支付;未作任何记录:如已收款,"
            f"请退还支付 {body.payment_ref!r},并在不带 payment_ref 的情况下兑换。",
        )
    if body.amount_fen is not None and body.amount_fen != price.cash_fen:
        raise RedemptionPaymentMismatch(
            reward=terms.code, quantity=body.quantity, due_fen=price.cash_fen,
            paid_fen=body.amount_fen, payment_ref=body.payment_ref,
        )  # fmt: skip
    of_reward = this_month = 0
    if counted:
        of_reward, this_month = _counts(uow, program_id, member_id, row.id, terms)
    core.check_limits(
        terms, quantity=body.quantity, points=price.points, terms=tier_terms, tier=buyer.tier,
        redeemed_of_reward=of_reward, redemptions_this_month=this_month,
        everyone=not policy.tiers,
    )  # fmt: skip
    if row.stock_left is not None and row.stock_left < body.quantity:
        raise OutOfStock(reward=terms.code, left=row.stock_left, wanted=body.quantity)
    if body.payment_ref is not None:
        _require_unused_payment(uow, program_id, body.payment_ref)
    return row, terms, policy, price, tier_terms


def _require_unused_payment(uow: UnitOfWork, program_id: int, payment_ref: str) -> None:
    """Refuse a payment that already paid for an order. Two redemptions sending it at once
    both pass here; the unique index refuses the second's order, and its transaction, run
    again, is refused here."""
    paid = uow.conn.execute(
        select(reward_orders.c.id).where(
            reward_orders.c.program_id == program_id, reward_orders.c.payment_ref == payment_ref
        )
    ).first()
    if paid is not None:
        raise PaymentUsed(payment_ref=payment_ref, order_id=paid.id)


def order_paid_by(uow: UnitOfWork, *, program_id: int, posting_id: int) -> int | None:
    """The redemption order a spend or a hold posting paid for, if any."""
    found = uow.conn.execute(
        select(reward_orders.c.id).where(
            reward_orders.c.program_id == program_id,
            or_(
                reward_orders.c.spend_posting_id == posting_id,
                reward_orders.c.hold_posting_id == posting_id,
            ),
        )
    ).first()
    return None if found is None else int(found.id)


UNFINISHED = ("awaiting_payment", "held", "created", "confirmed", "shipped")
"""States of an order not yet done with: waiting for the payment of its cash part, for its
cooling-off confirmation, for shipping, pickup or handing over, or on its way."""


def unfinished_orders(uow: UnitOfWork, *, program_id: int, member_id: int) -> list[int]:
    """The member's redemption orders in an :data:`UNFINISHED` state, oldest first."""
    found = uow.conn.execute(
        select(reward_orders.c.id)
        .where(
            reward_orders.c.member_id == member_id,
            reward_orders.c.program_id == program_id,
            reward_orders.c.state.in_(UNFINISHED),
        )
        .order_by(reward_orders.c.id)
    ).scalars()
    return [int(order_id) for order_id in found]


def _local(uow: UnitOfWork, program_id: int, moment: datetime) -> str:
    """``moment`` as a refusal, an order's note or a message to the member shows it: in the
    programme's time zone, with its offset."""
    return core.local_text(moment, programs_service.time_zone(uow, program_id=program_id))


def _check_event_ahead(terms: RewardDef, now: datetime, zone: str) -> None:
    """Refuse a registration for an event that has started (named in the programme's time
    zone ``zone``)."""
    if terms.event is not None and now >= terms.event.starts_at:
        starts = core.local_text(terms.event.starts_at, zone)
        raise NotOnSale(
            reward=terms.code,
            problem=f"the event started at {starts}; registration is closed.",
            problem_zh=f"活动已于 {starts} 开始,报名已截止。",
        )


def _check_details(terms: RewardDef, body: RedemptionCreate) -> None:
    if terms.vote is not None:
        if body.choice not in terms.vote.options:
            raise InvalidInput(
                field="choice",
                problem=f"vote for one of {', '.join(terms.vote.options)}",
                problem_zh=f"请从以下选项中投票:{'、'.join(terms.vote.options)}",
            )
    elif body.choice is not None:
        raise InvalidInput(
            field="choice",
            problem="only a vote takes a choice",
            problem_zh="只有投票类礼品可以填写 choice。",
        )
    if terms.partner is not None and body.partner_account is None:
        raise InvalidInput(
            field="partner_account",
            problem=f"give the member's account at {terms.partner.partner}",
            problem_zh=f"请提供会员在 {terms.partner.partner} 的账号。",
        )
    if terms.partner is None and body.partner_account is not None:
        raise InvalidInput(
            field="partner_account",
            problem="only a partner exchange takes one",
            problem_zh="只有合作方兑换类礼品可以填写 partner_account。",
        )


def _request_outcome(body: RedemptionCreate, terms: RewardDef) -> dict[str, Any]:
    """What the order keeps of the request, and of the terms it was priced on that it gives:
    a partner's units are those of the rate its points paid for, a coupon's terms those it
    was bought with, a donation's charity the one the member chose, also when it completes
    after a cooling-off or a payment, whatever the terms became meanwhile."""
    outcome: dict[str, Any] = {}
    if body.choice is not None:
        outcome["choice"] = body.choice
    if body.partner_account is not None:
        outcome["partner_account"] = body.partner_account
    if terms.partner is not None:
        outcome.update(_partner_units(terms, body.quantity))
    if terms.coupon is not None:
        outcome["coupon"] = terms.coupon.model_dump(mode="json")
    if terms.charity is not None:
        outcome["charity"] = terms.charity.charity
    return outcome


def _partner_units(terms: RewardDef, quantity: int) -> dict[str, Any]:
    assert terms.partner is not None
    return {"partner": terms.partner.partner, "unit": terms.partner.unit,
            "units": terms.partner.units * quantity}  # fmt: skip


def _spend(
    uow: UnitOfWork, member_id: int, points: int, key: str, reason: str, actor: str,
    terms: RewardDef,
) -> PostingRead:  # fmt: skip
    return points_service.spend(
        uow, member_id=member_id, amount=points, key=key, reason=reason, actor=actor,
        into=_spent_into(terms),
    )  # fmt: skip


def _spent_into(terms: RewardDef) -> SystemAccount:
    """The account a redemption's points go into: charity for a donation, partners for an
    exchange out, else redeemed."""
    return {"charity": SystemAccount.CHARITY, "partner": SystemAccount.PARTNERS}.get(
        terms.kind, SystemAccount.REDEEMED
    )


def _step(
    uow: UnitOfWork, program_id: int, order_id: int, state: str, by: str, note: str = "",
    *, tell_member: bool = True,
) -> OrderStep:  # fmt: skip
    """Record that the order moved to ``state``, and tell who should hear of it
    (:func:`_announce`; ``tell_member=False``: the webhooks only, where the member hears of
    it otherwise)."""
    step = OrderStep(state=state, at=uow.clock.now(), by=by, note=note)
    storage.insert_step(uow.conn, order_id, step.model_dump())
    _announce(uow, program_id, order_id, state, tell_member=tell_member)
    return step


_TOLD = {"shipped": "order.shipped", "cancelled": "order.cancelled", "returned": "order.returned"}
"""The steps of an order its member hears of in the inbox: the ones that give points back
or send goods on their way. The others it took itself, or sees in the answer it got."""


def _order_event(row: Any, state: str, at: datetime, name: Texts) -> dict[str, Any]:
    """What a webhook and a note say of an order that moved to ``state``: the reward by its
    code (for the programme's systems) and by its ``name`` in each language (for the
    member; where one is empty, the other)."""
    data: dict[str, Any] = {
        "order_id": row.id, "member_id": row.member_id, "reward": row.code, "kind": row.kind,
        "reward_name_zh": name.zh or name.en, "reward_name_en": name.en or name.zh,
        "state": state, "quantity": row.quantity, "points": row.points,
        "cash_fen": row.cash_fen, "merchant": row.merchant, "store": row.store,
        "at": at.isoformat(),
    }  # fmt: skip
    tracking = row.outcome.get("tracking")
    if state == "shipped":
        data["tracking"] = tracking or "-"
    if row.refund_posting_id is not None:
        data["refund_posting_id"] = row.refund_posting_id
    return data


def _announce(
    uow: UnitOfWork, program_id: int, order_id: int, state: str, *, tell_member: bool = True
) -> None:
    """Raise ``reward_order.<state>`` for the programme's webhooks subscribed to it and, for
    the steps in :data:`_TOLD`, put a note in the member's inbox: both in this transaction,
    sent by the outbox after commit, each once (keyed by the order and the state)."""
    template = _TOLD.get(state) if tell_member else None
    if template is None and not notify_service.may_publish(uow, program_id=program_id):
        return  # no one to tell: nothing to read
    row = _order_row(uow, program_id, order_id)
    name = _stored_terms(uow, _reward_row(uow, program_id, row.code)).name
    data = _order_event(row, state, uow.clock.now(), name)
    key = f"order:{order_id}:{state}"
    notify_service.publish(
        uow, program_id=program_id, event_type=f"reward_order.{state}", data=data, key=key
    )
    if template is not None:
        notify_service.notify(
            uow,
            notify_service.Notification(
                program_id=program_id,
                member_id=row.member_id,
                template=template,
                data=data,
                key=key,
            ),
        )


def _set_order(uow: UnitOfWork, order_id: int, **values: Any) -> None:
    uow.conn.execute(
        reward_orders.update()
        .where(reward_orders.c.id == order_id)
        .values(updated_at=uow.clock.now(), **values)
    )


def _fulfil(
    uow: UnitOfWork,
    program_id: int,
    order: dict[str, Any],
    terms: RewardDef,
    policy: RedemptionPolicy,
    actor: str,
) -> tuple[OrderState, dict[str, Any], VoucherRead | None, list[OrderStep]]:
    """What the points bought, once they are debited: a voucher, a draw, a receipt, a ballot,
    partner units, or goods waiting for staff to ship them. Answers the order's state and
    outcome, its voucher and the steps it added (goods to ship change nothing)."""
    order_id: int = order["id"]
    outcome = dict(order["outcome"])
    if terms.kind == "physical" and not terms.pickup:
        return "created", outcome, None, []
    state: OrderState = "delivered"
    voucher = None
    if terms.has_voucher:
        days = terms.validity_days or policy.validity_days.get(terms.kind, 90)
        voucher = _issue_voucher(uow, program_id, order, terms, days)
        outcome["voucher"] = voucher.code
        if terms.pickup:
            state = "created"  # delivered when the voucher is used at the store
    elif terms.lottery is not None:
        outcome.update(_draw(uow, program_id, order, terms, actor))
        if outcome.get("prize") and not outcome.get("prize_points"):
            state = "created"  # a prize staff hand over
    elif terms.partner is not None and "units" not in outcome:  # one made before it kept them
        outcome.update(_partner_units(terms, order["quantity"]))
    elif terms.charity is not None:
        outcome["receipt"] = {
            "number": f"JF-{program_id}-{order_id:08d}",
            "charity": outcome.get("charity", terms.charity.charity),
            "points": order["points"],
            "value_fen": order["value_fen"],
            "at": uow.clock.now().isoformat(),
        }
        if order["cash_fen"]:  # given in cash too: the receipt says how much, and how paid
            outcome["receipt"].update(cash_fen=order["cash_fen"], payment_ref=order["payment_ref"])
    _set_order(uow, order_id, outcome=outcome, state=state)
    steps = [] if state == "created" else [_step(uow, program_id, order_id, state, actor)]
    return state, outcome, voucher, steps


def _issue_voucher(
    uow: UnitOfWork, program_id: int, order: dict[str, Any], terms: RewardDef, days: int
) -> VoucherRead:
    """A new voucher with a random code of 12 characters (60 bits): guessing one is hopeless,
    and in the rare clash the unique index refuses it and the transaction runs again with a
    new code (the index is one of the races :func:`jifen.db.uow.is_transient` knows). A
    coupon's terms are those the order was bought with (one made before the order kept
    them: the reward's)."""
    kept = order["outcome"].get("coupon")
    terms_bought = terms.coupon if kept is None else CouponTerms.model_validate(kept)
    voucher = VoucherRead(
        code="".join(secrets.choice(_CODE_ALPHABET) for _ in range(12)),
        state="issued",
        order_id=order["id"],
        member_id=order["member_id"],
        reward=terms.code,
        valid_until=uow.clock.now() + timedelta(days=days),
        coupon=terms_bought,
    )
    coupon = None if terms_bought is None else terms_bought.model_dump(mode="json")
    uow.conn.execute(
        _INSERT_VOUCHER,
        {"program_id": program_id, "code": voucher.code, "order_id": voucher.order_id,
         "member_id": voucher.member_id, "valid_until": voucher.valid_until, "coupon": coupon},
    )  # fmt: skip
    return voucher


_INSERT_VOUCHER = vouchers_table.insert()


def draw_seed(program_id: int, reward_id: int, key: str) -> str:
    """The seed of a lottery's draw: a keyed hash, under the installation's secret, of the
    programme, the lottery and the order's idempotency key. The same three always give the
    same seed (a draw can be worked out again), while one key sent to two programmes or two
    lotteries draws apart; and no member can choose a key that wins."""
    return crypto.keyed_hash(f"lottery draw program {program_id} reward {reward_id} key {key}")


def _draw(
    uow: UnitOfWork, program_id: int, order: dict[str, Any], terms: RewardDef, actor: str
) -> dict[str, Any]:  # fmt: skip
    """Draw a prize from :func:`draw_seed`, recorded with the roll, so anyone can check the
    roll from the seed. A prize whose quantity or the budget is used up gives nothing
    instead."""
    assert terms.lottery is not None
    seed = draw_seed(program_id, order["reward_id"], order["idempotency_key"])
    drawn = core.roll(seed)
    prize = core.prize_for(terms.lottery, drawn)
    result: dict[str, Any] = {"draw": {"seed": seed, "roll": drawn, "ppm": core.PPM}}
    if prize is None:
        result["prize"] = None
        return result
    if not _take_prize(uow, order["reward_id"], prize.code, prize.cost):
        result.update(prize=None, missed=prize.code)
        return result
    result["prize"] = prize.code
    result["prize_name"] = prize.name.model_dump()
    if prize.points:
        now = uow.clock.now()
        expires_at = expiry_service.lot_expiries(
            uow, program_id=program_id, start=now, member_ids=[order["member_id"]]
        )[order["member_id"]]
        posting = points_service.earn(
            uow, member_id=order["member_id"], amount=prize.points,
            key=f"order:{order['id']}:prize", expires_at=expires_at,
            reason=f"prize {prize.code} of {terms.code}", actor=actor,
        )  # fmt: skip
        result["prize_points"] = prize.points
        result["prize_posting_id"] = posting.id
    return result


def _check_prizes_left(uow: UnitOfWork, reward_id: int, terms: RewardDef) -> None:
    """Refuse a draw of a lottery that can no longer pay any prize (each given out, or the
    budget spent): it would cost the member a draw that cannot win. Two draws at once may
    still both pass for the last prize; the second then wins nothing (see :func:`_draw`)."""
    if terms.lottery is None:
        return
    left: dict[str, int | None] = dict(
        uow.conn.execute(
            select(prize_stock.c.prize_code, prize_stock.c.remaining).where(
                prize_stock.c.reward_id == reward_id
            )
        ).all()
    )
    if not core.can_pay_a_prize(terms.lottery, left, left.pop(_BUDGET, None)):
        raise NotOnSale(
            reward=terms.code,
            problem="it is sold out: no prize is left to win (every prize is given out or "
            "the prize budget is spent).",
            problem_zh="已售罄:奖品已全部发完或奖品预算已用完,不再有可中的奖品。",
        )


def _take_prize(uow: UnitOfWork, reward_id: int, prize_code: str, cost: int) -> bool:
    """One of the prize, and its cost from the budget, if both are there (conditional
    decrements: two draws at once cannot both take the last one)."""
    budget = uow.conn.execute(
        update(prize_stock)
        .where(
            prize_stock.c.reward_id == reward_id,
            prize_stock.c.prize_code == _BUDGET,
            or_(prize_stock.c.remaining.is_(None), prize_stock.c.remaining >= cost),
        )
        .values(remaining=prize_stock.c.remaining - cost, given=prize_stock.c.given + cost)
    )
    if budget.rowcount != 1:
        return False
    taken = uow.conn.execute(
        update(prize_stock)
        .where(
            prize_stock.c.reward_id == reward_id,
            prize_stock.c.prize_code == prize_code,
            or_(prize_stock.c.remaining.is_(None), prize_stock.c.remaining >= 1),
        )
        .values(remaining=prize_stock.c.remaining - 1, given=prize_stock.c.given + 1)
    )
    if taken.rowcount == 1:
        return True
    uow.conn.execute(  # give the budget back: this prize is gone
        update(prize_stock)
        .where(prize_stock.c.reward_id == reward_id, prize_stock.c.prize_code == _BUDGET)
        .values(remaining=prize_stock.c.remaining + cost, given=prize_stock.c.given - cost)
    )
    return False


def _take_stock(uow: UnitOfWork, row: Any, quantity: int) -> int:
    """Take ``quantity`` from a limited stock, as the last write of the redemption: the
    decrement is conditional, so stock never goes below zero, and the row's lock is held
    only until the commit that follows (the hot row of a popular reward is held for
    microseconds, not for the whole redemption). The units left."""
    left = storage.take_stock(uow.conn, row.id, quantity)
    if left is None:
        # Another redemption took the last units after this one checked: run it again,
        # and the check, made before any write, refuses it with nothing half-written.
        raise LostRace(f"stock of reward {row.code} taken by a concurrent redemption")
    return left


def _alert(uow: UnitOfWork, program_id: int, row: Any, left: int, quantity: int) -> None:
    """A restock alert when this redemption took the stock down to its safety level."""
    if left <= row.safety_stock < left + quantity:
        _raise_alert(uow, program_id, row.id, left, row.safety_stock)


def _raise_alert(
    uow: UnitOfWork, program_id: int, reward_id: int, left: int, safety_stock: int
) -> None:
    """A restock alert for the reward, unless one is open: one a reward until restocked
    (a cancel lifting the stock and the next redemption taking it down again raised a
    second). Callers have written the reward's row, so its writers take turns here."""
    found = uow.conn.execute(
        select(stock_alerts.c.id).where(
            stock_alerts.c.program_id == program_id,  # the open alerts' index
            stock_alerts.c.cleared_at.is_(None),
            stock_alerts.c.reward_id == reward_id,
        )
    ).first()
    if found is None:
        uow.conn.execute(
            stock_alerts.insert().values(
                program_id=program_id, reward_id=reward_id, stock_left=left,
                safety_stock=safety_stock, raised_at=uow.clock.now(),
            )
        )  # fmt: skip


def _clear_alert(uow: UnitOfWork, reward_id: int) -> None:
    uow.conn.execute(
        stock_alerts.update()
        .where(stock_alerts.c.reward_id == reward_id, stock_alerts.c.cleared_at.is_(None))
        .values(cleared_at=uow.clock.now())
    )


def _give_stock(uow: UnitOfWork, reward_id: int, quantity: int) -> None:
    uow.conn.execute(
        update(rewards)
        .where(rewards.c.id == reward_id, rewards.c.stock_left.is_not(None))
        .values(stock_left=rewards.c.stock_left + quantity, sold=rewards.c.sold - quantity)
    )


# --------------------------------------------------------------------------- orders


def _order_row(
    uow: UnitOfWork,
    program_id: int,
    order_id: int,
    member_id: int | None = None,
    merchant: str | None = None,
    store: str | None = None,
) -> Row[Any]:
    query = (
        select(reward_orders, rewards.c.code, rewards.c.kind)
        .join(rewards, rewards.c.id == reward_orders.c.reward_id)
        .where(reward_orders.c.program_id == program_id, reward_orders.c.id == order_id)
    )
    if member_id is not None:
        query = query.where(reward_orders.c.member_id == member_id)
    if merchant is not None:
        query = query.where(reward_orders.c.merchant == merchant)
    if store is not None:
        query = query.where(reward_orders.c.store == store)
    row = uow.conn.execute(query).one_or_none()
    if row is None:
        raise UnknownOrder(order_id=order_id)
    return row


def get_order(
    uow: UnitOfWork,
    *,
    program_id: int,
    order_id: int,
    member_id: int | None = None,
    merchant: str | None = None,
    store: str | None = None,
) -> OrderRead:
    """One order; with ``merchant`` (the caller sees that merchant's orders only), another
    merchant's order is unknown; with ``store`` too, an order made at another store (or at
    none) is."""
    return _order_read(uow, _order_row(uow, program_id, order_id, member_id, merchant, store))


def _order_read(uow: UnitOfWork, row: Any, *, replayed: bool = False) -> OrderRead:
    steps = uow.conn.execute(
        select(order_steps).where(order_steps.c.order_id == row.id).order_by(order_steps.c.id)
    ).all()
    voucher = uow.conn.execute(
        select(vouchers_table).where(vouchers_table.c.order_id == row.id)
    ).one_or_none()
    return OrderRead(
        id=row.id,
        member_id=row.member_id,
        reward=row.code,
        kind=row.kind,
        quantity=row.quantity,
        state=row.state,
        points=row.points,
        cash_fen=row.cash_fen,
        value_fen=row.value_fen,
        payment_ref=row.payment_ref,
        hold_until=row.hold_until,
        pay_by=row.pay_by,
        spend_posting_id=row.spend_posting_id,
        hold_posting_id=row.hold_posting_id,
        refund_posting_id=row.refund_posting_id,
        price=[PriceStep.model_validate(step) for step in row.price],
        outcome=dict(row.outcome),
        voucher=_voucher_read(uow, voucher, row.code, row.kind) if voucher is not None else None,
        steps=[OrderStep(state=s.state, at=s.at, by=s.by, note=s.note) for s in steps],
        created_at=row.created_at,
        updated_at=row.updated_at,
        replayed=replayed,
    )


def _voucher_read(uow: UnitOfWork, row: Any, reward_code: str, kind: str) -> VoucherRead:
    return VoucherRead(
        code=row.code,
        state=row.state,
        order_id=row.order_id,
        member_id=row.member_id,
        reward=reward_code,
        valid_until=row.valid_until,
        used_at=row.used_at,
        used_store=row.used_store,
        refund_posting_id=row.refund_posting_id,
        coupon=_coupon_of(uow, row, reward_code, kind),
    )


def _coupon_of(uow: UnitOfWork, voucher: Any, reward_code: str, kind: str) -> CouponTerms | None:
    """The terms a coupon was bought with, kept on its voucher: a later edit of the reward
    changes new coupons only. One issued before the terms were kept there reads its
    reward's."""
    if kind != "coupon":
        return None
    if voucher.coupon is not None:
        return CouponTerms.model_validate(voucher.coupon)
    return _terms(uow, _reward_row(uow, voucher.program_id, reward_code)).coupon


def list_orders(
    uow: UnitOfWork,
    *,
    program_id: int,
    member_id: int | None = None,
    state: str | None = None,
    reward: str | None = None,
    merchant: str | None = None,
    store: str | None = None,
    after_id: int = 0,
    limit: int = 50,
) -> tuple[list[OrderRead], str | None]:
    """Orders newest first (the cursor is the last id of the page), filtered; with
    ``merchant``, that merchant's orders only; with ``store``, those made at that store."""
    query = (
        select(reward_orders, rewards.c.code, rewards.c.kind)
        .join(rewards, rewards.c.id == reward_orders.c.reward_id)
        .where(reward_orders.c.program_id == program_id)
    )
    if after_id:
        query = query.where(reward_orders.c.id < after_id)
    if member_id is not None:
        query = query.where(reward_orders.c.member_id == member_id)
    if state is not None:
        query = query.where(reward_orders.c.state == state)
    if reward is not None:
        query = query.where(rewards.c.code == reward)
    if merchant is not None:
        query = query.where(reward_orders.c.merchant == merchant)
    if store is not None:
        query = query.where(reward_orders.c.store == store)
    rows = uow.conn.execute(query.order_by(reward_orders.c.id.desc()).limit(limit + 1)).all()
    items = [_order_read(uow, row) for row in rows[:limit]]
    return items, str(items[-1].id) if len(rows) > limit else None


_MOVES: dict[str, tuple[frozenset[str], str]] = {
    # action: (states it may start from, the state it leads to)
    "confirm": (frozenset({"created"}), "confirmed"),
    "ship": (frozenset({"created", "confirmed"}), "shipped"),
    "deliver": (frozenset({"created", "confirmed", "shipped"}), "delivered"),
    "cancel": (frozenset({"awaiting_payment", "held", "created", "confirmed"}), "cancelled"),
    "return": (frozenset({"shipped", "delivered"}), "returned"),
}
_VOUCHER_ZH = {"used": "使用", "expired": "过期", "cancelled": "作废"}
_STATE_ZH = {"awaiting_payment": "待支付", "held": "冷静期待确认", "created": "已创建",
             "confirmed": "已确认", "shipped": "已发货",
             "delivered": "已交付", "cancelled": "已取消", "returned": "已退货"}  # fmt: skip
_WAITING = frozenset({"awaiting_payment", "held"})
"""States of an order whose points are frozen, not yet spent: nothing is delivered yet, so
any kind of order may be cancelled from them."""


def move(
    uow: UnitOfWork,
    *,
    program_id: int,
    order_id: int,
    action: str,
    actor: str,
    note: str = "",
    tracking: str | None = None,
    member_id: int | None = None,
    merchant: str | None = None,
    store: str | None = None,
) -> OrderRead:
    """Move an order on: confirm, ship, deliver, cancel or return. Cancelling or returning
    gives the points back to the very lots they came from, and the stock back. With
    ``merchant`` (the caller acts for that merchant only), only an order made for it; with
    ``store`` (the caller acts at that store only), only one made at it."""
    if action not in _MOVES:
        raise InvalidInput(
            field="action",
            problem=f"one of {', '.join(_MOVES)}",
            problem_zh=f"应为以下之一:{', '.join(_MOVES)}。",
        )
    row = _locked_order(uow, program_id, order_id, member_id, merchant, store)
    starts, target = _MOVES[action]
    terms = _terms(uow, _reward_row(uow, program_id, row.code))
    if row.state not in starts or not _fits(action, row, terms):
        raise StateConflict(
            problem=f"Order {order_id} is {row.state}; a {row.kind} order cannot be "
            f"{target} from there.",
            problem_zh=f"订单 {order_id} 当前为{_STATE_ZH[row.state]},"
            f"不能变为{_STATE_ZH[target]}。",
        )
    values: dict[str, Any] = {"state": target}
    outcome = dict(row.outcome)
    if target in ("cancelled", "returned"):
        # The posting's reason goes into the ledger's chained digest, where nothing can be
        # erased later: a person's note (which may name the member) stays on the order's
        # step, and the posting says what happened; the jobs' own notes say why.
        why = note if actor == "system" and note else f"{action} order {order_id}"
        values.update(_give_back(uow, row, terms, actor, why))
        outcome.update(_cash_due(row))
    if tracking is not None:
        outcome["tracking"] = tracking
    if outcome != row.outcome:
        values["outcome"] = outcome
    _set_order(uow, order_id, **values)
    _step(uow, program_id, order_id, target, actor, note)
    return get_order(uow, program_id=program_id, order_id=order_id)


def _cash_due(row: Any) -> dict[str, int]:
    """What an order cancelled or returned adds to its outcome for its cash part: the payment
    system refunds it, and the order says so. An order cancelled before its payment came has
    nothing to refund."""
    if row.cash_fen and row.payment_ref is not None:
        return {"cash_refund_due_fen": row.cash_fen}
    return {}


def _locked_order(
    uow: UnitOfWork,
    program_id: int,
    order_id: int,
    member_id: int | None,
    merchant: str | None,
    store: str | None = None,
) -> Row[Any]:
    """The order as it is under its member's lock, taken first (as a redemption takes it);
    with ``merchant`` (the caller acts for that merchant only), only an order made for it,
    and with ``store`` (the caller acts at that store only), only one made at it: any other
    is unknown (404), as it is to the caller's reads, so that no one learns which order ids
    exist by trying to move them."""
    row = _order_row(uow, program_id, order_id, member_id, merchant, store)
    points_service.lock_account(uow, member_id=row.member_id)
    return _order_row(uow, program_id, order_id, member_id)


def _fits(action: str, row: Any, terms: RewardDef) -> bool:
    """Whether ``action`` makes sense for this kind of order."""
    if action == "deliver" and row.state != "shipped":
        return bool(row.kind == "lottery")  # a prize staff hand over in person: no parcel
    if action in ("ship", "deliver", "confirm"):
        return (terms.kind == "physical" and not terms.pickup) or row.kind == "lottery"
    if action == "return":
        return row.kind not in _FINAL_KINDS
    if action == "cancel":
        return row.kind not in _FINAL_KINDS or row.state in _WAITING
    return True


def _give_back(uow: UnitOfWork, row: Any, terms: RewardDef, actor: str, why: str) -> dict[str, Any]:
    """Undo a redemption's points, stock and voucher; answers the order's new columns.

    The voucher's row is locked before it is checked (a till using it at this moment is
    waited for, then seen), and written only after the points are back: a refusal comes
    before any write. An unused voucher is cancelled. A used one is given back only for
    goods collected with it (a return of what was collected: the voucher stays used); a
    used coupon, service, virtual good or event cannot be given back, nor one past its
    validity: the expiry run gives its points back less the fee."""
    query = select(vouchers_table.c.id, vouchers_table.c.state, vouchers_table.c.valid_until).where(
        vouchers_table.c.order_id == row.id
    )
    if uow.dialect == "postgresql":
        query = query.with_for_update()
    voucher = uow.conn.execute(query).one_or_none()
    # Goods collected: their order was delivered when it was read (a till using the voucher
    # while this waited for its row leaves the order read as created: refused below).
    collected = (
        voucher is not None
        and voucher.state == "used"
        and row.kind == "physical"
        and row.state == "delivered"
    )
    if voucher is not None and voucher.state != "issued" and not collected:
        raise StateConflict(
            problem=f"The voucher of order {row.id} is {voucher.state}; only an unused "
            "voucher can be given back.",
            problem_zh=f"订单 {row.id} 的券已{_VOUCHER_ZH[voucher.state]},只有未使用的券可以退回。",
        )
    if voucher is not None and voucher.state == "issued" and voucher.valid_until <= uow.clock.now():
        # Not yet expired by the job: given back in full here, it would skip the fee.
        lapsed = _local(uow, row.program_id, voucher.valid_until)
        raise StateConflict(
            problem=f"The voucher of order {row.id} lapsed at {lapsed}; the voucher expiry "
            "run returns its points less the programme's fee.",
            problem_zh=f"订单 {row.id} 的券已于 {lapsed} 失效;"
            "过期券处理任务将退回其积分(扣除手续费)。",
        )
    key = f"order:{row.id}:give-back"
    if row.hold_posting_id is not None and row.spend_posting_id is None:
        posting = points_service.unfreeze(
            uow, freeze_id=row.hold_posting_id, key=key, reason=why, actor=actor
        )
    else:
        posting = points_service.refund(
            uow, spend_id=row.spend_posting_id, key=key, reason=why, actor=actor
        )
    if voucher is not None and not collected:
        uow.conn.execute(
            vouchers_table.update()
            .where(vouchers_table.c.id == voucher.id)
            .values(state="cancelled")
        )
    _give_stock(uow, row.reward_id, row.quantity)
    return {"refund_posting_id": posting.id}


def last_orders(uow: UnitOfWork, *, member_ids: Sequence[int]) -> dict[int, datetime]:
    """When each member last redeemed: its latest order, whatever became of it (one held
    for its cooling-off or waiting for payment has spent nothing yet). What dormancy counts
    as activity beside the member's postings and events."""
    if not member_ids:
        return {}
    rows = uow.conn.execute(
        select(reward_orders.c.member_id, func.max(reward_orders.c.created_at))
        .where(among(uow.dialect, reward_orders.c.member_id, member_ids))
        .group_by(reward_orders.c.member_id)
    ).all()
    return {int(member_id): when for member_id, when in rows}


def confirm_held(
    uow: UnitOfWork, *, program_id: int, member_id: int, order_id: int, actor: str
) -> OrderRead:
    """The member confirms a held redemption after its cooling-off: the frozen points are
    released and debited, and the redemption completes. As for a redemption, the member
    must be active: one frozen during its cooling-off neither spends nor draws."""
    points_service.lock_account(uow, member_id=member_id)
    members_service.require_member(
        uow, program_id=program_id, member_id=member_id, transacting=True
    )
    row = _order_row(uow, program_id, order_id, member_id)
    if row.state != "held":
        raise StateConflict(
            problem=f"Order {order_id} is {row.state}, not waiting for confirmation.",
            problem_zh=f"订单 {order_id} 当前为{_STATE_ZH[row.state]},无需确认。",
        )
    now = uow.clock.now()
    if now < row.hold_until:
        until = _local(uow, program_id, row.hold_until)
        raise StateConflict(
            problem=f"Order {order_id} is in its cooling-off period until {until}; confirm it "
            "after that.",
            problem_zh=f"订单 {order_id} 处于冷静期,请于 {until} 之后确认。",
        )
    _complete(uow, program_id, row, actor, "confirmed", "confirmed after cooling-off")
    return get_order(uow, program_id=program_id, order_id=order_id)


def _complete(
    uow: UnitOfWork, program_id: int, row: Any, actor: str, why: str, note: str,
    *, payment: tuple[str, int] | None = None, **values: Any,
) -> None:  # fmt: skip
    """Complete an order whose points are frozen (held, or awaiting payment): the points are
    released and debited, the order becomes ``created`` (with ``values``) and is fulfilled.
    The debit takes the very points the hold gave back, even where their lots lapsed while
    the order waited (:func:`points_service.spend_frozen`), so that it is not refused for
    want of points. First the reward is checked as it is now, as a redemption's is
    (:func:`_check_deliverable`): refused, nothing is written (``payment``: the payment that
    came with the request, which the refusal says to refund)."""
    terms = _terms(uow, _reward_row(uow, program_id, row.code))
    _check_deliverable(uow, program_id, row, terms, payment)
    reason = f"redeem {terms.code} × {row.quantity}"
    spent = points_service.spend_frozen(
        uow, freeze_id=row.hold_posting_id, release_key=f"order:{row.id}:release",
        key=f"order:{row.id}:confirmed", reason=reason, release_reason=f"{why}: {reason}",
        actor=actor, into=_spent_into(terms),
    ).id  # fmt: skip
    _set_order(uow, row.id, state="created", spend_posting_id=spent, **values)
    _step(uow, program_id, row.id, "created", actor, note)
    order = {**row._mapping, **values, "outcome": dict(row.outcome)}
    _fulfil(uow, program_id, order, terms, _policy(uow, program_id), actor)


def pay_order(
    uow: UnitOfWork,
    *,
    program_id: int,
    order_id: int,
    payment_ref: str,
    amount_fen: int,
    actor: str,
    merchant: str | None = None,
    store: str | None = None,
) -> OrderRead:
    """The payment system's word that the cash part of an order awaiting payment is paid.
    Under the member's lock the order moves on as a redemption paid at once would have:
    held for the member's confirmation if its tier's cooling-off applies to its points
    (they stay frozen), else its points are released and debited and it is fulfilled.
    The same payment sent again answers the order as it is. A payment that arrives after
    ``pay_by`` is taken while the order still awaits it; once the order lapsed it is
    refused, with the amount to refund. With ``merchant``, only an order made for that
    merchant, and with ``store`` only one made at that store (any other is unknown)."""
    row = _locked_order(uow, program_id, order_id, None, merchant, store)
    if row.payment_ref == payment_ref:  # this payment, sent again
        _require_amount(row, payment_ref, amount_fen)
        return _order_read(uow, row, replayed=True)
    if row.state != "awaiting_payment":
        raise _not_awaiting(uow, row, payment_ref, amount_fen)
    _require_amount(row, payment_ref, amount_fen)
    _require_unused_payment(uow, program_id, payment_ref)
    try:
        members_service.require_member(
            uow, program_id=program_id, member_id=row.member_id, transacting=True
        )
    except StateConflict as refused:  # frozen by staff since it redeemed
        raise StateConflict(
            problem=f"{refused.params['problem']} Nothing was recorded: refund payment "
            f"{payment_ref!r} of {amount_fen} fen; order {order_id} lapses at "
            f"{_local(uow, program_id, row.pay_by)} unless the member is made active and "
            "pays again.",
            problem_zh=f"{refused.params['problem_zh']}未作任何记录:请退还支付 "
            f"{payment_ref!r} 的 {amount_fen} 分;除非会员恢复正常并重新支付,订单 {order_id} "
            f"将于 {_local(uow, program_id, row.pay_by)} 取消。",
        ) from None
    tier = tiers_service.tiers_of(uow, member_ids=[row.member_id]).get(row.member_id)
    wait = core.cooling_off(row.points, _policy(uow, program_id).for_tier(tier))
    note = f"paid {amount_fen} fen: {payment_ref}"
    if wait is not None:  # its points stay frozen until the member confirms
        # A payment for what can no longer be delivered is refused now, not taken for an
        # order its confirmation would refuse.
        terms = _terms(uow, _reward_row(uow, program_id, row.code))
        _check_deliverable(uow, program_id, row, terms, (payment_ref, amount_fen))
        hold_until = uow.clock.now() + wait
        _set_order(uow, order_id, state="held", hold_until=hold_until, payment_ref=payment_ref)
        until = f"{note}; cooling-off until {_local(uow, program_id, hold_until)}"
        _step(uow, program_id, order_id, "held", actor, until)
        return get_order(uow, program_id=program_id, order_id=order_id)
    _complete(
        uow, program_id, row, actor, "paid", note, payment=(payment_ref, amount_fen),
        payment_ref=payment_ref,
    )  # fmt: skip
    return get_order(uow, program_id=program_id, order_id=order_id)


def _check_deliverable(
    uow: UnitOfWork, program_id: int, row: Any, terms: RewardDef,
    payment: tuple[str, int] | None,
) -> None:  # fmt: skip
    """Refuse to complete (or take the payment of) an order whose points are frozen when its
    reward can no longer deliver what a redemption of it now would be refused for: a draw of
    a lottery with no prize left to win, a registration for an event that has started. The
    order is left as it is, its points frozen: the member may cancel it, or it lapses (held:
    ``hold_days`` after its cooling-off; awaiting payment: at its ``pay_by``) and its points
    come back. ``payment``: the payment to refund, and its amount, named in the refusal."""
    try:
        _check_prizes_left(uow, row.reward_id, terms)
        _check_event_ahead(
            terms, uow.clock.now(), programs_service.time_zone(uow, program_id=program_id)
        )
    except NotOnSale as refused:
        if row.state == "held":
            days = _policy(uow, program_id).hold_days
            lapses = _local(uow, program_id, row.hold_until + timedelta(days=days))
        else:
            lapses = _local(uow, program_id, row.pay_by)
        order = f"Order {row.id} was not completed and nothing was spent"
        order_zh = f"订单 {row.id} 未完成,未扣任何积分"
        cash = cash_zh = ""
        if payment is not None:
            ref, fen = payment
            order += f" or recorded: refund payment {ref!r} of {fen} fen"
            order_zh += f",也未作任何记录:请退还支付 {ref!r} 的 {fen} 分"
        elif row.payment_ref is not None and row.cash_fen:  # paid before its cooling-off
            cash = f" Its cash part ({row.cash_fen} fen) is due back then."
            cash_zh = f"届时应退还其现金部分({row.cash_fen} 分)。"
        raise NotOnSale(
            reward=terms.code,
            problem=f"{refused.params['problem']} {order}. Its {row.points} points stay "
            f"frozen until it lapses at {lapses}, or come back at once if it is cancelled."
            f"{cash}",
            problem_zh=f"{refused.params['problem_zh']}{order_zh}。其 {row.points} 积分仍冻结,"
            f"订单将于 {lapses} 失效后退回;取消订单可立即退回。{cash_zh}",
        ) from None


def _require_amount(row: Any, payment_ref: str, amount_fen: int) -> None:
    """Refuse a payment of another amount than the order's cash part."""
    if amount_fen != row.cash_fen:
        raise PaymentAmountMismatch(
            order_id=row.id, due_fen=row.cash_fen, paid_fen=amount_fen, payment_ref=payment_ref
        )


def _not_awaiting(uow: UnitOfWork, row: Any, payment_ref: str, amount_fen: int) -> StateConflict:
    """Why an order that does not await payment cannot take this one, and that the payment
    is to be refunded."""
    refund = f"Refund payment {payment_ref!r} of {amount_fen} fen."
    refund_zh = f"请退还支付 {payment_ref!r} 的 {amount_fen} 分。"
    if row.payment_ref is not None:
        return StateConflict(
            problem=f"Order {row.id} is already paid, by payment {row.payment_ref!r}; it "
            f"takes no other. {refund}",
            problem_zh=f"订单 {row.id} 已由支付 {row.payment_ref!r} 付清,不再接受其他支付。"
            f"{refund_zh}",
        )
    if row.state == "cancelled" and row.pay_by is not None:
        pay_by = _local(uow, row.program_id, row.pay_by)
        return StateConflict(
            problem=f"Order {row.id} was cancelled before it was paid (its payment was due "
            f"by {pay_by}); it can no longer be paid. {refund}",
            problem_zh=f"订单 {row.id} 在支付前已取消(应于 {pay_by} 前支付),"
            f"不能再支付。{refund_zh}",
        )
    return StateConflict(
        problem=f"Order {row.id} is {row.state}, not awaiting payment. {refund}",
        problem_zh=f"订单 {row.id} 当前为{_STATE_ZH[row.state]},并非待支付。{refund_zh}",
    )


def _lock_members(uow: UnitOfWork, member_ids: set[int]) -> None:
    """Hold several members' accounts, in id order (as every job here does before touching
    their orders or vouchers: the order a redemption takes its locks in, account first)."""
    for member_id in sorted(member_ids):
        points_service.lock_account(uow, member_id=member_id)


def expire_holds(
    uow: UnitOfWork, *, program_id: int, limit: int = 200, dry_run: bool = False
) -> HoldsReport:
    """Cancel held redemptions the member did not confirm within the programme's
    ``hold_days`` after their cooling-off ended: the points are released, the stock returns.
    Each is looked at again under its member's lock: one confirmed meanwhile is left alone."""
    days = _policy(uow, program_id).hold_days
    cutoff = uow.clock.now() - timedelta(days=days)
    lapsed = (reward_orders.c.state == "held", reward_orders.c.hold_until <= cutoff)
    note = f"not confirmed within {days} days"
    return _cancel_lapsed(uow, program_id, lapsed, note, limit=limit, dry_run=dry_run)


def lapse_payments(
    uow: UnitOfWork, *, program_id: int, limit: int = 200, dry_run: bool = False
) -> HoldsReport:
    """Cancel redemptions whose cash part was not paid by their ``pay_by``: the points are
    released, the stock returns. Each is looked at again under its member's lock: one paid
    meanwhile is left alone (and a payment that comes after this is refused)."""
    lapsed = (
        reward_orders.c.state == "awaiting_payment",
        reward_orders.c.pay_by <= uow.clock.now(),
    )
    note = "cash part not paid in time"
    return _cancel_lapsed(uow, program_id, lapsed, note, limit=limit, dry_run=dry_run)


def _cancel_lapsed(
    uow: UnitOfWork, program_id: int, lapsed: tuple[ColumnElement[bool], ...], note: str,
    *, limit: int, dry_run: bool,
) -> HoldsReport:  # fmt: skip
    """Cancel up to ``limit`` orders of the programme matching ``lapsed``, oldest first, by
    the system: their members' accounts are locked first (in id order), then the orders are
    found again, so one that moved on meanwhile is left alone."""
    where = (reward_orders.c.program_id == program_id, *lapsed)
    found = uow.conn.execute(
        select(reward_orders.c.id, reward_orders.c.member_id)
        .where(*where)
        .order_by(reward_orders.c.id)
        .limit(limit)
    ).all()
    if dry_run:
        return HoldsReport(
            dry_run=True, cancelled=len(found), order_ids=[f.id for f in found], found=len(found)
        )
    _lock_members(uow, {f.member_id for f in found})
    ids = list(
        uow.conn.execute(
            select(reward_orders.c.id)
            .where(reward_orders.c.id.in_([f.id for f in found]), *where)
            .order_by(reward_orders.c.id)
        ).scalars()
    )
    for order_id in ids:
        move(uow, program_id=program_id, order_id=order_id, action="cancel", actor="system",
             note=note)  # fmt: skip
    return HoldsReport(dry_run=False, cancelled=len(ids), order_ids=ids, found=len(found))


def erase_personal_values(
    uow: UnitOfWork, *, program_id: int, member_id: int, values: Iterable[str]
) -> int:
    """Take the member's personal data out of its redemption orders, for its erasure: the
    account at a partner it named (``partner_account``) goes whole, and the member's
    ``values`` (its name, reference, email, birthday, phone and ID numbers, as they were
    before the erasure) go from the rest of what the orders kept and from the notes people
    wrote on their steps, as :class:`jifen.members.core.PersonalValues` takes them out (in
    the orders' texts only: their numbers are amounts and units). The orders, their points,
    stock and vouchers stay as they are. How many orders changed."""
    scrub = PersonalValues(values)
    orders = uow.conn.execute(
        select(reward_orders.c.id, reward_orders.c.outcome).where(
            reward_orders.c.program_id == program_id, reward_orders.c.member_id == member_id
        )
    ).all()
    changed: set[int] = set()
    for order in orders:
        outcome = scrub(dict(order.outcome), numbers=False)  # amounts and units are jifen's
        if "partner_account" in outcome:
            outcome["partner_account"] = ERASED_VALUE
        if outcome != order.outcome:
            _set_order(uow, order.id, outcome=outcome)
            changed.add(order.id)
    if scrub and orders:
        steps = uow.conn.execute(
            select(order_steps.c.id, order_steps.c.order_id, order_steps.c.note).where(
                order_steps.c.order_id.in_([order.id for order in orders]),
                order_steps.c.note != "",
            )
        ).all()
        for step in steps:
            note = scrub(step.note)
            if note != step.note:
                uow.conn.execute(
                    update(order_steps).where(order_steps.c.id == step.id).values(note=note)
                )
                changed.add(step.order_id)
    return len(changed)


# --------------------------------------------------------------------------- vouchers


def typed_code(code: str) -> str:
    """A voucher's code as typed or scanned at a till, as it is stored: upper case, without
    the spaces, line breaks and dashes a scanner, a paste or a code printed in groups put
    around or in it (no code holds one)."""
    return _TYPED_APART.sub("", code).upper()


_TYPED_APART = re.compile(r"[\s\-‐-―－]")
"""Spaces and dashes (ASCII, Unicode and full-width) that never belong to a code."""


def _voucher_row(uow: UnitOfWork, program_id: int, code: str, merchant: str | None = None) -> Any:
    """The voucher of that code (as :func:`typed_code` reads it); with ``merchant`` (the
    caller acts for that merchant only), only one of an order made for it or for no merchant
    (in the member's own app): the voucher of another merchant's order is unknown, as a
    wrong code is."""
    query = (
        select(vouchers_table, rewards.c.code.label("reward_code"), rewards.c.kind)
        .join(reward_orders, reward_orders.c.id == vouchers_table.c.order_id)
        .join(rewards, rewards.c.id == reward_orders.c.reward_id)
        .where(vouchers_table.c.program_id == program_id, vouchers_table.c.code == typed_code(code))
    )
    if merchant is not None:
        query = query.where(
            or_(reward_orders.c.merchant.is_(None), reward_orders.c.merchant == merchant)
        )
    row = uow.conn.execute(query).one_or_none()
    if row is None:
        raise UnknownVoucher(code=code)
    return row


def get_voucher(
    uow: UnitOfWork, *, program_id: int, code: str, merchant: str | None = None
) -> VoucherRead:
    """A voucher by its code; with ``merchant``, not one of another merchant's order."""
    row = _voucher_row(uow, program_id, code, merchant)
    return _voucher_read(uow, row, row.reward_code, row.kind)


def use_voucher(
    uow: UnitOfWork,
    *,
    program_id: int,
    code: str,
    store: str | None,
    actor: str,
    order_amount_fen: int | None = None,
    merchant: str | None = None,
) -> VoucherUsed:
    """Accept a voucher at a till, once: of two tills at once, one is told it is used. With
    ``merchant`` (the till acts for that merchant only), a voucher of an order made for
    another merchant is unknown (so that codes are not probed at other merchants' tills);
    one of an order made in the member's own app (for no merchant) is accepted anywhere."""
    row = _voucher_row(uow, program_id, code, merchant)
    coupon = _coupon_of(uow, row, row.reward_code, row.kind)
    now = uow.clock.now()
    discount = None
    if coupon is not None:
        if order_amount_fen is None:
            # A coupon used, lapsed or undone is refused as such: no amount would help.
            if not _usable(uow, row, now):
                _refuse_voucher(uow, program_id, row.code, now)
            raise InvalidInput(
                field="order_amount_fen",
                problem="a coupon needs the till's order amount, to check its minimum spend",
                problem_zh="使用优惠券需提供订单金额,以核对最低消费。",
            )
        discount = core.coupon_discount(coupon, order_amount_fen)
        if discount is None:
            # A coupon used, lapsed or undone is refused as such: no order would take it.
            if not _usable(uow, row, now):
                _refuse_voucher(uow, program_id, row.code, now)
            raise VoucherNotUsable(
                code=row.code,
                problem=f"the order must be at least {coupon.min_spend_fen} fen; it is "
                f"{order_amount_fen}.",
                problem_zh=f"订单金额须满 {coupon.min_spend_fen} 分,当前为 {order_amount_fen} 分。",
            )
    usable_order = select(reward_orders.c.id).where(
        reward_orders.c.id == row.order_id, reward_orders.c.state.in_(_usable_with(row.kind))
    )
    used = uow.conn.execute(
        vouchers_table.update()
        .where(
            vouchers_table.c.id == row.id,
            vouchers_table.c.state == "issued",
            vouchers_table.c.valid_until > now,
            vouchers_table.c.order_id.in_(usable_order),
        )
        .values(state="used", used_at=now, used_store=store, used_by=actor)
    )
    if used.rowcount != 1:
        _refuse_voucher(uow, program_id, row.code, now)
    collected = uow.conn.execute(  # goods collected at the store (if still waiting)
        reward_orders.update()
        .where(reward_orders.c.id == row.order_id, reward_orders.c.state.in_(_PICKUP_WAITING))
        .values(state="delivered", updated_at=now)
    )
    if collected.rowcount == 1:
        where = f"collected at {store or 'a store'}"
        _step(uow, program_id, row.order_id, "delivered", actor, where)
    return VoucherUsed(voucher=get_voucher(uow, program_id=program_id, code=row.code),
                       discount_fen=discount)  # fmt: skip


def _usable(uow: UnitOfWork, row: Any, now: datetime) -> bool:
    """Whether the voucher as read could be accepted now: issued, within its validity, and
    its order in a state it may be used in."""
    if row.state != "issued" or row.valid_until <= now:
        return False
    state = uow.conn.execute(
        select(reward_orders.c.state).where(reward_orders.c.id == row.order_id)
    ).scalar_one()
    return state in _usable_with(row.kind)


_PICKUP_WAITING = ("created", "confirmed")
"""States of an order for pickup whose goods wait at the store for its voucher."""


def _usable_with(kind: str) -> tuple[str, ...]:
    """The states of an order its voucher may be used in: goods for pickup still waiting
    (not shipped, delivered, cancelled or returned); a coupon, service, virtual or event
    order is delivered as its voucher is issued."""
    return _PICKUP_WAITING if kind == "physical" else ("delivered",)


def _refuse_voucher(uow: UnitOfWork, program_id: int, code: str, now: datetime) -> None:
    row = _voucher_row(uow, program_id, code)
    if row.state == "used":
        where = f" at {row.used_store}" if row.used_store else ""
        raise VoucherNotUsable(
            code=code,
            problem=f"it was already used{where} at {_local(uow, program_id, row.used_at)}.",
            problem_zh=f"该券已于 {_local(uow, program_id, row.used_at)} 在"
            f"{row.used_store or '门店'}使用。",
        )
    if (row.state == "issued" and row.valid_until <= now) or row.state == "expired":
        raise VoucherNotUsable(
            code=code,
            problem=f"it expired at {_local(uow, program_id, row.valid_until)}.",
            problem_zh=f"该券已于 {_local(uow, program_id, row.valid_until)} 过期。",
        )
    if row.state == "issued":  # its order has been fulfilled, or undone, another way
        state = uow.conn.execute(
            select(reward_orders.c.state).where(reward_orders.c.id == row.order_id)
        ).scalar_one()
        raise VoucherNotUsable(
            code=code,
            problem=f"its order {row.order_id} is {state}: the voucher no longer stands for "
            "anything to hand over.",
            problem_zh=f"该券所属订单 {row.order_id} 当前为{_STATE_ZH[state]},凭券已无可领取之物。",
        )
    # Cancelled with its order: cancelled, returned, or lapsed by the expiry run (goods never
    # collected), which the order's state says.
    state = uow.conn.execute(
        select(reward_orders.c.state).where(reward_orders.c.id == row.order_id)
    ).scalar_one()
    raise VoucherNotUsable(
        code=code,
        problem=f"its order {row.order_id} was {state}.",
        problem_zh=f"该券所属订单 {row.order_id} {_STATE_ZH[state]}。",
    )


def expire_vouchers(
    uow: UnitOfWork, *, program_id: int, limit: int = 200, dry_run: bool = False
) -> ExpiryReport:
    """Expire vouchers unused at the end of their validity: the points come back to the lots
    they were taken from, less the programme's fee (10 %); goods never collected go back to
    the stock and their order is cancelled. Runs in chunks of ``limit``: a run is over when
    a chunk finds fewer (``found``), not when it expires fewer. The members' accounts are
    locked first (in id order), then each voucher is expired by a conditional update: one a
    till accepted or an order cancelled meanwhile is left alone."""
    policy = _policy(uow, program_id)
    now = uow.clock.now()
    due_now = (
        vouchers_table.c.program_id == program_id,
        vouchers_table.c.state == "issued",
        vouchers_table.c.valid_until <= now,
    )
    found = uow.conn.execute(
        select(vouchers_table.c.id, vouchers_table.c.code, vouchers_table.c.order_id,
               vouchers_table.c.member_id, vouchers_table.c.valid_until)
        .where(*due_now)
        .order_by(vouchers_table.c.valid_until, vouchers_table.c.id)
        .limit(limit)
    ).all()  # fmt: skip
    if not dry_run:
        _lock_members(uow, {v.member_id for v in found})
    returned = fees = 0
    expired: list[str] = []
    for voucher in found:
        order = _order_row(uow, program_id, voucher.order_id)
        back, fee = core.expiry_refund(order.points, policy.voucher_fee_pct)
        if not dry_run:
            taken = uow.conn.execute(
                vouchers_table.update().where(vouchers_table.c.id == voucher.id, *due_now)
                .values(state="expired")
            )  # fmt: skip
            if taken.rowcount != 1:
                continue  # used, cancelled or expired by someone else since it was found
            _expire_one(uow, order, voucher, back, fee)
        returned += back
        fees += fee
        expired.append(voucher.code)
    return ExpiryReport(
        dry_run=dry_run, vouchers=len(expired), points_returned=returned, fees=fees,
        codes=expired, found=len(found),
    )  # fmt: skip


def _expire_one(uow: UnitOfWork, order: Any, voucher: Any, back: int, fee: int) -> None:
    posting_id = None
    if back > 0:
        posting_id = points_service.refund(
            uow, spend_id=order.spend_posting_id, amount=back,
            key=f"order:{order.id}:voucher-expired",
            reason=f"voucher {voucher.code} expired unused; fee {fee}", actor="system",
            forfeit_if_closed=True,  # a job: no one to act on a refusal
        ).id  # fmt: skip
        uow.conn.execute(
            vouchers_table.update()
            .where(vouchers_table.c.id == voucher.id)
            .values(refund_posting_id=posting_id)
        )
    note = f"voucher expired unused: {back} points returned, fee {fee}"
    if order.state == "created":  # goods never collected: back on the shelf
        _give_stock(uow, order.reward_id, order.quantity)
        # Nor had for their cash part: it is due back, as for any cancelled paid order.
        outcome = {**order.outcome, **_cash_due(order)}
        _set_order(uow, order.id, state="cancelled", refund_posting_id=posting_id, outcome=outcome)
        # The member hears of it as the voucher's expiry, below.
        _step(uow, order.program_id, order.id, "cancelled", "system", note, tell_member=False)
    else:  # what happened to the order, which stays as it was
        step = OrderStep(state=order.state, at=uow.clock.now(), by="system", note=note)
        storage.insert_step(uow.conn, order.id, step.model_dump())
    data = {
        "voucher": voucher.code, "order_id": order.id, "member_id": order.member_id,
        "points_returned": back, "fee": fee, "refund_posting_id": posting_id,
        "valid_until": voucher.valid_until.isoformat(),
    }  # fmt: skip
    key = f"voucher:{voucher.id}:expired"
    notify_service.publish(
        uow, program_id=order.program_id, event_type="voucher.expired", data=data, key=key
    )
    notify_service.notify(
        uow,
        notify_service.Notification(
            program_id=order.program_id,
            member_id=order.member_id,
            template="voucher.expired",
            # the member reads when it lapsed in the programme's time zone; the webhook
            # above keeps the moment as every event does
            data={**data, "valid_until": _local(uow, order.program_id, voucher.valid_until)},
            key=key,
        ),
    )


def member_vouchers(
    uow: UnitOfWork,
    *,
    program_id: int,
    member_id: int,
    state: str | None = None,
    merchant: str | None = None,
    before_id: int = 0,
    limit: int = 50,
) -> tuple[list[VoucherRead], str | None]:
    """The member's vouchers newest first, and the cursor of the next page (the last
    voucher's id) if there is one; with ``merchant``, those of that merchant's orders only."""
    query = (
        select(vouchers_table, rewards.c.code.label("reward_code"), rewards.c.kind)
        .join(reward_orders, reward_orders.c.id == vouchers_table.c.order_id)
        .join(rewards, rewards.c.id == reward_orders.c.reward_id)
        .where(vouchers_table.c.program_id == program_id, vouchers_table.c.member_id == member_id)
        .order_by(vouchers_table.c.id.desc())
        .limit(limit + 1)
    )
    if before_id:
        query = query.where(vouchers_table.c.id < before_id)
    if state is not None:
        query = query.where(vouchers_table.c.state == state)
    if merchant is not None:
        query = query.where(reward_orders.c.merchant == merchant)
    rows = uow.conn.execute(query).all()
    items = [_voucher_read(uow, row, row.reward_code, row.kind) for row in rows[:limit]]
    return items, str(rows[limit - 1].id) if len(rows) > limit else None


# --------------------------------------------------------------------------- for members


def what_can_i_get(uow: UnitOfWork, *, program_id: int, member_id: int) -> WhatCanIGet:
    """Rewards the member may redeem now (the dearest first: the most its points can buy),
    and those within reach (the fewest points short first). Left out: rewards not on sale to
    the member now, sold out, or beyond its limits."""
    members_service.require_member(uow, program_id=program_id, member_id=member_id)
    available = points_service.balance(uow, member_id=member_id).available
    buyer = _buyer(uow, program_id, member_id)
    policy = _policy(uow, program_id)
    terms_of_tier = policy.for_tier(buyer.tier)
    now = uow.clock.now()
    zone = programs_service.time_zone(uow, program_id=program_id)
    rows = uow.conn.execute(
        select(rewards)
        .where(rewards.c.program_id == program_id, rewards.c.state == "active",
               or_(rewards.c.stock_left.is_(None), rewards.c.stock_left > 0))
        .order_by(rewards.c.id)
    ).all()  # fmt: skip
    ready: list[Available] = []
    reach: list[Available] = []
    for row in rows:
        terms = _terms(uow, row)
        try:
            core.check_on_sale(terms, state=row.state, tier=buyer.tier, now=now, zone=zone)
            _check_prizes_left(uow, row.id, terms)
            _check_event_ahead(terms, now, zone)
            price = _quote(uow, row, terms, buyer, 1, policy)
            of_reward, this_month = _counts(uow, program_id, member_id, row.id, terms)
            core.check_limits(
                terms, quantity=1, points=price.points, terms=terms_of_tier, tier=buyer.tier,
                redeemed_of_reward=of_reward, redemptions_this_month=this_month,
                everyone=not policy.tiers,
            )  # fmt: skip
        except (NotOnSale, TierNotAllowed, LimitReached):
            continue
        short = max(price.points - available, 0)
        entry = Available(reward=_reward_read(uow, row, policy), quote=price, short=short)
        (ready if short == 0 else reach).append(entry)
    ready.sort(key=lambda a: (-a.quote.points, a.reward.id))
    reach.sort(key=lambda a: (a.short, a.reward.id))
    return WhatCanIGet(available=available, now=ready, within_reach=reach[:20])


def vote_tally(uow: UnitOfWork, *, program_id: int, code: str) -> dict[str, int]:
    """Votes cast for each option of a vote reward (units redeemed, cancelled ones left out)."""
    row = _reward_row(uow, program_id, code)
    terms = _terms(uow, row)
    if terms.vote is None:
        raise InvalidInput(
            field="reward",
            problem=f"{code!r} is a {terms.kind} reward, not a vote",
            problem_zh=f"{code!r} 是 {terms.kind} 类礼品,不是投票类礼品。",
        )
    tally = dict.fromkeys(terms.vote.options, 0)
    orders = uow.conn.execute(
        select(reward_orders.c.outcome, reward_orders.c.quantity).where(
            reward_orders.c.reward_id == row.id,
            reward_orders.c.state.not_in(["cancelled", "returned", "held", "awaiting_payment"]),
        )
    )
    for outcome, quantity in orders:
        choice = dict(outcome).get("choice")
        if choice in tally:
            tally[choice] += quantity
    return tally
