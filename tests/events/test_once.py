"""Events that pay once for what they happen to: a registration and a completed profile once
per member, a referral once per invited member, a review
posted or featured once, a quiz or an activity once per member, a check-in once a day, a
review's likes once per rule when its threshold is first crossed; and subjects of different
event types that look alike do not clash."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from jifen import crypto
from jifen.clock import ManualClock
from jifen.db.uow import Database
from jifen.errors import InvalidInput
from jifen.events import service
from jifen.events.schemas import EventIn
from jifen.members import service as members
from jifen.members.schemas import MemberUpdate
from tests.events.test_service import activate, balance, lines, send
from tests.factories import assert_ledger_sound, new_members, new_program

FIXED = {"kind": "fixed", "points": 10}


def test_a_member_is_referred_once_whoever_sends_it(db: Database) -> None:
    program = new_program(db)
    inviter, invitee, other = new_members(db, program.id, 3)
    activate(
        db, program.id, "invite",
        {"kind": "referral", "inviter_points": 200, "invitee_points": 100},
        events_=("referral.completed",),
    )  # fmt: skip
    now = db.clock.now()
    send(db, program.id, invitee, "referral.completed", now, "r1", inviter_member_id=inviter)
    for external_id, by in (("r2", inviter), ("r3", other)):
        with pytest.raises(InvalidInput, match=r"referral of this member.*pos:r1") as err:
            send(db, program.id, invitee, "referral.completed", now, external_id,
                 inviter_member_id=by)  # fmt: skip
        assert err.value.params["field"] == "member_id"
    # The invitee inviting its inviter back: the inviter's own referral, once.
    send(db, program.id, inviter, "referral.completed", now, "r4", inviter_member_id=invitee)
    with pytest.raises(InvalidInput):
        send(db, program.id, inviter, "referral.completed", now, "r5", inviter_member_id=invitee)
    # The first one sent again under its own id answers what it produced.
    again = send(
        db, program.id, invitee, "referral.completed", now, "r1", inviter_member_id=inviter
    )
    assert again.replayed and again.points == 300
    assert [balance(db, m).balance for m in (inviter, invitee, other)] == [300, 300, 0]
    assert_ledger_sound(db, program.id)


@pytest.mark.parametrize(
    ("kind", "payload", "other", "field"),
    [
        ("review.posted", {"review_id": "R1"}, {"review_id": "R2"}, "payload.review_id"),
        ("review.featured", {"review_id": "R1"}, {"review_id": "R2"}, "payload.review_id"),
        (
            "quiz.answered",
            {"quiz_id": "Q1", "correct_answers": 3},
            {"quiz_id": "Q2", "correct_answers": 3},
            "payload.quiz_id",
        ),
        (
            "activity.attended",
            {"activity_id": "A1", "hours": 2},
            {"activity_id": "A2", "hours": 2},
            "payload.activity_id",
        ),
    ],
)
def test_content_events_pay_once_per_subject(
    db: Database, kind: str, payload: dict[str, Any], other: dict[str, Any], field: str
) -> None:
    program = new_program(db)
    member, second = new_members(db, program.id, 2)
    activate(db, program.id, "content", FIXED, events_=(kind,))
    now = db.clock.now()
    assert send(db, program.id, member, kind, now, "e1", **payload).points == 10
    with pytest.raises(InvalidInput, match="already sent as event pos:e1") as err:
        send(db, program.id, member, kind, now, "e2", **payload)
    assert err.value.params["field"] == field
    assert send(db, program.id, member, kind, now, "e3", **other).points == 10
    if kind in ("quiz.answered", "activity.attended"):  # once per member: others answer too
        assert send(db, program.id, second, kind, now, "e4", **payload).points == 10
    assert balance(db, member).balance == 20


@pytest.mark.parametrize("kind", ["member.registered", "member.profile_completed"])
def test_a_registration_and_a_completed_profile_pay_once_per_member(
    db: Database, kind: str
) -> None:
    """注册送 100: the registration sent again under another id (a resend by a system that
    numbers its events anew) is refused as sent twice, not paid again."""
    program = new_program(db)
    member, second = new_members(db, program.id, 2)
    activate(db, program.id, "welcome", FIXED, events_=(kind,))
    now = db.clock.now()
    assert send(db, program.id, member, kind, now, "g1").points == 10
    with pytest.raises(InvalidInput, match="already sent as event pos:g1") as err:
        send(db, program.id, member, kind, now + timedelta(days=3), "g2")
    assert err.value.params["field"] == "member_id"
    assert send(db, program.id, member, kind, now, "g1").replayed  # its own id: a replay
    assert send(db, program.id, second, kind, now, "g3").points == 10
    assert [balance(db, m).balance for m in (member, second)] == [10, 10]


def test_a_check_in_counts_once_a_programme_day(db: Database) -> None:
    program = new_program(db)  # Asia/Shanghai: the day turns at 16:00 UTC
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "check-in", FIXED, events_=("member.checked_in",))
    assert isinstance(db.clock, ManualClock)
    morning = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    assert send(db, program.id, member, "member.checked_in", morning, "c1").points == 10
    with pytest.raises(InvalidInput, match=r"the member's check-in of 2026-03-02") as err:
        send(db, program.id, member, "member.checked_in", morning + timedelta(hours=14), "c2")
    assert err.value.params["field"] == "occurred_at"
    next_day = morning + timedelta(hours=15)  # 16:00 UTC: midnight in Shanghai
    assert send(db, program.id, member, "member.checked_in", next_day, "c3").points == 10


def test_a_repeat_in_a_batch_refuses_only_itself(db: Database) -> None:
    program = new_program(db)
    member, other = new_members(db, program.id, 2)
    activate(db, program.id, "posted", FIXED, events_=("review.posted",))
    now = db.clock.now()

    def review(external_id: str, who: int, review_id: str) -> EventIn:
        return EventIn(
            source="app", external_id=external_id, type="review.posted", occurred_at=now,
            member_id=who, payload={"review_id": review_id},
        )  # fmt: skip

    batch = [review("a", member, "R1"), review("b", member, "R1"), review("c", other, "R2")]
    outcomes = db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=batch))
    assert [getattr(o, "points", None) for o in outcomes] == [10, None, 10]
    assert isinstance(outcomes[1], InvalidInput) and "app:a" in str(outcomes[1])


def test_likes_pay_when_the_threshold_is_first_crossed_once_per_review(db: Database) -> None:
    program = new_program(db)
    member, other = new_members(db, program.id, 2)
    activate(
        db, program.id, "liked-20", {"kind": "fixed", "points": 50},
        events_=("review.liked",), condition="event.likes >= 20",
    )  # fmt: skip
    activate(
        db, program.id, "liked-100", {"kind": "fixed", "points": 300},
        events_=("review.liked",), condition="event.likes >= 100",
    )  # fmt: skip
    now = db.clock.now()
    paid = [
        send(db, program.id, member, "review.liked", now, f"like-{n}", review_id="R1",
             likes=n).points
        for n in (5, 19, 20, 21, 25, 100, 120)
    ]  # fmt: skip
    assert paid == [0, 0, 50, 0, 0, 300, 0]
    again = send(db, program.id, member, "review.liked", now, "like-30", review_id="R1", likes=30)
    assert {"rule": "liked-20", "why": "already awarded for this subject"} in again.skipped
    # Another review crosses on its own; within one batch as well.
    batch = [
        EventIn(
            source="app", external_id=f"b{n}", type="review.liked", occurred_at=now,
            member_id=other, payload={"review_id": "R2", "likes": n},
        )
        for n in (20, 22, 23)
    ]  # fmt: skip
    outcomes = db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=batch))
    assert [getattr(o, "points", None) for o in outcomes] == [50, 0, 0]
    assert (balance(db, member).balance, balance(db, other).balance) == (350, 50)


def test_an_order_id_like_a_birthday_does_not_clash_with_it(db: Database) -> None:
    program = new_program(db)
    first, second = new_members(db, program.id, 2)
    for member in (first, second):
        db.run(
            lambda uow, m=member: members.update_profile(
                uow, program_id=program.id, member_id=m,
                body=MemberUpdate(birthday=date(1990, 6, 2)),
            )
        )  # fmt: skip
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    activate(
        db, program.id, "gift", {"kind": "birthday_gift", "by_tier": {}, "default": 200},
        events_=("member.birthday",),
    )  # fmt: skip
    assert isinstance(db.clock, ManualClock)
    db.clock.set(datetime(2026, 6, 2, 9, 0, tzinfo=UTC))
    now = db.clock.now()
    order = send(db, program.id, first, "order.paid", now, "o1",
                 order_id=f"{second}:2026", lines=lines(("A", "x", 20)))  # fmt: skip
    assert order.points == 20
    # A source sent the first member's birthday already: the job does not stop at it.
    send(db, program.id, first, "member.birthday", now, "crm-b", year=2026)
    assert service.raise_birthdays(db, program_id=program.id, day=date(2026, 6, 2)) == 1
    assert (balance(db, first).balance, balance(db, second).balance) == (220, 200)
    assert_ledger_sound(db, program.id)


def test_a_clash_the_reading_missed_refuses_that_event_alone(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the once-only index find a subject taken that was not seen taken (a
    transaction that committed meanwhile), the event is refused naming its twin; the
    others of its batch go in."""
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(db, program.id, "base", {"kind": "spend_rate", "rate": "1"})
    now = db.clock.now()
    send(db, program.id, member, "order.paid", now, "o1", order_id="X", lines=lines(("A", "x", 5)))
    monkeypatch.setattr(service._Intake, "_read_taken", lambda self, items: None)

    def order(external_id: str, order_id: str) -> EventIn:
        return EventIn(
            source="pos", external_id=external_id, type="order.paid", occurred_at=now,
            member_id=member, payload={"order_id": order_id, "lines": lines(("A", "x", 5))},
        )  # fmt: skip

    batch = [order("o2", "X"), order("o3", "Y")]
    outcomes = db.run(lambda uow: service.ingest_many(uow, program_id=program.id, events=batch))
    assert isinstance(outcomes[0], InvalidInput)
    assert "order 'X' was already sent as event pos:o1" in str(outcomes[0])
    assert getattr(outcomes[1], "points", None) == 5
    assert balance(db, member).balance == 10


def test_the_check_in_surprise_draws_once_a_day_under_the_installations_key(
    db: Database,
) -> None:
    program = new_program(db)
    (member,) = new_members(db, program.id, 1)
    activate(
        db, program.id, "surprise", {"kind": "random", "probability": "1", "minimum": 50,
                                     "maximum": 200},
        events_=("member.checked_in",),
    )  # fmt: skip
    now = db.clock.now()
    sent = send(db, program.id, member, "member.checked_in", now, "c1")
    (award,) = sent.awards
    keyed = hmac.new(crypto.draw_key(), b"pos:c1|surprise|1", hashlib.sha256).hexdigest()
    assert award.detail["seed"] == keyed
    with pytest.raises(InvalidInput, match="check-in"):
        send(db, program.id, member, "member.checked_in", now, "c2")
    assert balance(db, member).balance == award.points
