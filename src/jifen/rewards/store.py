"""The last writes of a redemption: the order, its first step and the stock, as one statement
on PostgreSQL, plain statements elsewhere.

The service decides everything; this module only stores it. On PostgreSQL the order, its
step and the conditional stock decrement are one data-modifying CTE: one round trip, and the
reward's row is locked only from that statement to the commit. The order is written only if
the stock was there and the reward still on sale; when it was not (a concurrent redemption
took the last units since they were checked, or staff paused the reward meanwhile), nothing
is written and the caller runs the transaction again, which then sees why. A reward without
a counted stock has no decrement to carry that check: its row is share-locked where it is
still on sale instead (redemptions of it do not wait for each other; a pause waits for them,
and one that committed first is seen). SQLite runs in-process, where round trips cost
nothing, and takes the same rows as ordinary statements.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Json
from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from jifen.db.prepared import execute
from jifen.rewards.models import order_steps, reward_orders, rewards

ORDER_COLUMNS = (
    "program_id", "member_id", "reward_id", "idempotency_key", "request_hash", "state",
    "quantity", "points", "cash_fen", "value_fen", "payment_ref", "price", "outcome",
    "hold_until", "pay_by", "spend_posting_id", "hold_posting_id", "refund_posting_id",
    "merchant", "store", "created_at", "updated_at",
)  # fmt: skip
_JSON = frozenset({"price", "outcome"})

_POSTGRESQL_FINISH = """
WITH s AS (
    UPDATE rewards SET stock_left = stock_left - %(quantity)s, sold = sold + %(quantity)s
    WHERE id = %(reward_id)s AND %(limited)s AND stock_left >= %(quantity)s
        AND state = 'active'
    RETURNING stock_left
), a AS (
    SELECT 1 FROM rewards
    WHERE id = %(reward_id)s AND NOT %(limited)s AND state = 'active'
    FOR SHARE
), o AS (
    INSERT INTO reward_orders (
        program_id, member_id, reward_id, idempotency_key, request_hash, state, quantity,
        points, cash_fen, value_fen, payment_ref, price, outcome, hold_until, pay_by,
        spend_posting_id, hold_posting_id, refund_posting_id, merchant, store, created_at,
        updated_at
    )
    SELECT
        %(program_id)s, %(member_id)s, %(reward_id)s, %(idempotency_key)s, %(request_hash)s,
        %(state)s, %(quantity)s, %(points)s, %(cash_fen)s, %(value_fen)s, %(payment_ref)s,
        %(price)s, %(outcome)s, %(hold_until)s, %(pay_by)s, %(spend_posting_id)s,
        %(hold_posting_id)s, %(refund_posting_id)s, %(merchant)s, %(store)s, %(created_at)s,
        %(updated_at)s
    WHERE EXISTS (SELECT 1 FROM s) OR EXISTS (SELECT 1 FROM a)
    RETURNING id
), st AS (
    INSERT INTO reward_order_steps (order_id, state, at, "by", note)
    SELECT o.id, %(step_state)s, %(step_at)s, %(step_by)s, %(step_note)s FROM o
)
SELECT (SELECT id FROM o), (SELECT stock_left FROM s)
"""

_INSERT_ORDER = reward_orders.insert().returning(reward_orders.c.id)
_INSERT_STEP = order_steps.insert()
_TAKE_STOCK = (
    update(rewards)
    .where(
        rewards.c.id == bindparam("reward"),
        rewards.c.stock_left >= bindparam("quantity"),
        rewards.c.state == "active",
    )
    .values(
        stock_left=rewards.c.stock_left - bindparam("quantity"),
        sold=rewards.c.sold + bindparam("quantity"),
    )
    .returning(rewards.c.stock_left)
)
_ON_SALE = (
    select(rewards.c.id)
    .where(rewards.c.id == bindparam("reward"), rewards.c.state == "active")
    .with_for_update(read=True)
)


def insert_order(conn: Connection, order: dict[str, Any], step: dict[str, Any]) -> int:
    """The order and its first step, without touching the stock; the order's id."""
    order_id = int(conn.execute(_INSERT_ORDER, order).scalar_one())
    insert_step(conn, order_id, step)
    return order_id


def insert_step(conn: Connection, order_id: int, step: dict[str, Any]) -> None:
    conn.execute(_INSERT_STEP, {"order_id": order_id, **step})


def take_stock(conn: Connection, reward_id: int, quantity: int) -> int | None:
    """Take ``quantity`` units if they are there; the units left, or None if they were not."""
    left = conn.execute(_TAKE_STOCK, {"reward": reward_id, "quantity": quantity})
    found = left.scalar_one_or_none()
    return None if found is None else int(found)


def still_on_sale(conn: Connection, reward_id: int) -> bool:
    """Whether the reward is still on sale, share-locking its row until the commit if so
    (FOR SHARE on PostgreSQL): the check a reward without a counted stock has in place of
    :func:`take_stock`'s."""
    return conn.execute(_ON_SALE, {"reward": reward_id}).first() is not None


def finish(
    conn: Connection, order: dict[str, Any], step: dict[str, Any], *, limited: bool
) -> tuple[int | None, int | None]:
    """The order, its first step and (``limited``) the stock, all or nothing: (the order's
    id, the units left); (None, None) when the stock was no longer there or the reward no
    longer on sale."""
    if conn.dialect.name == "postgresql":
        params = {c: Json(order[c]) if c in _JSON else order[c] for c in ORDER_COLUMNS}
        params.update({f"step_{k}": v for k, v in step.items()}, limited=limited)
        row = execute(conn, _POSTGRESQL_FINISH, params).fetchone()
        return row[0], row[1]
    left = take_stock(conn, order["reward_id"], order["quantity"]) if limited else None
    if (limited and left is None) or (not limited and not still_on_sale(conn, order["reward_id"])):
        return None, None
    return insert_order(conn, order, step), left
