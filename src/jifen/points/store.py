"""Writing one posting's rows: a single statement on PostgreSQL, plain inserts elsewhere.

The service decides (lines, lots, chain links, new account figures); this module stores.
Three PostgreSQL statements are the exception: they carry out a decision of the ledger's
core in SQL, where running the core in Python cost more than the writing: the expiry of many
accounts' due lots, and the earn and the spend in one statement with the account's lock
(the earn's plan comes from the core; the spend takes its lots as ``ledger.consume``
does). Each spells the core's rule and the digest out piece for piece, and a test compares
its rows with those of the general path.

On PostgreSQL the whole posting — the posting row, its lines, chain entries,
allocations, lot updates, new lots and account updates — is one data-modifying CTE, so a
write costs one round trip however many rows it touches, and the member's row lock is held
for as short a time as possible. SQLite runs in-process, where round trips cost nothing,
and takes the same rows as ordinary statements. The same tests run against both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Connection

from jifen.db.bulk import among, array_literal
from jifen.db.prepared import PreparedSQL, compact, driver, execute
from jifen.points.models import accounts, lots, postings


@dataclass(frozen=True, slots=True)
class PostingRows:
    posting: dict[str, Any]
    lines: list[tuple[int, int]]  # (account id, amount)
    chain: list[tuple[int, int, str]]  # (account id, seq, link)
    allocations: list[tuple[int, int]]  # (lot id, change of remaining)
    new_lots: list[tuple[int, int, datetime, datetime | None, int | None]]
    # (owner account id, amount, available_at, expires_at, source lot id)
    accounts: list[tuple[int, int, int, int, int, str]]
    # (account id, balance change, frozen change, debt change, new head seq, new head hash)


AccountRow = tuple[int, int, int, int, int, int, int, str, str, int | None]
"""id, program id, member id, balance, frozen, debt, head seq, head hash, member state,
replayed posting id"""

LotRow = tuple[int, int, int, datetime, datetime | None]
"""id, amount, remaining, available_at, expires_at"""


ACCOUNT_COLUMNS = (
    accounts.c.id,
    accounts.c.program_id,
    accounts.c.member_id,
    accounts.c.balance,
    accounts.c.frozen,
    accounts.c.debt,
    accounts.c.head_seq,
    accounts.c.head_hash,
    accounts.c.member_state,
)

# An account row as the service reads it (``AccountRow``, but for the replayed posting).
# The member's state comes with the locked row: a lock that waited for a change of state
# reads the row as that change left it, where the member's own row, read in the same
# statement, would still show the state from before (see ``points.service``'s
# ``set_member_state``).
_ACCOUNT_FIELDS = (
    "a.id, a.program_id, a.member_id, a.balance, a.frozen, a.debt, a.head_seq, a.head_hash, "
    "a.member_state"
)

_POSTGRESQL_LOCK = f"""
SELECT {_ACCOUNT_FIELDS},
       (SELECT p.id FROM postings p
        WHERE p.program_id = a.program_id AND p.idempotency_key = %(key)s)
FROM accounts a
WHERE a.member_id = ANY(%(members)s::bigint[]) AND a.currency = 'points'
ORDER BY a.id
FOR NO KEY UPDATE OF a
"""  # noqa: S608 (constants only)


# One member (most postings): a statement whose generic plan PostgreSQL keeps, where an
# array of members has it plan each call again (a third of the statement's cost).
_POSTGRESQL_LOCK_ONE = _POSTGRESQL_LOCK.replace(
    "a.member_id = ANY(%(members)s::bigint[])", "a.member_id = %(member)s"
)


LOCK_ONE = PreparedSQL(_POSTGRESQL_LOCK_ONE, len(ACCOUNT_COLUMNS) + 1)
"""PostgreSQL: :func:`lock_accounts` for one member, as a read that can go with others."""


# SQLite: the same read in the driver's own terms (the write lock is the transaction's).
_SQLITE_LOCK_ONE = (
    _POSTGRESQL_LOCK_ONE.replace("%(key)s", ":key")
    .replace("%(member)s", ":member")
    .replace("FOR NO KEY UPDATE OF a", "")
)


def lock_accounts(conn: Connection, member_ids: Sequence[int], key: str) -> list[AccountRow]:
    """Lock the members' points accounts in id order, and find a posting made with ``key``.

    PostgreSQL locks the rows (``FOR NO KEY UPDATE``: the ids never change, so foreign keys
    pointing at them need not wait); SQLite's ``BEGIN IMMEDIATE`` already serialises writers.
    """
    if conn.dialect.name == "postgresql":
        if len(member_ids) == 1:
            statement, params = _POSTGRESQL_LOCK_ONE, {"key": key, "member": member_ids[0]}
        else:
            statement, params = _POSTGRESQL_LOCK, {"key": key, "members": list(member_ids)}
        return list(execute(conn, statement, params).fetchall())
    if len(member_ids) == 1:
        params = {"key": key, "member": member_ids[0]}
        return list(driver(conn).execute(_SQLITE_LOCK_ONE, params).fetchall())
    replay = (
        select(postings.c.id)
        .where(postings.c.program_id == accounts.c.program_id, postings.c.idempotency_key == key)
        .scalar_subquery()
    )
    rows = conn.execute(
        select(*ACCOUNT_COLUMNS, replay)
        .where(
            among(conn.dialect.name, accounts.c.member_id, member_ids),
            accounts.c.currency == "points",
        )
        .order_by(accounts.c.id)
    )
    return [tuple(row) for row in rows]


_POSTGRESQL_SPENDABLE = """
SELECT id, amount, remaining, available_at, expires_at FROM lots
WHERE account_id = %(account)s AND remaining > 0 AND available_at <= %(now)s
  AND (expires_at IS NULL OR expires_at > %(now)s)
ORDER BY expires_at ASC NULLS LAST, id
LIMIT %(limit)s
"""


def spendable_lots(
    conn: Connection, account_id: int, now: datetime, limit: int | None
) -> list[LotRow]:
    """The account's lots a debit at ``now`` may take, earliest expiry first."""
    if conn.dialect.name == "postgresql":
        params = {"account": account_id, "now": now, "limit": limit}
        return list(execute(conn, _POSTGRESQL_SPENDABLE, params).fetchall())
    query = (
        select(lots.c.id, lots.c.amount, lots.c.remaining, lots.c.available_at, lots.c.expires_at)
        .where(
            lots.c.account_id == account_id,
            lots.c.remaining > 0,
            lots.c.available_at <= now,
            or_(lots.c.expires_at.is_(None), lots.c.expires_at > now),
        )
        .order_by(lots.c.expires_at.asc().nulls_last(), lots.c.id)
        .limit(limit)
    )
    return [tuple(row) for row in conn.execute(query)]


