"""What a member's state changes in earning: an inviter that is frozen, banned or closed gets
nothing from a referral (the invitee still earns, and why is kept)."""

from __future__ import annotations

import pytest

from jifen.db.uow import Database
from jifen.members import service as members
from tests.events.test_service import activate, balance, send
from tests.factories import assert_ledger_sound, new_members, new_program


@pytest.mark.parametrize("state", ["frozen", "banned", "closed"])
def test_an_inviter_that_is_not_active_gets_nothing(db: Database, state: str) -> None:
    program = new_program(db)
    inviter, invitee = new_members(db, program.id, 2)
    activate(
        db, program.id, "invite",
        {"kind": "referral", "inviter_points": 200, "invitee_points": 100},
        events_=("referral.completed",),
    )  # fmt: skip
    db.run(
        lambda uow: members.change_state(uow, program_id=program.id, member_id=inviter, state=state)
    )
    sent = send(db, program.id, invitee, "referral.completed", db.clock.now(), "r1",
                inviter_member_id=inviter)  # fmt: skip
    assert sent.points == 100 and [a.member_id for a in sent.awards] == [invitee]
    assert sent.skipped == [
        {"rule": "invite", "why": f"the inviter {inviter} is {state}: its side earns nothing"}
    ]
    assert (balance(db, inviter).balance, balance(db, invitee).balance) == (0, 100)
    assert_ledger_sound(db, program.id)
