"""Audit use cases: record a write in the caller's transaction; search and export; verify
the chains."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Integer,
    LargeBinary,
    Row,
    Text,
    and_,
    bindparam,
    cast,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import ColumnClause

from jifen.audit.core import (
    CHAINED_FIELDS,
    GENESIS,
    ChainVerifier,
    Checkpoint,
    Problem,
    StoredEntry,
    chained_fields,
    checkpoint_problems,
    digest_parts,
    entry_digest,
    seal_root,
    stripe_of,
)
from jifen.audit.models import STRIPES, audit_checkpoints, audit_entries, audit_heads
from jifen.audit.schemas import AuditEntryCreate, AuditEntryRead
from jifen.db.engine import READ_ONLY
from jifen.db.prepared import Prepared
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import InvalidInput

__all__ = [
    "CHAINED_FIELDS",
    "CSV_COLUMNS",
    "AuditFilter",
    "AuditReport",
    "Problem",
    "csv_chunks",
    "entry_values",
    "record",
    "roles_text",
    "search",
    "snapshot",
    "verify",
    "verify_report",
    "with_entry",
]

_CHUNK = 2000
"""Entries read at a time by verify and export: memory stays flat however long the log."""


_ENTRY_COLUMNS = (*CHAINED_FIELDS, "stripe", "seq", "at", "prev_hash", "hash")
# Built once, values bound at each call: a statement holding its values would be hashed
# anew for SQLAlchemy's compiled cache on every entry.
_HEAD = select(audit_heads.c.seq, audit_heads.c.hash).where(
    audit_heads.c.stripe == bindparam("stripe")
)
_MOVE_HEAD = (
    audit_heads.update()
    .where(audit_heads.c.stripe == bindparam("head_stripe"))
    .values(seq=bindparam("head_seq"), hash=bindparam("head_hash"))
)
# Parameters named apart from the columns: an UPDATE given a parameter named after one of
# its table's columns would set that column too.
_ENTRY_VALUES = {
    name: bindparam(f"e_{name}", type_=audit_entries.c[name].type) for name in _ENTRY_COLUMNS
}
_APPEND = audit_entries.insert().values(_ENTRY_VALUES).returning(audit_entries.c.id)


def _append_linked() -> Insert:
    """PostgreSQL: the entry appended to its stripe's chain in one round trip. The statement
    locks the head, hashes the pieces of :func:`digest_parts` around the head's hash and
    next position, moves the head and inserts the entry; a concurrent append waits for the
    lock and then reads the head as that one left it."""
    old = (
        select(audit_heads.c.seq, audit_heads.c.hash)
        .where(audit_heads.c.stripe == bindparam("stripe"))
        .with_for_update()
        .cte("old")
    )
    seq = old.c.seq + 1
    utf8: ColumnClause[Any] = literal_column("'UTF8'")
    digest = func.encode(
        func.sha256(
            bindparam("before", type_=LargeBinary)
            .op("||")(func.convert_to(old.c.hash, utf8))
            .op("||")(bindparam("between", type_=LargeBinary))
            .op("||")(func.convert_to(cast(seq, Text), utf8))
            .op("||")(bindparam("after", type_=LargeBinary))
        ),
        literal_column("'hex'"),
    )
    new = select(seq.label("seq"), old.c.hash.label("prev_hash"), digest.label("hash")).cte("new")
    moved = (
        audit_heads.update()
        .where(audit_heads.c.stripe == bindparam("stripe"))
        .values(seq=new.c.seq, hash=new.c.hash)
        .cte("moved")
    )
    given = [_ENTRY_VALUES[name] for name in (*CHAINED_FIELDS, "at")]
    columns = [*CHAINED_FIELDS, "at", "stripe", "seq", "prev_hash", "hash"]
    stripe = bindparam("stripe", type_=Integer)
    rows = select(*given, stripe, new.c.seq, new.c.prev_hash, new.c.hash)
    insert = audit_entries.insert().from_select(columns, rows)
    return insert.returning(audit_entries.c.id).add_cte(moved)


_APPEND_LINKED_STATEMENT = _append_linked()
_APPEND_LINKED = Prepared(_APPEND_LINKED_STATEMENT)


def with_entry(statement: Insert) -> Insert:
    """PostgreSQL: ``statement`` that also appends an audit entry, in the same round trip:
    it takes the values of :func:`entry_values` besides its own (none of theirs share a
    name with an ``e_`` value or ``stripe``, ``before``, ``between`` or ``after``). For the
    write that ends a request: its stored answer and its audit entry, sent together."""
    return statement.add_cte(_APPEND_LINKED_STATEMENT.cte("audit_entry"))


def entry_values(uow: UnitOfWork, entry: AuditEntryCreate) -> dict[str, Any]:
    """PostgreSQL: the values that append ``entry`` to its stripe's chain (see
    :func:`with_entry`)."""
    # Microseconds are kept by both backends; the digest covers the stored value exactly.
    at = uow.clock.now().astimezone(UTC)
    fields = chained_fields(entry.model_dump(include=set(CHAINED_FIELDS)))
    before, between, after = (part.encode() for part in digest_parts(at, fields))
    values: dict[str, Any] = {f"e_{name}": value for name, value in fields.items()}
    values.update(
        e_at=at, stripe=stripe_of(entry.target, STRIPES), before=before, between=between,
        after=after,
    )  # fmt: skip
    return values


_ROLE_LENGTH = 200
"""The length of the ``role`` column."""


def roles_text(roles: Iterable[str]) -> str:
    """The roles an actor held, as an entry's ``role`` records them: comma-separated, as
    many whole ones as the column keeps, then "…" when more were held."""
    names = list(roles)
    text = ",".join(names)
    if len(text) <= _ROLE_LENGTH:
        return text
    kept = ""
    for name in names:
        longer = f"{kept},{name}" if kept else name
        if len(longer) + 2 > _ROLE_LENGTH:  # room for ",…"
            break
        kept = longer
    return f"{kept},…" if kept else names[0][: _ROLE_LENGTH - 1] + "…"


def record(uow: UnitOfWork, entry: AuditEntryCreate) -> int:
    """Append ``entry`` to its stripe's chain, in the caller's transaction; returns its id."""
    if uow.dialect == "postgresql":
        ((entry_id,),) = _APPEND_LINKED.rows(uow.conn, entry_values(uow, entry))
        return int(entry_id)
    stripe = stripe_of(entry.target, STRIPES)
    at = uow.clock.now().astimezone(UTC)
    fields = chained_fields(entry.model_dump(include=set(CHAINED_FIELDS)))
    seq, prev_hash = uow.conn.execute(_HEAD, {"stripe": stripe}).one()
    seq += 1
    digest = entry_digest(prev_hash, seq, at, fields)
    entry_row = {**fields, "stripe": stripe, "seq": seq, "at": at, "prev_hash": prev_hash,
                 "hash": digest}  # fmt: skip
    entry_id = uow.conn.execute(_APPEND, {f"e_{k}": v for k, v in entry_row.items()}).scalar_one()
    uow.conn.execute(_MOVE_HEAD, {"head_stripe": stripe, "head_seq": seq, "head_hash": digest})
    return int(entry_id)


# --------------------------------------------------------------------------- search


@dataclass(frozen=True)
class AuditFilter:
    """Which entries to list. ``programs``: the programmes whose entries may be shown; None
    means every entry, including those outside any programme (staff, roles)."""

    programs: Collection[int] | None = None
    actor: str | None = None
    action: str | None = None
    target: str | None = None
    since: datetime | None = None
    """Inclusive."""
    until: datetime | None = None
    """Exclusive."""


EntryPage = tuple[list[AuditEntryRead], str | None]
"""A page of entries and the cursor of the next one (None after the last)."""


def search(
    uow: UnitOfWork, filters: AuditFilter, *, cursor: str | None = None, limit: int = 50
) -> EntryPage:
    """Entries matching ``filters``, newest first, and the cursor of the next page (if any)."""
    if not 1 <= limit <= 5000:
        raise InvalidInput(
            field="limit",
            problem=f"must be between 1 and 5000, got {limit}",
            problem_zh=f"须在 1 到 5000 之间,收到的是 {limit}",
        )
    entries = audit_entries.c
    conditions: list[Any] = []
    if filters.programs is not None:
        conditions.append(entries.program_id.in_(sorted(filters.programs)))
    for column, value in (
        (entries.actor, filters.actor),
        (entries.action, filters.action),
        (entries.target, filters.target),
    ):
        if value is not None:
            conditions.append(column == value)
    if filters.since is not None:
        conditions.append(entries.at >= filters.since)
    if filters.until is not None:
        conditions.append(entries.at < filters.until)
    if cursor is not None:
        conditions.append(entries.id < decode_cursor(cursor))
    rows = uow.conn.execute(
        select(audit_entries).where(*conditions).order_by(entries.id.desc()).limit(limit + 1)
    ).all()
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1].id) if len(rows) > limit and page else None
    return [AuditEntryRead.model_validate(row._mapping) for row in page], next_cursor


def _encode_cursor(entry_id: int) -> str:
    return base64.urlsafe_b64encode(f"audit:{entry_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The id a page continues below, from a ``next_cursor``; InvalidInput for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, value = text.split(":")
        number = int(value)
        if prefix != "audit" or not value.isdigit() or not 0 < number < 2**63:
            raise ValueError(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(
            field="cursor",
            problem="not a cursor this API gave out; start again without one",
            problem_zh="不是本 API 给出的游标;请不带游标重新开始",
        ) from exc
    return number


# --------------------------------------------------------------------------- export

CSV_COLUMNS = (
    "id", "at", "program_id", "actor", "role", "api_key_id", "ip", "user_agent", "action",
    "target", "before", "after", "stripe", "seq", "prev_hash", "hash",
)  # fmt: skip

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""What a spreadsheet may read as the start of a formula (CSV injection)."""


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False, sort_keys=True)
    elif isinstance(value, datetime):
        value = value.astimezone(UTC).isoformat()
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value  # shown as text, never run as a formula
    return value


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue()


