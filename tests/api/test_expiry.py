"""Points frozen when they lapsed, given back over HTTP by staff allowed to unfreeze."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient

from jifen.db.uow import Database, UnitOfWork
from jifen.expiry import service as expiry
from jifen.expiry.schemas import ExpiryPolicy, Validity
from jifen.jobs import service as jobs
from jifen.points import service as points
from jifen.programs import service as programs
from jifen.programs.schemas import ProgramRead
from tests.api import support
from tests.factories import assert_ledger_sound, new_members, new_program


def _frozen_at_expiry(db: Database) -> tuple[ProgramRead, int]:
    """A programme that freezes lapsed points, and a member whose 300 points the expiry run
    froze 40 days after earning them (valid 30)."""
    program = new_program(db)
    (alice,) = new_members(db, program.id, 1)

    def setup(uow: UnitOfWork) -> None:
        settings = programs.get_settings(uow, program_id=program.id)
        policy = ExpiryPolicy(validity=Validity(kind="rolling", days=30), on_expiry="freeze")
        programs.set_settings(uow, program_id=program.id,
                              settings=settings.model_copy(update={"expiry": policy}))  # fmt: skip
        expires_at = expiry.lot_expiry(uow, program_id=program.id, start=uow.clock.now())
        points.earn(uow, member_id=alice, amount=300, key="e1", expires_at=expires_at)

    db.run(setup)
    db.clock.advance(timedelta(days=40))  # type: ignore[attr-defined]
    assert jobs.run(db, "points.expire", program_id=program.id).figures["points"] == 300
    return program, alice


def test_staff_restore_points_frozen_at_expiry_once_and_a_member_may_not(
    client: TestClient, db: Database
) -> None:
    program, alice = _frozen_at_expiry(db)
    url = f"/v1/programs/{program.code}/members/{alice}/points/restore-expired"
    operator = support.staff(db, "operator", program_id=program.id)
    as_member = client.post(url, json={"reason": "please"},
                            headers={**support.member(db, alice), **support.key()})  # fmt: skip
    assert as_member.status_code == 403
    missing = client.post(url, json={}, headers={**operator, **support.key()})
    assert missing.status_code == 422
    mall = support.staff(db, "operator", program_id=program.id, merchant="mall")
    by_merchant = client.post(url, json={"reason": "goodwill"}, headers={**mall, **support.key()})
    assert by_merchant.status_code == 403 and "programme's own" in by_merchant.json()["detail"]
    held = db.run(lambda uow: points.balance(uow, member_id=alice), read_only=True)
    assert (held.available, held.frozen) == (0, 300)  # nothing was given back
    headers = {**operator, **support.key()}
    answer = client.post(url, json={"reason": "goodwill"}, headers=headers)
    assert answer.status_code == 201, answer.text
    assert answer.json()["points"] == 300
    assert [p["kind"] for p in answer.json()["postings"]] == ["unfreeze"]
    again = client.post(url, json={"reason": "goodwill"}, headers=headers)  # the same key
    assert again.json() == answer.json()
    nothing = client.post(url, json={"reason": "goodwill"}, headers={**operator, **support.key()})
    assert nothing.status_code == 201 and nothing.json()["points"] == 0
    summary = db.run(lambda uow: points.balance(uow, member_id=alice), read_only=True)
    assert (summary.available, summary.frozen) == (300, 0)
    assert_ledger_sound(db, program.id)


def test_points_frozen_at_expiry_are_not_unfrozen_onto_their_lapsed_lots(
    client: TestClient, db: Database
) -> None:
    """Unfreezing a freeze the expiry run made would put the points back on lots past their
    date, where the member could not use them: it is refused, and says how to give them
    back (restore-expired), which still works after."""
    program, alice = _frozen_at_expiry(db)
    ((freeze_id, _, _),) = db.run(lambda uow: points.open_freezes(uow, member_id=alice))
    operator = {**support.staff(db, "operator", program_id=program.id)}
    refused = client.post(
        f"/v1/programs/{program.code}/postings/{freeze_id}/unfreeze", json={"amount": 100},
        headers={**operator, **support.key()},
    )  # fmt: skip
    assert refused.status_code == 409, refused.text
    assert "restore-expired" in refused.json()["detail"]
    held = db.run(lambda uow: points.balance(uow, member_id=alice), read_only=True)
    assert (held.overdue, held.frozen) == (0, 300)  # nothing was given back
    restored = client.post(
        f"/v1/programs/{program.code}/members/{alice}/points/restore-expired",
        json={"reason": "goodwill"}, headers={**operator, **support.key()},
    )  # fmt: skip
    assert restored.status_code == 201 and restored.json()["points"] == 300
    assert restored.json()["debt_paid"] == 0
    summary = db.run(lambda uow: points.balance(uow, member_id=alice), read_only=True)
    assert (summary.available, summary.frozen) == (300, 0)
    assert_ledger_sound(db, program.id)