# The lock of one account and, in the same round trip, its first open lots in FIFO order
# (whatever their dates: the caller picks those spendable at its moment). The lots are read
# by open_lots (migration 0011), a VOLATILE function in the locked row's projection: when
# the lock had to wait for another posting to the account, PostgreSQL rechecks the newest
# version of the row and projects it again, and the function, read again in a fresh
# snapshot, sees that posting's lots. Every change of a lot is a posting to its account,
# which updates the account's row, so the lots read always match the row locked.
_LOTS = len(ACCOUNT_COLUMNS) + 1
"""Where the spending lock's row holds its lots, after the ``AccountRow``."""

_POSTGRESQL_LOCK_SPENDING = f"""
SELECT {_ACCOUNT_FIELDS},
       (SELECT p.id FROM postings p
        WHERE p.program_id = a.program_id AND p.idempotency_key = %(key)s),
       open_lots(a.id, %(limit)s)
FROM accounts a
WHERE a.member_id = %(member)s AND a.currency = 'points'
FOR NO KEY UPDATE OF a
"""  # noqa: S608 (constants only)

_AT_ONCE_LOCK = f"""
WITH a AS (
    SELECT {_ACCOUNT_FIELDS},
           (SELECT p.id FROM postings p
            WHERE p.program_id = a.program_id AND p.idempotency_key = %(key)s) AS replayed,
           (SELECT s.id FROM accounts s
            WHERE s.program_id = a.program_id AND s.system_code = %(system)s::text
              AND s.currency = 'points') AS system,
           %(lots)s AS packed
    FROM accounts a
    WHERE a.member_id = %(member)s AND a.currency = 'points'
    FOR NO KEY UPDATE OF a
)"""  # noqa: S608 (constants only)
"""The member's account locked, with its posting made with the key (if any), the system
account the posting moves points to or from, and (a spending) its first open lots."""

# What both statements write once CTE ``d`` holds the one account whose posting is written
# (none: nothing is written), with ``source`` and ``target`` (the line's two accounts), the
# locked row's ``balance`` and its ``change``, ``seq``, ``head_hash``, and the digest's
# pieces of allocations and new lots: the digest, the chain link, the posting, its two
# lines (the source's first, as the plans have them), its chain entry and the account's
# figures. The figures are set from the locked row, not added to the row the UPDATE finds:
# that is the version in the statement's snapshot, and where a posting committed after the
# snapshot, PostgreSQL tests the CHECKs on the new row made from that older version before
# it moves on to the newest (a balance that older version could not bear would fail).
_AT_ONCE_POSTING = """, g AS (
    SELECT d.*,
           encode(sha256(convert_to(concat_ws(E'\\x1f',
               'v1', d.program_id, %(facts)s::text,
               CASE WHEN d.source < d.target
                    THEN d.source || ':' || -%(amount)s::bigint || ';'
                         || d.target || ':' || %(amount)s::bigint
                    ELSE d.target || ':' || %(amount)s::bigint || ';'
                         || d.source || ':' || -%(amount)s::bigint
               END,
               d.allocs, d.new_lots), 'UTF8')), 'hex') AS digest
    FROM d
), x AS (
    SELECT g.*,
           encode(sha256(convert_to(g.head_hash || '|' || g.seq || '|' || g.digest, 'UTF8')),
                  'hex') AS link
    FROM g
), p AS (
    INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id,
                          amount, reason, actor, created_at, digest)
    SELECT x.program_id, %(kind)s::text, %(key)s::text, %(request_hash)s::text, x.id,
           %(amount)s::bigint, %(reason)s::text, %(actor)s::text, %(now)s::timestamptz,
           x.digest
    FROM x
    RETURNING id
), l AS (
    INSERT INTO lines (posting_id, account_id, amount)
    SELECT p.id, y.account_id, y.amount
    FROM p, x, LATERAL (VALUES (1, x.source, -%(amount)s::bigint),
                               (2, x.target, %(amount)s::bigint)) AS y(n, account_id, amount)
    ORDER BY y.n
), c AS (
    INSERT INTO chain_entries (account_id, seq, posting_id, chain_hash)
    SELECT x.id, x.seq, p.id, x.link FROM p, x
), au AS (
    UPDATE accounts SET balance = x.balance + x.change, head_seq = x.seq, head_hash = x.link
    FROM x WHERE accounts.id = x.id
)"""

# An earning whose plan the service made before the lock, on the assumption that the member
# is active, owes nothing and has not used the key (``jifen.ledger.plan_earn`` of a debt-free
# account: two lines, one new lot). The statement locks the account as LOCK_ONE does and
# writes the plan only where the locked row bears the assumption out; either way it answers
# the locked row, its replayed posting and the new posting's id (NULL: nothing written, and
# the service goes on from the locked row as after LOCK_ONE). So a common earning is one
# round trip, and no Python runs while the account's row is locked. The digest is
# ``jifen.ledger.chain.posting_digest`` of the plan's facts and the link
# ``jifen.ledger.chain.chain_link``, spelt out in SQL piece for piece, as the expiry
# statement below spells them (a test compares this statement's rows with the general
# path's); the pieces that need no account id come from the service (``%(facts)s``).
_POSTGRESQL_CREDIT_AT_ONCE = (
    _AT_ONCE_LOCK.replace("%(lots)s", "NULL::bigint[]")  # noqa: S608 (constants only)
    + """, d AS (
    SELECT a.id, a.program_id, a.system AS source, a.id AS target, a.balance,
           %(amount)s::bigint AS change, a.head_seq + 1 AS seq, a.head_hash, '' AS allocs,
           a.id || ':' || %(amount)s::bigint || ':' || %(lot_stamps)s::text || ':-' AS new_lots
    FROM a
    WHERE a.replayed IS NULL AND a.debt = 0 AND a.member_state = 'active'
      AND a.system IS NOT NULL
)"""
    + _AT_ONCE_POSTING
    + """, nl AS (
    INSERT INTO lots (account_id, posting_id, amount, remaining, available_at, expires_at)
    SELECT x.id, p.id, %(amount)s::bigint, %(amount)s::bigint, %(available_at)s::timestamptz,
           %(expires_at)s::timestamptz
    FROM p, x
)
SELECT """
    + _ACCOUNT_FIELDS
    + """, a.replayed, (SELECT p.id FROM p) FROM a
"""
)