def csv_chunks(db: Database, filters: AuditFilter, *, chunk: int = 500) -> Iterator[str]:
    """The entries matching ``filters`` as CSV text, newest first, a page at a time (each
    read in its own short transaction): a UTF-8 BOM, so that Excel reads Chinese right, a
    header row, then one row per entry, with ``before`` and ``after`` as JSON text."""
    yield "\ufeff" + _csv_text([list(CSV_COLUMNS)])
    cursor: str | None = None

    def page_after(after: str | None) -> Callable[[UnitOfWork], EntryPage]:
        return lambda uow: search(uow, filters, cursor=after, limit=chunk)

    while True:
        page, cursor = db.run(page_after(cursor), read_only=True)
        if page:
            rows = [[_cell(getattr(entry, name)) for name in CSV_COLUMNS] for entry in page]
            yield _csv_text(rows)
        if cursor is None:
            return


# --------------------------------------------------------------------------- verify


@dataclass
class AuditReport:
    """What :func:`verify_report` checked and found."""

    entries: int = 0
    chains: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@contextmanager
def snapshot(db: Database) -> Iterator[UnitOfWork]:
    """A read-only unit of work that sees the whole log at one moment, however long it takes
    to read: REPEATABLE READ on PostgreSQL (a deferred transaction on SQLite is one
    already). Verify in one, so that writers appending meanwhile cannot look like damage."""
    with db.engine.connect() as conn:
        options: dict[str, Any] = {READ_ONLY: True}
        if db.dialect == "postgresql":
            options["isolation_level"] = "REPEATABLE READ"
        conn = conn.execution_options(**options)
        with conn.begin():
            yield UnitOfWork(conn, db.clock, db.cache)


