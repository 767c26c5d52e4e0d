"""The rules live at a moment, found by the moments where a version starts or ends, are
the ones whose periods hold it (start inclusive, end exclusive), for any periods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from jifen.rules.core import Rule
from jifen.rules.schemas import RuleSpec
from jifen.rules.service import Timeline, compile_rule

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def rule(n: int) -> Rule:
    spec = RuleSpec.model_validate(
        {
            "code": f"r{n}",
            "name": f"rule {n}",
            "event_types": ["order.paid"],
            "params": {"kind": "fixed", "points": n + 1},
            "priority": n % 3,
        }
    )
    return compile_rule(spec)


hours = st.integers(min_value=0, max_value=40)
periods = st.lists(
    st.tuples(hours, st.one_of(st.none(), st.integers(min_value=1, max_value=20))),
    max_size=8,
)


@given(periods=periods, moments=st.lists(hours, min_size=1, max_size=12))
def test_the_live_rules_are_those_whose_periods_hold_the_moment(
    periods: list[tuple[int, int | None]], moments: list[int]
) -> None:
    made = [
        (
            rule(n),
            EPOCH + timedelta(hours=start),
            None if length is None else EPOCH + timedelta(hours=start + length),
        )
        for n, (start, length) in enumerate(periods)
    ]
    timeline = Timeline(made)
    # Moments on the bounds themselves, and between them, in any order, asked twice.
    for hour in [*moments, *moments]:
        moment = EPOCH + timedelta(hours=hour)
        expected = sorted(
            (r for r, start, end in made if start <= moment and (end is None or moment < end)),
            key=lambda r: (r.spec.priority, r.spec.code),
        )
        found = timeline.at(moment)
        assert [r.spec.code for r in found.rules] == [r.spec.code for r in expected]
        assert [r.spec.code for r in found.by_type.get("order.paid", [])] == [
            r.spec.code for r in expected
        ]