@dataclass(frozen=True, slots=True)
class Credit:
    """An earning planned before the lock (see :func:`credit_at_once`): one line from the
    ``issuer`` system account to the member and one new lot, ``amount`` each."""

    kind: str
    issuer: str
    amount: int
    now: datetime
    available_at: datetime
    expires_at: datetime | None
    request_hash: str
    reason: str
    actor: str
    facts: str
    """The digest's pieces that need no account id, from the kind to the actor, joined."""
    lot_stamps: str
    """The new lot's available and expiry times as the digest spells them, joined."""


def credit_at_once(
    conn: Connection, member_id: int, key: str, credit: Credit, *, alone: bool = False
) -> tuple[AccountRow | None, int | None]:
    """PostgreSQL: lock the member's account and, if it is active, owes nothing and has
    no posting with ``key``, write ``credit`` in the same statement: (the locked row or
    ``None`` for no such member, the new posting's id or ``None`` for nothing written).
    ``alone``: as a transaction of its own if none is open (:func:`execute`)."""
    params = {
        "member": member_id, "key": key, "kind": credit.kind, "system": credit.issuer,
        "amount": credit.amount, "now": credit.now, "available_at": credit.available_at,
        "expires_at": credit.expires_at, "request_hash": credit.request_hash,
        "reason": credit.reason, "actor": credit.actor, "facts": credit.facts,
        "lot_stamps": credit.lot_stamps,
    }  # fmt: skip
    row = execute(conn, _POSTGRESQL_CREDIT_AT_ONCE, params, alone=alone).fetchone()
    if row is None:
        return None, None
    return row[:_LOTS], row[_LOTS]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# A spending in one statement, as most go: the spending lock's row and first open lots (read
# by open_lots after the lock is granted, as above), and, where the member is active, has
# not used the key and the lots read hold enough spendable points, the debit written from
# them: ``jifen.ledger.consume`` spelt out in SQL (spendable lots in FIFO order, each taken
# up to what is still needed), then the posting, its two lines, chain link and allocations,
# the lots and the account, with the digest and link as the credit above spells them. Where
# the lots fall short (or more lots than were read might be needed), or the row does not
# bear the spending out, nothing is written and the service goes on from the locked row
# and its lots as after the spending lock, refusing or planning as ever.
_POSTGRESQL_DEBIT_AT_ONCE = compact(
    _AT_ONCE_LOCK.replace("%(lots)s", "open_lots(a.id, %(limit)s)")  # noqa: S608 (constants only)
    + """, o AS (
    SELECT k, a.packed[k] AS lot, a.packed[2 * n + k] AS remaining
    FROM a, LATERAL (SELECT cardinality(a.packed) / 5 AS n) AS c, generate_series(1, c.n) AS k
    WHERE a.replayed IS NULL AND a.member_state = 'active' AND a.system IS NOT NULL
      AND a.packed[3 * n + k] <= %(now_us)s::bigint
      AND (a.packed[4 * n + k] IS NULL OR a.packed[4 * n + k] > %(now_us)s::bigint)
), r AS (
    SELECT o.*, (sum(o.remaining) OVER (ORDER BY o.k))::bigint - o.remaining AS before FROM o
), t AS (
    SELECT r.k, r.lot, r.remaining, least(r.remaining, %(amount)s::bigint - r.before) AS take
    FROM r WHERE r.before < %(amount)s::bigint
), d AS (
    SELECT a.id, a.program_id, a.id AS source, a.system AS target, a.balance,
           -%(amount)s::bigint AS change, a.head_seq + 1 AS seq, a.head_hash,
           (SELECT string_agg(t.lot || ':' || -t.take, ';' ORDER BY t.lot) FROM t) AS allocs,
           '' AS new_lots
    FROM a
    WHERE (SELECT coalesce(sum(t.take), 0) FROM t) = %(amount)s::bigint
      -- Only where every lot taken is in this statement's snapshot: the UPDATE below finds
      -- its lots there (and moves on to their newest versions), and a lot that a posting
      -- made after the snapshot would be missed. Then the service takes the lots itself.
      AND NOT EXISTS (SELECT FROM t WHERE NOT EXISTS (SELECT FROM lots v WHERE v.id = t.lot))
)"""
    + _AT_ONCE_POSTING
    + """, al AS (
    INSERT INTO allocations (posting_id, lot_id, amount)
    SELECT p.id, t.lot, -t.take FROM p, t ORDER BY t.k
), lu AS (
    -- The ids also as an array: a join on the CTE alone is planned as a hash join over a
    -- sequential scan of every lot (the CTE's rows are estimated at dozens).
    -- What remains is set from the lots read after the lock, as the account's balance is.
    UPDATE lots SET remaining = t.remaining - t.take
    FROM t, p WHERE lots.id = t.lot AND lots.id = ANY (ARRAY(SELECT t.lot FROM t))
)
SELECT """
    + _ACCOUNT_FIELDS
    + """, a.replayed, (SELECT p.id FROM p),
       CASE WHEN NOT EXISTS (SELECT FROM p) THEN a.packed END
FROM a
"""
)


@dataclass(frozen=True, slots=True)
class Debit:
    """A spending to be written in the statement that locks the account, if its lots allow
    (see :func:`debit_at_once`): ``amount`` from the member into the ``into`` system account."""

    kind: str
    into: str
    amount: int
    now: datetime
    request_hash: str
    reason: str
    actor: str
    facts: str
    """The digest's pieces that need no account id, from the kind to the actor, joined."""