def _stored_entries(uow: UnitOfWork) -> Iterator[Row[Any]]:
    """Every entry in stripe and seq order, read a chunk at a time."""
    c = audit_entries.c
    last: tuple[int, int] | None = None
    while True:
        query = select(audit_entries).order_by(c.stripe, c.seq).limit(_CHUNK)
        if last is not None:
            query = query.where(or_(c.stripe > last[0], and_(c.stripe == last[0], c.seq > last[1])))
        chunk = uow.conn.execute(query).all()
        yield from chunk
        if len(chunk) < _CHUNK:
            return
        last = (chunk[-1].stripe, chunk[-1].seq)


def verify_report(uow: UnitOfWork, *, kept_root: str | None = None) -> AuditReport:
    """Recompute every entry's hash, follow each stripe's chain link by link and compare its
    end with its head in ``audit_heads``; check every checkpoint, and that ``kept_root`` (a
    root printed by :func:`checkpoint` and kept outside the database) is one of theirs. Run
    it in a :func:`snapshot` when others write."""
    checker = ChainVerifier(STRIPES)
    for row in _stored_entries(uow):
        checker.add(
            StoredEntry(
                id=row.id,
                stripe=row.stripe,
                seq=row.seq,
                at=row.at,
                fields={name: row._mapping[name] for name in CHAINED_FIELDS},
                prev_hash=row.prev_hash,
                hash=row.hash,
            )
        )
    stored_heads = uow.conn.execute(
        select(audit_heads.c.stripe, audit_heads.c.seq, audit_heads.c.hash)
    )
    heads = {row.stripe: (row.seq, row.hash) for row in stored_heads}
    problems = checker.finish(heads)
    sealed = _checkpoints(uow)
    problems += checkpoint_problems(sealed, _sealed_hashes(uow, sealed), kept_root)
    return AuditReport(
        entries=checker.entries, chains=checker.chains, checkpoints=len(sealed),
        problems=problems,
    )  # fmt: skip


