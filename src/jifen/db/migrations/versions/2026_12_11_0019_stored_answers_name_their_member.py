"""A stored answer of a write (``idempotency_records``, kept for ``Idempotency-Key``
replays) names the member the write was about (``member_id``, indexed), so that erasing the
member's personal data erases the answers too: a registration's or a profile change's
answer holds the name, email, birthday and reference in clear.

Answers stored before are read once, a chunk at a time, and given the member they show: a
member's profile (its ``id``), a family group (its main account's id; the other members'
references and names in it are replaced, as a family write now stores them), or any answer
naming a ``member_id``. The answers of members already erased (reference ``erased:<id>``)
are then erased as erasure now does: status 410, and a body keeping only the member's id
and the status the write answered. The downgrade drops the column; erased answers stay
erased.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-11 10:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from jifen.db.base import BigId

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_idempotency_records_member"
_CHUNK = 2000
_ERASED = 410
_NOT_STORED = "(not stored: another member's personal data)"

_records = sa.table(
    "idempotency_records",
    sa.column("id", BigId),
    sa.column("status_code", sa.Integer()),
    sa.column("body", sa.JSON()),
    sa.column("member_id", BigId),
)
_members = sa.table("members", sa.column("id", BigId), sa.column("external_ref", sa.String()))


def _member(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _about(body: Any) -> tuple[int | None, Any]:
    """The member a stored answer is about, and the body to keep (a family group's other
    members' references and names replaced)."""
    if not isinstance(body, dict):
        return None, body
    if {"id", "program_id", "external_ref", "name", "tags"} <= body.keys():
        return _member(body["id"]), body  # a member's profile
    if "main_member_id" in body and isinstance(body.get("members"), list):
        main = _member(body["main_member_id"])
        kept = [
            entry
            if not isinstance(entry, dict) or entry.get("member_id") == main
            else {**entry, "external_ref": _NOT_STORED, "name": _NOT_STORED}
            for entry in body["members"]
        ]
        return main, {**body, "members": kept}
    if {"member_id", "state", "erased", "erased_at"} == body.keys():
        return None, body  # an erasure's answer: nothing personal, replayed after others
    return _member(body.get("member_id")), body


def upgrade() -> None:
    with op.batch_alter_table("idempotency_records") as batch:
        batch.add_column(
            sa.Column(
                "member_id", BigId, nullable=True,
                comment="the member the write was about, whose erasure erases this answer",
            )
        )  # fmt: skip
        batch.create_index(_INDEX, ["member_id"])
    conn = op.get_bind()
    after = 0
    while True:
        rows = conn.execute(
            sa.select(_records.c.id, _records.c.body)
            .where(_records.c.id > after)
            .order_by(_records.c.id)
            .limit(_CHUNK)
        ).all()
        if not rows:
            break
        after = rows[-1].id
        found = []
        for row in rows:
            member, body = _about(row.body)
            if member is not None:
                found.append({"record": row.id, "member": member, "kept": body})
        if found:
            conn.execute(
                sa.update(_records)
                .where(_records.c.id == sa.bindparam("record"))
                .values(member_id=sa.bindparam("member"), body=sa.bindparam("kept")),
                found,
            )
    erased = sa.select(_members.c.id).where(
        _members.c.external_ref == sa.literal("erased:") + sa.cast(_members.c.id, sa.String)
    )
    held = sa.and_(_records.c.member_id.in_(erased), _records.c.status_code != _ERASED)
    pairs = conn.execute(
        sa.select(_records.c.member_id, _records.c.status_code).where(held).distinct()
    ).all()
    for member, status in pairs:
        conn.execute(
            sa.update(_records)
            .where(_records.c.member_id == member, _records.c.status_code == status)
            .values(status_code=_ERASED, body={"erased_member_id": member, "status_code": status})
        )


def downgrade() -> None:
    with op.batch_alter_table("idempotency_records") as batch:
        batch.drop_index(_INDEX)
        batch.drop_column("member_id")
