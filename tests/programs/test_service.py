"""The programme's row lock: who holds it decides on the programme's values as they are now."""

from __future__ import annotations

import uuid

import pytest

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import InvalidInput
from jifen.programs import service as programs
from jifen.rules import service as rules
from jifen.rules.schemas import ProgramCaps
from tests.factories import new_program


def test_after_the_programme_lock_its_settings_and_caps_are_read_afresh(pg: Database) -> None:
    # Given a transaction that has read the programme's settings and caps ...
    program = new_program(pg)
    seen: dict[str, object] = {}

    def decide(uow: UnitOfWork) -> None:
        seen["window before"] = programs.get_settings(uow, program_id=program.id).return_window_days
        seen["budget before"] = rules.get_caps(uow, program_id=program.id).budget

        # ... when another one changes both and commits meanwhile ...
        def change(other: UnitOfWork) -> None:
            settings = programs.get_settings(other, program_id=program.id)
            programs.set_settings(
                other, program_id=program.id,
                settings=settings.model_copy(update={"return_window_days": 30}),
            )  # fmt: skip
            rules.set_caps(other, program_id=program.id, caps=ProgramCaps(budget=5_000))

        pg.run(change)
        # ... then once it holds the programme, it reads what is there now.
        programs.lock_program(uow, program_id=program.id)
        seen["window after"] = programs.get_settings(uow, program_id=program.id).return_window_days
        seen["budget after"] = rules.get_caps(uow, program_id=program.id).budget

    pg.run(decide)
    assert seen["window before"] != 30
    assert seen["budget before"] is None
    assert seen["window after"] == 30
    assert seen["budget after"] == 5_000


@pytest.mark.parametrize("zone", ["localtime", "posixrules"])
def test_a_programme_is_given_only_an_iana_time_zone_never_the_servers_own(
    db: Database, zone: str
) -> None:
    """``localtime`` is whatever zone the machine serving it is set to: a programme's
    calendar days would move with the server. Such a name is refused as no IANA zone."""
    with pytest.raises(InvalidInput) as refused:
        db.run(lambda uow: programs.create_program(uow, code=f"tz-{uuid.uuid4().hex[:8]}",
                                                   name="x", time_zone=zone))  # fmt: skip
    assert refused.value.params["field"] == "time_zone"