def checkpoint(uow: UnitOfWork) -> tuple[int, str]:
    """Seal every stripe's head under one root, chained to the previous checkpoint; the
    checkpoint's id and root, which its keeper writes down outside the database. Taken under
    the heads' locks, so that no entry is recorded in between."""
    rows = uow.conn.execute(
        select(audit_heads.c.stripe, audit_heads.c.seq, audit_heads.c.hash)
        .order_by(audit_heads.c.stripe)
        .with_for_update()
    ).all()
    heads = {row.stripe: (int(row.seq), row.hash) for row in rows}
    previous = uow.conn.execute(
        select(audit_checkpoints.c.root_hash).order_by(audit_checkpoints.c.id.desc()).limit(1)
    ).scalar_one_or_none()
    previous = previous or GENESIS
    root = seal_root(previous, heads)
    checkpoint_id = uow.conn.execute(
        audit_checkpoints.insert().returning(audit_checkpoints.c.id),
        {
            "at": uow.clock.now(), "previous_root": previous, "root_hash": root,
            "heads": {str(stripe): [seq, head] for stripe, (seq, head) in heads.items()},
        },
    ).scalar_one()  # fmt: skip
    return int(checkpoint_id), root


def _checkpoints(uow: UnitOfWork) -> list[Checkpoint]:
    rows = uow.conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.id)).all()
    return [
        Checkpoint(
            id=row.id, previous_root=row.previous_root, root_hash=row.root_hash,
            heads={int(stripe): (int(seq), str(head)) for stripe, (seq, head) in row.heads.items()},
        )
        for row in rows
    ]  # fmt: skip


def _sealed_hashes(uow: UnitOfWork, sealed: list[Checkpoint]) -> dict[tuple[int, int], str]:
    """The stored hash of each entry a checkpoint sealed, read a stripe at a time."""
    wanted: dict[int, set[int]] = {}
    for checkpoint in sealed:
        for stripe, (seq, _) in checkpoint.heads.items():
            if seq:
                wanted.setdefault(stripe, set()).add(seq)
    found: dict[tuple[int, int], str] = {}
    c = audit_entries.c
    for stripe, seqs in sorted(wanted.items()):
        rows = uow.conn.execute(
            select(c.seq, c.hash).where(c.stripe == stripe, c.seq.in_(sorted(seqs)))
        )
        found.update(((stripe, int(seq)), digest) for seq, digest in rows)
    return found


def verify(uow: UnitOfWork) -> list[Problem]:
    """Every problem in the audit log: an entry edited (its hash no longer matches its
    fields), removed or inserted (a gap or a broken link in its chain), or a head that is not
    its chain's last entry. Empty when the log is as it was written."""
    return verify_report(uow).problems
