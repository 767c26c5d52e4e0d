"""The tiers a rule condition compares the member's tier with, read from the checked syntax
tree, whatever the form of the comparison or of the string literal."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from jifen.errors import InvalidInput
from jifen.rules import conditions
from jifen.rules.conditions import tiers_compared


@pytest.mark.parametrize(
    ("condition", "tiers"),
    [
        ('member.tier == "金卡"', ("金卡",)),
        ('"钻石" == member.tier', ("钻石",)),
        ('member.tier != "gold"', ("gold",)),
        ('member.tier in ["金卡", "钻石"]', ("金卡", "钻石")),
        ('"金卡" in [member.tier]', ("金卡",)),
        ("member['tier'] == '银卡'", ("银卡",)),
        ('event.amount_fen > 100 && (member.tier == "a" || !(member.tier in ["b", "a"]))',
         ("a", "b")),
        ('(member.tier == "a" ? 2 : 1) > 1 && {"k": member.tier == "m"}["k"]', ("a", "m")),
        ('member.tags.exists(t, t == "vip") && member.tier == r"raw"', ("raw",)),
        ('member.tier == "\\u91d1\\u5361" || member.tier == """三"""', ("金卡", "三")),
        ('member.tier in {"金卡": true, "钻石": true}', ("金卡", "钻石")),
        ('{"金卡": 2, "银卡": 1}[member.tier] > 1', ("金卡", "银卡")),
        ('{"a": {"b": 1}[member.tier]}["a"] == 1', ("b",)),
        # no tier is the empty string: a member without one is compared with nothing
        ('has(member.tier) && member.tier != ""', ()),
        # not the member's tier, or not a literal
        ('event.tier == "x" && member.region == "y" && event.member.tier == "z"', ()),
        ('member.tier == "金" + "卡" || member.tier.startsWith("金")', ()),
        ('member.tier == event.tier || member.tier in event.tiers', ()),
        # a literal a macro goes over, comparing each element with the member's tier
        ('["金卡", "钻石"].exists(t, t == member.tier)', ("金卡", "钻石")),
        ('["a", "b"].all(t, member.tier != t) && ["c"].exists_one(x, member.tier == x)',
         ("a", "b", "c")),
        ('{"金卡": 1}.exists(k, k == member.tier)', ("金卡",)),
        ('size(["a", "b"].filter(t, t == member.tier)) > 0', ("a", "b")),
        ('"金卡" in {member.tier: true}', ("金卡",)),
        # going over a literal without comparing its elements with the tier names none
        ('["a"].exists(t, t == event.tier) && [1, 2].all(n, n > 0)', ()),
        # an inner macro's own variable of the same name is the inner one's
        ('["a"].exists(t, ["x"].exists(t, t == member.tier))', ("x",)),
        # a comprehension's own variable named member is not the member
        ('[{"tier": "a"}].exists(member, member.tier == "b") || member.tier == "c"', ("c",)),
    ],
)  # fmt: skip
def test_the_tiers_a_condition_compares_the_members_tier_with(
    condition: str, tiers: tuple[str, ...]
) -> None:
    assert tiers_compared(condition) == tiers


def test_a_condition_that_does_not_compile_is_refused_as_before() -> None:
    with pytest.raises(InvalidInput) as caught:
        tiers_compared('member.tier == "金卡" &&')
    assert caught.value.params["field"] == "condition"


def test_a_tree_that_cannot_be_read_names_no_tier_and_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The check helps; it must never be what refuses a rule or a change of the tiers."""

    def unreadable(data: bytes) -> Any:
        raise IndexError("index out of range")

    monkeypatch.setattr(conditions, "_node", unreadable)
    condition = 'member.tier == "金卡" && event.amount_fen > 99'
    tiers_compared.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="jifen.rules"):
            assert tiers_compared(condition) == ()
    finally:
        tiers_compared.cache_clear()
    assert "cannot be read" in caplog.text and "event.amount_fen > 99" in caplog.text
