"""Family groups and closed accounts: a closed member joins no group and heads none (a
main account that closes dissolves its group); a member of a group may still close and
leave it."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from jifen.db.uow import Database
from jifen.errors import StateConflict
from jifen.members import service as members
from jifen.programs.schemas import ProgramRead
from tests.factories import new_members, new_program


def _close(db: Database, program_id: int, member_id: int) -> None:
    db.run(
        lambda uow: members.change_state(
            uow, program_id=program_id, member_id=member_id, state="closed", actor="t"
        )
    )


@pytest.mark.parametrize("closed", ["main", "member"])
def test_a_closed_member_is_linked_to_no_family_group(db: Database, closed: str) -> None:
    # Given a main account and a member, one of them closed ...
    program = new_program(db)
    main, member = new_members(db, program.id, 2)
    _close(db, program.id, main if closed == "main" else member)

    # When staff link them, then it is refused, naming the closed one, and nothing changed.
    with pytest.raises(StateConflict) as refused:
        db.run(
            lambda uow: members.link_family(
                uow, program_id=program.id, main_id=main, member_id=member
            )
        )
    named = main if closed == "main" else member
    assert f"Member {named} is closed" in str(refused.value)
    assert "已注销" in refused.value.message("zh")
    for someone in (main, member):
        group = db.run(
            lambda uow, m=someone: members.family(
                uow, program_id=program.id, member_id=m, balances=False
            )
        )
        assert group.main_member_id is None


def _group_of_three(db: Database) -> tuple[ProgramRead, tuple[int, int, int]]:
    """A programme and a family group of a main account and two members, in that order."""
    program = new_program(db)
    main, kid, gran = new_members(db, program.id, 3)
    for member in (kid, gran):
        db.run(
            lambda uow, m=member: members.link_family(
                uow, program_id=program.id, main_id=main, member_id=m
            )
        )
    return program, (main, kid, gran)


def test_a_member_of_a_group_closes_and_leaves_it(db: Database) -> None:
    # Given a group of three ...
    program, (main, kid, gran) = _group_of_three(db)

    # When the kid closes its account, then it may still leave the group, and the others
    # stay together.
    _close(db, program.id, kid)
    db.run(lambda uow: members.leave_family(uow, program_id=program.id, member_id=kid))
    group = db.run(
        lambda uow: members.family(uow, program_id=program.id, member_id=main, balances=False)
    )
    assert [m.member_id for m in group.members] == [main, gran]


def test_a_main_account_that_closes_heads_its_group_no_more(db: Database) -> None:
    # Given a group of three ...
    program, (main, kid, gran) = _group_of_three(db)

    # When its main account closes, then the group is dissolved: no one is in it ...
    _close(db, program.id, main)
    for someone in (main, kid, gran):
        group = db.run(
            lambda uow, m=someone: members.family(
                uow, program_id=program.id, member_id=m, balances=False
            )
        )
        assert (group.main_member_id, group.members) == (None, [])
    # ... and its members may form another without leaving first.
    regrouped = db.run(
        lambda uow: members.link_family(uow, program_id=program.id, main_id=gran, member_id=kid)
    )
    assert [m.member_id for m in regrouped.members] == [gran, kid]


def test_a_member_added_to_a_group_meanwhile_heads_no_group_of_its_own(
    pg: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given members A, B and C, and staff adding C to B's group (B heading none yet) ...
    program = new_program(pg)
    a, b, c = new_members(pg, program.id, 3)
    read = members._row
    joining: list[int] = []

    def read_then_join(uow: members.UnitOfWork, program_id: int, member_id: int) -> object:
        row = read(uow, program_id, member_id)
        if member_id == b and not joining:
            # ... while, after B was read, other staff add B to A's group and commit
            joining.append(b)
            pg.run(
                lambda other: members.link_family(
                    other, program_id=program.id, main_id=a, member_id=b, balances=False
                )
            )
        return row

    monkeypatch.setattr(members, "_row", read_then_join)

    # When the first addition goes on, then it is refused, as B now belongs to A's group ...
    with pytest.raises(StateConflict) as refused:
        pg.run(
            lambda uow: members.link_family(
                uow, program_id=program.id, main_id=b, member_id=c, balances=False
            )
        )
    assert f"Member {b} belongs to another member's family group" in str(refused.value)
    monkeypatch.undo()

    # ... and A's group still holds B, while C is in none.
    group = pg.run(
        lambda uow: members.family(uow, program_id=program.id, member_id=a, balances=False)
    )
    assert [m.member_id for m in group.members] == [a, b]
    alone = pg.run(
        lambda uow: members.family(uow, program_id=program.id, member_id=c, balances=False)
    )
    assert alone.main_member_id is None


def test_the_last_member_leaving_while_another_joins_leaves_the_group_standing(
    pg: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a group of A and B, and staff adding C to it, not committed yet ...
    program = new_program(pg)
    a, b, c = new_members(pg, program.id, 3)
    pg.run(lambda uow: members.link_family(uow, program_id=program.id, main_id=a, member_id=b))
    answer = members.family
    added, go_on = threading.Event(), threading.Event()

    def held_before_commit(uow: members.UnitOfWork, **given: object) -> object:
        added.set()
        assert go_on.wait(10)
        return answer(uow, **given)  # type: ignore[arg-type]

    monkeypatch.setattr(members, "family", held_before_commit)
    adding = threading.Thread(
        target=lambda: pg.run(
            lambda uow: members.link_family(uow, program_id=program.id, main_id=a, member_id=c)
        )
    )
    adding.start()
    assert added.wait(10)

    # When B leaves meanwhile (and waits on the addition), and the addition then commits
    leaving = threading.Thread(
        target=lambda: pg.run(
            lambda uow: members.leave_family(uow, program_id=program.id, member_id=b)
        )
    )
    leaving.start()
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database() AND query LIKE '%members%'"
    )
    deadline = time.monotonic() + 10
    while not pg.run(lambda uow: uow.conn.execute(waiting).scalar_one(), read_only=True):
        assert time.monotonic() < deadline, "the leaving did not wait on the addition"
        time.sleep(0.01)
    go_on.set()
    adding.join(10)
    leaving.join(10)
    monkeypatch.undo()

    # Then A still heads a group, of A and C.
    group = pg.run(
        lambda uow: members.family(uow, program_id=program.id, member_id=c, balances=False)
    )
    assert group.main_member_id == a
    assert [m.member_id for m in group.members] == [a, c]
