"""Moving encrypted fields (and the keyed hashes beside them) to the current secret key.

After ``JIFEN_SECRET_KEY`` is replaced, with the old key listed in
``JIFEN_PREVIOUS_SECRET_KEYS``, everything stored under the old key is still read; ``jifen
keys rekey`` then goes through each table holding such fields (the command names them,
each an :class:`Encrypted`) chunk by chunk and encrypts and hashes anew what is still
under a previous key, so that the old key can be retired. Rows already moved are left as
they are: a run stopped part way is simply run again.

What is kept only as a keyed digest of something jifen does not store cannot be moved:
API key secrets, session tokens and one-time codes, and the fingerprints of events and of
the requests behind the API's stored answers (digests of the bodies sent). Those are
recognised under an old key while it stays listed; retiring it makes the API keys and
sessions made under it unknown, and an event or request sent again a conflict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, or_, select

from jifen import crypto
from jifen.db.uow import UnitOfWork


@dataclass(frozen=True)
class Encrypted:
    """A table's encrypted columns, each with the column of its keyed hash (if any)."""

    table: Table
    columns: Mapping[str, str | None]
    """Encrypted column → the column holding the keyed hash of its plain text, or None."""


@dataclass(frozen=True)
class Rekeyed:
    """What a chunk of :func:`rekey` found (and, unless a dry run, moved)."""

    rows: int
    """Rows read: those holding at least one of the fields."""
    moved: int
    """Those of them with a field still under a previous key."""
    last_id: int | None


def rekey(
    uow: UnitOfWork, fields: Encrypted, *, after_id: int, limit: int, dry_run: bool = False
) -> Rekeyed:
    """The next ``limit`` rows of ``fields.table`` after id ``after_id`` that hold any of its
    encrypted fields: each field encrypted under a previous key is encrypted anew under the
    current one, and each keyed hash recomputed where it differs. The rows are locked while
    they change; ``dry_run`` counts them and changes nothing. Raises ValueError if a field
    cannot be read with any of the keys (a key missing from ``JIFEN_PREVIOUS_SECRET_KEYS``)."""
    table, names = fields.table, list(fields.columns)
    hashes = [h for h in fields.columns.values() if h is not None]
    query = (
        select(table.c.id, *(table.c[n] for n in names), *(table.c[h] for h in hashes))
        .where(table.c.id > after_id, or_(*(table.c[n].is_not(None) for n in names)))
        .order_by(table.c.id)
        .limit(limit)
    )
    rows = uow.conn.execute(query if dry_run else query.with_for_update()).mappings().all()
    moved = 0
    for row in rows:
        values: dict[str, Any] = {}
        for name, hash_column in fields.columns.items():
            token = row[name]
            if token is None:
                continue
            if not crypto.under_current_key(token):
                values[name] = crypto.reencrypt(token)
            if hash_column is not None:
                digest = crypto.keyed_hash(crypto.decrypt(token))
                if row[hash_column] != digest:
                    values[hash_column] = digest
        if values:
            moved += 1
            if not dry_run:
                uow.conn.execute(table.update().where(table.c.id == row["id"]).values(values))
    return Rekeyed(len(rows), moved, rows[-1]["id"] if rows else None)