def debit_at_once(
    conn: Connection, member_id: int, key: str, debit: Debit, limit: int, *, alone: bool = False
) -> tuple[AccountRow | None, int | None, list[LotRow]]:
    """PostgreSQL: lock the member's account and, if the member is active, has no posting
    with ``key`` and its first ``limit`` open lots hold enough spendable points, write
    ``debit`` from them in the same statement: (the locked row or ``None`` for no such
    member, the new posting's id or ``None`` for nothing written, and, when nothing was
    written, the first ``limit`` open lots, read after the lock as
    :func:`lock_account_spending` reads them). A small ``limit`` keeps the statement
    cheap: a spending that needs more lots reads them after it. ``alone``: as a transaction
    of its own if none is open (:func:`execute`)."""
    params = {
        "member": member_id, "key": key, "limit": limit, "kind": debit.kind,
        "system": debit.into, "amount": debit.amount, "now": debit.now,
        "now_us": (debit.now - _EPOCH) // timedelta(microseconds=1),
        "request_hash": debit.request_hash, "reason": debit.reason, "actor": debit.actor,
        "facts": debit.facts,
    }  # fmt: skip
    row = execute(conn, _POSTGRESQL_DEBIT_AT_ONCE, params, alone=alone).fetchone()
    if row is None:
        return None, None, []
    return row[:_LOTS], row[_LOTS], _unpacked(row[_LOTS + 1])


_POSTGRESQL_POSTING_WITH_KEY = """
SELECT id FROM postings WHERE program_id = %(program)s AND idempotency_key = %(key)s
"""


def posting_with_key(conn: Connection, program_id: int, key: str) -> int | None:
    """PostgreSQL: the programme's posting made with ``key``, read in a snapshot of its own."""
    row = execute(conn, _POSTGRESQL_POSTING_WITH_KEY, {"program": program_id, "key": key})
    found = row.fetchone()
    return None if found is None else int(found[0])


def _unpacked(packed: list[int | None] | None) -> list[LotRow]:
    """The lots ``open_lots`` packed: its ids, amounts, remainders, and available and
    expiry times in microseconds since 1970, one after the other."""
    if not packed:
        return []
    n = len(packed) // 5
    rows = []
    for k in range(n):
        available, expires = packed[3 * n + k], packed[4 * n + k]
        assert available is not None
        rows.append((
            packed[k], packed[n + k], packed[2 * n + k],
            _EPOCH + timedelta(microseconds=available),
            None if expires is None else _EPOCH + timedelta(microseconds=expires),
        ))  # fmt: skip
    return rows  # type: ignore[return-value]  # ids and amounts are never NULL


def lock_account_spending(
    conn: Connection, member_id: int, key: str, limit: int
) -> tuple[AccountRow | None, list[LotRow] | None]:
    """:func:`lock_accounts` for one member, with its first ``limit`` open lots (FIFO
    order, any dates) read in the same round trip on PostgreSQL: (the account row or
    ``None`` for no such member, the lots or ``None`` when they must be read apart, as on
    SQLite)."""
    if conn.dialect.name != "postgresql":
        rows = lock_accounts(conn, [member_id], key)
        return (rows[0] if rows else None), None
    params = {"key": key, "member": member_id, "limit": limit}
    row = execute(conn, _POSTGRESQL_LOCK_SPENDING, params).fetchone()
    if row is None:
        return None, None
    return row[:_LOTS], _unpacked(row[_LOTS])


BalanceRow = tuple[int, int, int, int, int | None, datetime | None, datetime | None]
"""program id, balance, frozen, debt, and one open lot's remaining, available_at, expires_at
(``None`` for an account with no open lot)"""

_POSTGRESQL_BALANCE = """
SELECT a.program_id, a.balance, a.frozen, a.debt, l.remaining, l.available_at, l.expires_at
FROM accounts a
LEFT JOIN lots l ON l.account_id = a.id AND l.remaining > 0
WHERE a.member_id = %(member)s AND a.currency = 'points'
"""


def balance_rows(conn: Connection, member_id: int) -> list[BalanceRow]:
    """The member's account figures with each of its open lots, one row a lot, read in one
    statement (so from one snapshot); no rows for an unknown member."""
    if conn.dialect.name == "postgresql":
        params = {"member": member_id}
        return list(execute(conn, _POSTGRESQL_BALANCE, params).fetchall())
    query = (
        select(
            accounts.c.program_id, accounts.c.balance, accounts.c.frozen, accounts.c.debt,
            lots.c.remaining, lots.c.available_at, lots.c.expires_at,
        )
        .select_from(
            accounts.outerjoin(lots, and_(lots.c.account_id == accounts.c.id, lots.c.remaining > 0))
        )
        .where(accounts.c.member_id == member_id, accounts.c.currency == "points")
    )  # fmt: skip
    return [tuple(row) for row in conn.execute(query)]


def accounts_with_due_lots(
    conn: Connection, program_id: int, now: datetime, limit: int
) -> list[int]:
    """Up to ``limit`` member accounts of the programme holding lots due to expire at
    ``now``, in account id order. Reads the due lots through their expiry index and stops
    after ``limit`` of them, so a chunk costs the same however many lots are due."""
    query = (
        select(lots.c.account_id)
        .select_from(lots.join(accounts, accounts.c.id == lots.c.account_id))
        .where(lots.c.remaining > 0, lots.c.expires_at <= now, accounts.c.program_id == program_id)
        .order_by(lots.c.expires_at)
        .limit(limit)
    )
    return sorted({int(account_id) for (account_id,) in conn.execute(query)})


# The window of earliest due lots is read from their index (expiry, account) alone where
# the table is vacuumed, and holds lots of every programme (a programme's own run has
# expired what was due before it); only the accounts taken are read, and checked for the
# programme. Four times ``limit`` lots leave accounts for a few workers to take side by side.
_POSTGRESQL_TAKE_DUE = f"""
SELECT {_ACCOUNT_FIELDS}, NULL::bigint
FROM (SELECT DISTINCT due.account_id
      FROM (SELECT l.account_id FROM lots l
            WHERE l.remaining > 0 AND l.expires_at <= %(now)s
            ORDER BY l.expires_at LIMIT %(window)s) due) d
JOIN accounts a ON a.id = d.account_id
WHERE a.program_id = %(program)s
ORDER BY a.id
LIMIT %(limit)s
FOR NO KEY UPDATE OF a SKIP LOCKED
"""  # noqa: S608 (constants only)


def take_accounts_with_due_lots(
    conn: Connection, program_id: int, now: datetime, limit: int
) -> list[AccountRow]:
    """PostgreSQL: lock up to ``limit`` member accounts of the programme holding lots due at
    ``now`` that no other transaction holds, passing over those that one does (``SKIP
    LOCKED``): workers running expiry side by side each take accounts of their own. They
    are chosen among the accounts of the earliest due lots, in id order. None when every
    such account is held or belongs to another programme (or none is due): then
    :func:`accounts_with_due_lots` and :func:`lock_accounts_by_id` find them and wait
    their turn."""
    params = {"now": now, "program": program_id, "window": 4 * limit, "limit": limit}
    return [tuple(row) for row in execute(conn, _POSTGRESQL_TAKE_DUE, params, prepare=None)]


