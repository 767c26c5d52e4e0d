"""What a member's state changes in earning: an inviter that is frozen, banned or closed gets
nothing from a referral (the invitee still earns, and why is kept); a refund takes back what
its order earned from a frozen or banned member, through every door; an order paid wholly in
points earns nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jifen.db.uow import Database
from jifen.errors import InvalidInput, StateConflict
from jifen.events.schemas import EventIn
from jifen.events.stream import Applied, Incoming, action_for, apply_batch
from jifen.members import service as members
from jifen.rules import core
from tests.events.test_service import activate, balance, lines, send
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


@pytest.mark.parametrize("state", ["frozen", "banned"])
def test_a_refund_takes_points_back_from_a_frozen_or_banned_member(
    db: Database, state: str
) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    now = db.clock.now()
    for order_id in ("O1", "O2"):
        send(db, program.id, member, "order.paid", now, order_id, order_id=order_id,
             lines=lines(("A", "x", 100)))  # fmt: skip
    db.run(
        lambda uow: members.change_state(uow, program_id=program.id, member_id=member, state=state)
    )
    later = now + timedelta(minutes=1)
    refund = send(db, program.id, member, "order.refunded", later, "O1-back", order_id="O1",
                  whole=True)  # fmt: skip
    assert refund.points == -100
    # Through the JetStream door too: applied, not dead-lettered.
    event = EventIn(
        source="pos", external_id="O2-back", type="order.refunded", occurred_at=later,
        member_id=member, payload={"order_id": "O2", "whole": True},
    )  # fmt: skip
    (outcome,) = db.run(lambda uow: apply_batch(uow, [Incoming(program.code, event)]))
    assert isinstance(outcome, Applied) and action_for(outcome).value == "ack"
    assert balance(db, member).balance == 0
    assert_ledger_sound(db, program.id)


def test_a_refund_of_an_order_of_a_closed_member_takes_nothing_more(db: Database) -> None:
    # given a member that earned from an order, then closed: the closing forfeited its points
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    now = db.clock.now()
    send(db, program.id, member, "order.paid", now, "O1", order_id="O1",
         lines=lines(("A", "x", 100)))  # fmt: skip
    db.run(
        lambda uow: members.change_state(
            uow, program_id=program.id, member_id=member, state="closed"
        )
    )
    closed = balance(db, member)
    assert (closed.balance, closed.debt) == (0, 0)
    # when its order is refunded, the refund is refused: the points it would take back were
    # settled at closing, and a closed account takes on no debt
    later = now + timedelta(minutes=1)
    with pytest.raises(StateConflict, match=f"Member {member} is closed") as refused:
        send(db, program.id, member, "order.refunded", later, "O1-back", order_id="O1",
             whole=True)  # fmt: skip
    assert "已注销" in refused.value.message("zh")
    after = balance(db, member)
    assert (after.balance, after.debt) == (0, 0)
    assert_ledger_sound(db, program.id)


def test_an_order_paid_wholly_in_points_earns_nothing_and_its_whole_refund_takes_back_all(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    activate(db, program.id, "pickup", {"kind": "fixed", "points": 50})
    activate(db, program.id, "first", {"kind": "first_of_kind", "points": 100})
    now = db.clock.now()
    in_points = [{"sku": "A", "category": "x", "amount_fen": 9900, "paid_with_points": True}]
    sent = send(db, program.id, member, "order.paid", now, "P1", order_id="P1", lines=in_points)
    assert sent.points == 0 and not sent.awards
    assert {s["why"] for s in sent.skipped} == {"paid wholly with points: earns nothing"}
    # An order stored before, when such orders still earned: its whole refund takes back all.
    monkeypatch.setattr(core, "_eligible_fen", lambda event: 1)
    earned = send(db, program.id, member, "order.paid", now, "P2", order_id="P2", lines=in_points)
    assert earned.points == 50  # (the first order was P1)
    monkeypatch.undo()
    later = now + timedelta(minutes=1)
    for order_id, back in (("P1", 0), ("P2", -50)):
        refund = send(db, program.id, member, "order.refunded", later, f"{order_id}-back",
                      order_id=order_id, whole=True)  # fmt: skip
        assert refund.points == back
    with pytest.raises(InvalidInput, match="nothing left to refund"):
        send(db, program.id, member, "order.refunded", later, "P2-again", order_id="P2",
             whole=True)  # fmt: skip
    assert balance(db, member).balance == 0
    assert_ledger_sound(db, program.id)