def lock_accounts_by_id(conn: Connection, account_ids: Sequence[int]) -> list[AccountRow]:
    """Lock member accounts by their own ids, in id order (see :func:`lock_accounts`)."""
    query = (
        select(*ACCOUNT_COLUMNS)
        .where(among(conn.dialect.name, accounts.c.id, account_ids))
        .order_by(accounts.c.id)
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(key_share=True, of=accounts)  # FOR NO KEY UPDATE
    return [(*row, None) for row in conn.execute(query)]


_POSTGRESQL_DUE_LOTS = """
SELECT l.account_id, l.id, l.amount, l.remaining, l.available_at, l.expires_at
FROM unnest(%(accounts)s::bigint[]) AS t(id) JOIN lots l ON l.account_id = t.id
WHERE l.remaining > 0 AND l.expires_at <= %(now)s
"""


def due_lots(
    conn: Connection, account_ids: Sequence[int], now: datetime
) -> list[tuple[int, int, int, int, datetime, datetime | None]]:
    """(account id, lot id, amount, remaining, available_at, expires_at) of the accounts'
    lots due to expire at ``now``."""
    if conn.dialect.name == "postgresql":  # an index probe an account, not a bitmap scan
        params = {"accounts": list(account_ids), "now": now}
        return [tuple(row) for row in execute(conn, _POSTGRESQL_DUE_LOTS, params, prepare=None)]
    query = select(
        lots.c.account_id, lots.c.id, lots.c.amount, lots.c.remaining, lots.c.available_at,
        lots.c.expires_at,
    ).where(
        among(conn.dialect.name, lots.c.account_id, account_ids), lots.c.remaining > 0,
        lots.c.expires_at <= now,
    )  # fmt: skip
    return [tuple(row) for row in conn.execute(query)]


# The expiry of many locked accounts' due lots as one statement, for the nightly run and the
# year-end clearing, where building each posting's rows in Python cost more than writing them.
# It writes exactly what ``points.service._expire_locked`` writes for the same accounts (a test
# compares the two row for row): one posting an account, its two lines, its chain link, an
# allocation a lot, the lots emptied and the account's figures and chain head. The posting's
# digest is ``jifen.ledger.chain.posting_digest`` of those facts, its request hash
# ``points.service._fingerprint('expire', at=…, member=…, seq=…)`` and its link
# ``jifen.ledger.chain.chain_link``, spelt out in SQL piece for piece; change one, change both.
_POSTGRESQL_EXPIRE = """
WITH d AS (
    SELECT l.account_id, l.id, l.remaining
    FROM unnest(%(accounts)s::bigint[]) AS t(id) JOIN lots l ON l.account_id = t.id
    WHERE l.remaining > 0 AND l.expires_at <= %(now)s
), per AS (
    SELECT account_id, sum(remaining)::bigint AS total, count(*) AS lots,
           string_agg(id || ':' || -remaining, ';' ORDER BY id) AS allocs
    FROM d GROUP BY account_id
), h AS (
    SELECT a.id, a.program_id, a.member_id, a.head_seq + 1 AS seq, a.head_hash, per.total,
           per.lots, per.allocs,
           'expire:' || %(stamp)s::text || ':' || a.id || ':' || a.head_seq AS key,
           CASE WHEN a.id < %(system)s
                THEN a.id || ':' || -per.total || ';' || %(system)s || ':' || per.total
                ELSE %(system)s || ':' || per.total || ';' || a.id || ':' || -per.total
           END AS lines
    FROM per JOIN accounts a ON a.id = per.account_id
), dg AS (
    SELECT h.*,
           encode(sha256(convert_to(concat_ws(E'\\x1f',
               'v1', h.program_id, %(kind)s::text, h.key, %(stamp)s::text, h.total, '-',
               %(reason)s::text, %(actor)s::text, h.lines, h.allocs, ''), 'UTF8')),
                  'hex') AS digest,
           encode(sha256(convert_to(concat_ws(E'\\x1f',
               'expire', 'at=' || %(stamp)s::text, 'member=' || h.member_id,
               'seq=' || (h.seq - 1)), 'UTF8')), 'hex') AS request_hash
    FROM h
), x AS (
    SELECT dg.*,
           encode(sha256(convert_to(dg.head_hash || '|' || dg.seq || '|' || dg.digest,
                                    'UTF8')), 'hex') AS link
    FROM dg
), p AS (
    INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id,
                          amount, reason, actor, created_at, digest)
    SELECT x.program_id, %(kind)s::text, x.key, x.request_hash, x.id, x.total, %(reason)s::text,
           %(actor)s::text, %(now)s, x.digest
    FROM x ORDER BY x.id
    RETURNING id, account_id
), li AS (
    INSERT INTO lines (posting_id, account_id, amount)
    SELECT p.id, y.account_id, y.amount
    FROM p JOIN x ON x.id = p.account_id,
         LATERAL (VALUES (1, x.id, -x.total), (2, %(system)s::bigint, x.total))
             AS y(n, account_id, amount)
    ORDER BY p.id, y.n
), ch AS (
    INSERT INTO chain_entries (account_id, seq, posting_id, chain_hash)
    SELECT x.id, x.seq, p.id, x.link FROM p JOIN x ON x.id = p.account_id
), al AS (
    INSERT INTO allocations (posting_id, lot_id, amount)
    SELECT p.id, d.id, -d.remaining FROM d JOIN p ON p.account_id = d.account_id
    ORDER BY p.id, d.id
), lu AS (
    UPDATE lots SET remaining = 0 FROM d WHERE lots.id = d.id
), au AS (
    UPDATE accounts
    SET balance = accounts.balance - x.total, frozen = accounts.frozen + %(frozen)s * x.total,
        head_seq = x.seq, head_hash = x.link
    FROM x WHERE accounts.id = x.id
)
SELECT count(*), coalesce(sum(lots), 0), coalesce(sum(total), 0) FROM x
"""


def expire_in_place(
    conn: Connection,
    account_ids: Sequence[int],
    *,
    now: datetime,
    stamp: int,
    kind: str,
    system_account_id: int,
    frozen: bool,
    reason: str,
    actor: str,
) -> tuple[int, int, int]:
    """PostgreSQL: expire (or, with ``frozen``, freeze into ``system_account_id``) every lot
    due at ``now`` of the locked accounts, one posting an account with lots due, in one
    statement; (postings, lots, points). ``stamp`` is ``now`` in microseconds since the
    epoch, as the keys and digests spell it."""
    params = {
        "accounts": list(account_ids), "now": now, "stamp": str(stamp), "kind": kind,
        "system": system_account_id, "frozen": int(frozen), "reason": reason, "actor": actor,
    }  # fmt: skip
    (row,) = execute(conn, _POSTGRESQL_EXPIRE, params, prepare=None)
    return int(row[0]), int(row[1]), int(row[2])


def write_postings(conn: Connection, batch: Sequence[PostingRows]) -> list[int]:
    """Store many postings at once; their ids, in order. An account may take several, in
    the order of ``batch``: each one's chain link and figures follow the one before."""
    if not batch:
        return []
    if conn.dialect.name != "postgresql":
        return [write_posting(conn, rows) for rows in batch]
    for rows in batch:
        if len({lot for lot, _ in rows.allocations}) != len(rows.allocations):
            raise ValueError("a posting changes each lot at most once")
    return _write_many_postgresql(conn, batch)


def write_posting(conn: Connection, rows: PostingRows) -> int:
    """Store the rows; returns the new posting's id."""
    if len({lot for lot, _ in rows.allocations}) != len(rows.allocations):
        raise ValueError("a posting changes each lot at most once")  # the core guarantees it
    if conn.dialect.name == "postgresql":
        written = _write_single_postgresql(conn, rows)
        return written if written is not None else _write_postgresql(conn, rows)
    return _write_sqlite(conn, rows)


_ONE_POSTING = """
WITH p AS (
    INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id,
                          counterparty_id, ref_posting_id, amount, reason, actor, created_at,
                          digest)
    VALUES (%(program_id)b, %(kind)b, %(idempotency_key)b, %(request_hash)b, %(account_id)b,
            %(counterparty_id)b, %(ref_posting_id)b, %(amount)b, %(reason)b, %(actor)b,
            %(created_at)b, %(digest)b)
    RETURNING id
)"""

# The lots a posting takes from (or gives back to) and how much.
_ALLOCATIONS = """, a AS (
    INSERT INTO allocations (posting_id, lot_id, amount)
    SELECT p.id, x.lot_id, x.amount
    FROM p, unnest(%(alloc_lots)s::bigint[], %(alloc_amounts)s::bigint[])
         WITH ORDINALITY AS x(lot_id, amount, n)
    ORDER BY x.n
), lu AS (
    UPDATE lots SET remaining = lots.remaining + x.amount
    FROM unnest(%(alloc_lots)s::bigint[], %(alloc_amounts)s::bigint[]) AS x(lot_id, amount)
    WHERE lots.id = x.lot_id
)"""

_POSTGRESQL_WRITE = (
    _ONE_POSTING  # noqa: S608 (constants only)
    + """, l AS (
    INSERT INTO lines (posting_id, account_id, amount)
    SELECT p.id, x.account_id, x.amount
    FROM p, unnest(%(line_accounts)s::bigint[], %(line_amounts)s::bigint[])
         WITH ORDINALITY AS x(account_id, amount, n)
    ORDER BY x.n
), c AS (
    INSERT INTO chain_entries (account_id, seq, posting_id, chain_hash)
    SELECT x.account_id, x.seq, p.id, x.link
    FROM p, unnest(%(chain_accounts)s::bigint[], %(chain_seqs)s::bigint[],
                   %(chain_links)s::text[]) AS x(account_id, seq, link)
)"""
    + _ALLOCATIONS
    + """, nl AS (
    INSERT INTO lots (account_id, posting_id, amount, remaining, available_at, expires_at,
                      source_lot_id)
    SELECT x.account_id, p.id, x.amount, x.amount, x.available_at, x.expires_at, x.source
    FROM p, unnest(%(lot_accounts)s::bigint[], %(lot_amounts)s::bigint[],
                   %(lot_available)s::timestamptz[], %(lot_expires)s::timestamptz[],
                   %(lot_sources)s::bigint[])
         WITH ORDINALITY AS x(account_id, amount, available_at, expires_at, source, n)
    ORDER BY x.n
), au AS (
    UPDATE accounts
    SET balance = accounts.balance + x.balance, frozen = accounts.frozen + x.frozen,
        debt = accounts.debt + x.debt, head_seq = x.seq, head_hash = x.link
    FROM unnest(%(acc_ids)s::bigint[], %(acc_balance)s::bigint[], %(acc_frozen)s::bigint[],
                %(acc_debt)s::bigint[], %(acc_seq)s::bigint[], %(acc_link)s::text[])
         AS x(id, balance, frozen, debt, seq, link)
    WHERE accounts.id = x.id
)
SELECT id FROM p
"""
)


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


# One member's posting of two lines in a statement of scalar parameters (but for the lots
# it changes): quicker to send than arrays, and planned once where the general statement is
# planned at every call. Most postings are one of the two shapes below.
_SINGLE_HEAD = (
    _ONE_POSTING  # noqa: S608 (constants only)
    + """, l AS (
    INSERT INTO lines (posting_id, account_id, amount)
    SELECT p.id, x.account_id, x.amount
    FROM p, (VALUES (1, %(from_account)b::bigint, %(from_amount)b::bigint),
                    (2, %(to_account)b::bigint, %(to_amount)b::bigint)) AS x(n, account_id, amount)
    ORDER BY x.n
), c AS (
    INSERT INTO chain_entries (account_id, seq, posting_id, chain_hash)
    SELECT %(holder)b, %(seq)b, p.id, %(link)b FROM p
), au AS (
    UPDATE accounts
    SET balance = balance + %(balance)b, debt = debt + %(debt)b, head_seq = %(seq)b,
        head_hash = %(link)b
    WHERE id = %(holder)b
)"""
)

_POSTGRESQL_CREDIT = (
    _SINGLE_HEAD  # noqa: S608 (constants only)
    + """, nl AS (
    INSERT INTO lots (account_id, posting_id, amount, remaining, available_at, expires_at)
    SELECT %(holder)b, p.id, x.amount, x.amount, x.available_at, x.expires_at
    FROM p, (VALUES (%(lot_amount)b::bigint, %(lot_available)b::timestamptz,
                     %(lot_expires)b::timestamptz)) AS x(amount, available_at, expires_at)
    WHERE x.amount IS NOT NULL
)
SELECT id FROM p
"""
)

_POSTGRESQL_LOT_CHANGE = (
    _SINGLE_HEAD
    + _ALLOCATIONS
    + """
SELECT id FROM p
"""
)


def _write_single_postgresql(conn: Connection, rows: PostingRows) -> int | None:
    """Store a posting of one of the two common shapes; ``None`` if it is of neither.

    Both move points between one member and a system account (two lines) and freeze
    nothing. A credit takes no lot and makes at most one of the member's own (an earn);
    a lot change makes none and changes lots the member holds (a spend, or its refund)."""
    if len(rows.lines) != 2 or len(rows.accounts) != 1 or rows.accounts[0][2] != 0:
        return None
    holder, balance, _, debt, seq, link = rows.accounts[0]
    (from_account, from_amount), (to_account, to_amount) = rows.lines
    params = {
        **rows.posting,
        "from_account": from_account, "from_amount": from_amount,
        "to_account": to_account, "to_amount": to_amount,
        "holder": holder, "seq": seq, "link": link, "balance": balance, "debt": debt,
    }  # fmt: skip
    if not rows.allocations and len(rows.new_lots) <= 1:
        owner, amount, available_at, expires_at, source = (
            rows.new_lots[0] if rows.new_lots else (holder, None, None, None, None)
        )
        if owner != holder or source is not None:
            return None
        params.update(lot_amount=amount, lot_available=available_at, lot_expires=expires_at)
        statement = _POSTGRESQL_CREDIT
    elif rows.allocations and not rows.new_lots:
        params["alloc_lots"], params["alloc_amounts"] = _literals(rows.allocations, 2)
        statement = _POSTGRESQL_LOT_CHANGE
    else:
        return None
    cursor = execute(conn, statement, params)
    return int(cursor.fetchone()[0])


def _literals(rows: list[tuple[Any, ...]], width: int) -> list[str]:
    return [array_literal(column) for column in _columns(rows, width)]


def _write_postgresql(conn: Connection, rows: PostingRows) -> int:
    line_accounts, line_amounts = _literals(rows.lines, 2)
    chain_accounts, chain_seqs, chain_links = _literals(rows.chain, 3)
    alloc_lots, alloc_amounts = _literals(rows.allocations, 2)
    lot_accounts, lot_amounts, lot_available, lot_expires, lot_sources = _literals(rows.new_lots, 5)
    acc_ids, acc_balance, acc_frozen, acc_debt, acc_seq, acc_link = _literals(rows.accounts, 6)
    params = {
        **rows.posting,
        "line_accounts": line_accounts,
        "line_amounts": line_amounts,
        "chain_accounts": chain_accounts,
        "chain_seqs": chain_seqs,
        "chain_links": chain_links,
        "alloc_lots": alloc_lots,
        "alloc_amounts": alloc_amounts,
        "lot_accounts": lot_accounts,
        "lot_amounts": lot_amounts,
        "lot_available": lot_available,
        "lot_expires": lot_expires,
        "lot_sources": lot_sources,
        "acc_ids": acc_ids,
        "acc_balance": acc_balance,
        "acc_frozen": acc_frozen,
        "acc_debt": acc_debt,
        "acc_seq": acc_seq,
        "acc_link": acc_link,
    }
    cursor = execute(conn, _POSTGRESQL_WRITE, params)
    return int(cursor.fetchone()[0])


_POSTING_FIELDS = (
    "program_id", "kind", "idempotency_key", "request_hash", "account_id", "counterparty_id",
    "ref_posting_id", "amount", "reason", "actor", "created_at", "digest",
)  # fmt: skip

_POSTGRESQL_WRITE_MANY = """
WITH p AS (
    INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id,
                          counterparty_id, ref_posting_id, amount, reason, actor, created_at,
                          digest)
    SELECT x.program_id, x.kind, x.idempotency_key, x.request_hash, x.account_id,
           x.counterparty_id, x.ref_posting_id, x.amount, x.reason, x.actor, x.created_at,
           x.digest
    FROM unnest(%(program_id)b::bigint[], %(kind)b::text[], %(idempotency_key)b::text[],
                %(request_hash)b::text[], %(account_id)b::bigint[], %(counterparty_id)b::bigint[],
                %(ref_posting_id)b::bigint[], %(amount)b::bigint[], %(reason)b::text[],
                %(actor)b::text[], %(created_at)b::timestamptz[], %(digest)b::text[])
         WITH ORDINALITY AS x(program_id, kind, idempotency_key, request_hash, account_id,
                              counterparty_id, ref_posting_id, amount, reason, actor,
                              created_at, digest, n)
    ORDER BY x.n
    RETURNING id, idempotency_key
), l AS (
    INSERT INTO lines (posting_id, account_id, amount)
    SELECT p.id, y.account_id, y.amount
    FROM unnest(%(line_keys)b::text[], %(line_accounts)b::bigint[], %(line_amounts)b::bigint[])
         WITH ORDINALITY AS y(key, account_id, amount, n)
    JOIN p ON p.idempotency_key = y.key
    ORDER BY y.n
), c AS (
    INSERT INTO chain_entries (account_id, seq, posting_id, chain_hash)
    SELECT y.account_id, y.seq, p.id, y.link
    FROM unnest(%(chain_keys)b::text[], %(chain_accounts)b::bigint[], %(chain_seqs)b::bigint[],
                %(chain_links)b::text[]) AS y(key, account_id, seq, link)
    JOIN p ON p.idempotency_key = y.key
), a AS (
    INSERT INTO allocations (posting_id, lot_id, amount)
    SELECT p.id, y.lot_id, y.amount
    FROM unnest(%(alloc_keys)b::text[], %(alloc_lots)b::bigint[], %(alloc_amounts)b::bigint[])
         WITH ORDINALITY AS y(key, lot_id, amount, n)
    JOIN p ON p.idempotency_key = y.key
    ORDER BY y.n
), lu AS (
    UPDATE lots SET remaining = lots.remaining + y.amount
    FROM unnest(%(lot_change_ids)b::bigint[], %(lot_changes)b::bigint[]) AS y(lot_id, amount)
    WHERE lots.id = y.lot_id
), nl AS (
    INSERT INTO lots (account_id, posting_id, amount, remaining, available_at, expires_at,
                      source_lot_id)
    SELECT y.account_id, p.id, y.amount, y.amount, y.available_at, y.expires_at, y.source
    FROM unnest(%(lot_keys)b::text[], %(lot_accounts)b::bigint[], %(lot_amounts)b::bigint[],
                %(lot_available)b::timestamptz[], %(lot_expires)b::timestamptz[],
                %(lot_sources)b::bigint[])
         WITH ORDINALITY AS y(key, account_id, amount, available_at, expires_at, source, n)
    JOIN p ON p.idempotency_key = y.key
    ORDER BY y.n
), au AS (
    UPDATE accounts
    SET balance = accounts.balance + y.balance, frozen = accounts.frozen + y.frozen,
        debt = accounts.debt + y.debt, head_seq = y.seq, head_hash = y.link
    FROM unnest(%(acc_ids)b::bigint[], %(acc_balance)b::bigint[], %(acc_frozen)b::bigint[],
                %(acc_debt)b::bigint[], %(acc_seq)b::bigint[], %(acc_link)b::text[])
         AS y(id, balance, frozen, debt, seq, link)
    WHERE accounts.id = y.id
)
SELECT id, idempotency_key FROM p
"""


def _write_many_postgresql(conn: Connection, batch: Sequence[PostingRows]) -> list[int]:
    """All the postings in one data-modifying statement; each row finds its posting by the
    posting's idempotency key (unique in a programme)."""
    params: dict[str, list[Any]] = {
        field: [rows.posting[field] for rows in batch] for field in _POSTING_FIELDS
    }

    def keyed(name: str, fields: tuple[str, ...], of: Any) -> None:
        flat = [(rows.posting["idempotency_key"], *item) for rows in batch for item in of(rows)]
        for field, column in zip(("key", *fields), _columns(flat, len(fields) + 1), strict=True):
            params[f"{name}_{field}" if field != "key" else f"{name}_keys"] = column

    keyed("line", ("accounts", "amounts"), lambda r: r.lines)
    keyed("chain", ("accounts", "seqs", "links"), lambda r: r.chain)
    keyed("lot", ("accounts", "amounts", "available", "expires", "sources"), lambda r: r.new_lots)
    # An UPDATE … FROM changes a row once however many source rows match it: what several
    # postings do to one lot or one account is summed first (the last chain head stays).
    changes: dict[int, int] = {}
    for rows in batch:
        for lot, amount in rows.allocations:
            changes[lot] = changes.get(lot, 0) + amount
    keyed("alloc", ("lots", "amounts"), lambda r: r.allocations)
    params["lot_change_ids"], params["lot_changes"] = list(changes), list(changes.values())
    summed: dict[int, tuple[int, int, int, int, str]] = {}
    for rows in batch:
        for account, balance, frozen, debt, seq, link in rows.accounts:
            before = summed.get(account, (0, 0, 0, 0, ""))
            summed[account] = (before[0] + balance, before[1] + frozen, before[2] + debt, seq, link)
    accounts_flat = [(account, *change) for account, change in summed.items()]
    for field, column in zip(
        ("acc_ids", "acc_balance", "acc_frozen", "acc_debt", "acc_seq", "acc_link"),
        _columns(accounts_flat, 6),
        strict=True,
    ):
        params[field] = column
    ids = {key: int(i) for i, key in execute(conn, _POSTGRESQL_WRITE_MANY, params, prepare=None)}
    return [ids[rows.posting["idempotency_key"]] for rows in batch]


# SQLite runs in-process: what a write costs there is the Python around each statement,
# so the rows go straight to the driver (sqlite3 keeps each statement prepared).
_SQLITE_POSTING = """
INSERT INTO postings (program_id, kind, idempotency_key, request_hash, account_id,
                      counterparty_id, ref_posting_id, amount, reason, actor, created_at, digest)
VALUES (:program_id, :kind, :idempotency_key, :request_hash, :account_id, :counterparty_id,
        :ref_posting_id, :amount, :reason, :actor, :created_at, :digest)
"""
_SQLITE_LINE = "INSERT INTO lines (posting_id, account_id, amount) VALUES (?, ?, ?)"
_SQLITE_CHAIN = (
    "INSERT INTO chain_entries (account_id, seq, posting_id, chain_hash) VALUES (?, ?, ?, ?)"
)
_SQLITE_ALLOCATION = "INSERT INTO allocations (posting_id, lot_id, amount) VALUES (?, ?, ?)"
_SQLITE_LOT_CHANGE = "UPDATE lots SET remaining = remaining + ? WHERE id = ?"
_SQLITE_LOT = """
INSERT INTO lots (account_id, posting_id, amount, remaining, available_at, expires_at,
                  source_lot_id)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
_SQLITE_ACCOUNT = """
UPDATE accounts SET balance = balance + ?, frozen = frozen + ?, debt = debt + ?, head_seq = ?,
                    head_hash = ?
WHERE id = ?
"""


def _sqlite_time(moment: datetime | None) -> str | None:
    """A time as SQLAlchemy stores a ``UTCDateTime`` in SQLite: naive UTC text."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: jifen stores only aware UTC times")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _write_sqlite(conn: Connection, rows: PostingRows) -> int:
    sqlite = driver(conn)
    posting = {**rows.posting, "created_at": _sqlite_time(rows.posting["created_at"])}
    posting_id = int(sqlite.execute(_SQLITE_POSTING, posting).lastrowid)
    sqlite.executemany(_SQLITE_LINE, [(posting_id, a, n) for a, n in rows.lines])
    sqlite.executemany(_SQLITE_CHAIN, [(a, seq, posting_id, link) for a, seq, link in rows.chain])
    if rows.allocations:
        sqlite.executemany(
            _SQLITE_ALLOCATION, [(posting_id, lot, n) for lot, n in rows.allocations]
        )
        sqlite.executemany(_SQLITE_LOT_CHANGE, [(n, lot) for lot, n in rows.allocations])
    if rows.new_lots:
        sqlite.executemany(
            _SQLITE_LOT,
            [
                (owner, posting_id, amount, amount, _sqlite_time(available), _sqlite_time(expires),
                 source)
                for owner, amount, available, expires, source in rows.new_lots
            ],
        )  # fmt: skip
    sqlite.executemany(
        _SQLITE_ACCOUNT, [(b, f, d, seq, link, a) for a, b, f, d, seq, link in rows.accounts]
    )
    return posting_id
