"""A tier code named in the expiry or redemption policy, an earning rule, the caps or a
reward must be one of the programme's tiers: a typo ("gold" for 金卡, "金 卡") would be
stored and then match no member. Refused when saved, naming the code, where it was found
and the programme's tiers; a rule pack is checked against the tiers it brings."""

from __future__ import annotations

from typing import Any

import pytest

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import TierNotDefined
from jifen.expiry.schemas import ExpiryPolicy
from jifen.programs import service as programs
from jifen.rewards import service as rewards
from jifen.rewards.schemas import RedemptionPolicy, RewardCreate
from jifen.rules import service as rules
from jifen.rules.schemas import ProgramCaps, RulePack, RuleSpec
from jifen.tiers import service as tiers
from jifen.tiers.models import tiers as tier_rows
from jifen.tiers.schemas import TierDef
from tests.factories import new_program

TIERS = [TierDef(code="普通", name="普通", rank=0), TierDef(code="金卡", name="金卡", rank=1)]


def with_tiers(db: Database) -> int:
    program = new_program(db)
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program.id, definitions=TIERS))
    return program.id


def refused(db: Database, write: Any) -> TierNotDefined:
    with pytest.raises(TierNotDefined) as caught:
        db.run(write)
    return caught.value


def settings_with(uow: UnitOfWork, program_id: int, **policies: Any) -> None:
    settings = programs.get_settings(uow, program_id=program_id)
    programs.set_settings(uow, program_id=program_id,
                          settings=settings.model_copy(update=policies))  # fmt: skip


def test_the_expiry_and_redemption_policies_name_only_the_programmes_tiers(
    db: Database,
) -> None:
    program_id = with_tiers(db)
    typo = ExpiryPolicy.model_validate({"by_tier": {"金卡": {"kind": "never"},
                                                    "gold": {"kind": "never"}}})  # fmt: skip
    error = refused(db, lambda uow: settings_with(uow, program_id, expiry=typo))
    assert error.code == "tier_not_defined" and error.params["field"] == "expiry.by_tier"
    assert error.message() == (
        "expiry.by_tier: 'gold' is not a tier of this programme, so it would apply to no "
        "member; its tiers are 普通, 金卡. Name one of them, or define the tier first."
    )
    assert "'gold' 不是本计划的等级" in error.message("zh") and "普通、金卡" in error.message("zh")
    terms = RedemptionPolicy.model_validate({"tiers": {"金 卡": {"discount_pct": 90}}})
    error = refused(db, lambda uow: settings_with(uow, program_id, redemption=terms))
    assert (error.params["field"], error.params["tier"]) == ("redemption.tiers", "金 卡")
    # the programme's own codes are taken, and nothing refused was stored
    good = ExpiryPolicy.model_validate({"by_tier": {"金卡": {"kind": "never"}}})
    db.run(lambda uow: settings_with(uow, program_id, expiry=good))
    stored = db.run(lambda uow: programs.get_settings(uow, program_id=program_id))
    assert list(stored.expiry.by_tier) == ["金卡"] and stored.redemption.tiers == {}


def test_a_code_already_stored_does_not_hold_up_another_change(db: Database) -> None:
    """A policy naming a tier removed before removing a named tier was refused (stored so
    by an earlier release): a change of something else still saves (as a tier scheme left
    as it is is not checked again); a new unknown code does not."""
    program_id = with_tiers(db)
    named = ExpiryPolicy.model_validate({"by_tier": {"金卡": {"kind": "never"}}})
    db.run(lambda uow: settings_with(uow, program_id, expiry=named))
    db.run(lambda uow: uow.conn.execute(
        tier_rows.update().where(tier_rows.c.program_id == program_id, tier_rows.c.code == "金卡")
        .values(code="钻石", name="钻石")))  # fmt: skip
    db.run(lambda uow: settings_with(uow, program_id, transfers_enabled=False))
    more = ExpiryPolicy.model_validate({"by_tier": {"金卡": {"kind": "never"},
                                                    "银卡": {"kind": "never"}}})  # fmt: skip
    error = refused(db, lambda uow: settings_with(uow, program_id, expiry=more))
    assert error.params["tier"] == "银卡" and error.params["known"] == "普通, 钻石"


def test_a_programme_without_tiers_has_none_to_name(db: Database) -> None:
    program = new_program(db)
    caps = ProgramCaps.model_validate({"by_tier": {"金卡": {"day": 100}}})
    error = refused(db, lambda uow: rules.set_caps(uow, program_id=program.id, caps=caps))
    assert error.params["known"] == "(none defined yet)"
    assert "(尚未定义任何等级)" in error.message("zh")
    # a policy naming no tier saves as before
    db.run(lambda uow: settings_with(uow, program.id, transfers_enabled=False))


def rule(params: dict[str, Any], code: str = "tiered") -> RuleSpec:
    return RuleSpec.model_validate({"code": code, "name": code, "event_types": ["order.paid"]
                                    if params["kind"] != "birthday_gift"
                                    else ["member.birthday"], "params": params})  # fmt: skip


def test_a_rules_factor_or_gift_by_tier_names_only_the_programmes_tiers(db: Database) -> None:
    program_id = with_tiers(db)
    for params in ({"kind": "multiplier", "by_tier": {"金卡": "1.5", "gold": "2"}},
                   {"kind": "birthday_gift", "by_tier": {"gold": 500}}):  # fmt: skip
        error = refused(db, lambda uow, p=params: rules.create_version(
            uow, program_id=program_id, spec=rule(p), created_by="maker"))  # fmt: skip
        assert (error.params["field"], error.params["tier"]) == ("params.by_tier", "gold")
    draft = db.run(lambda uow: rules.create_version(
        uow, program_id=program_id, spec=rule({"kind": "birthday_gift", "by_tier": {"金卡": 500}}),
        created_by="maker"))  # fmt: skip
    error = refused(db, lambda uow: rules.update_draft(
        uow, program_id=program_id, version_id=draft.id,
        spec=rule({"kind": "birthday_gift", "by_tier": {"金 卡": 500}})))  # fmt: skip
    assert error.params["tier"] == "金 卡"
    # a tier removed while the rule is a draft (a draft does not hold it): submitting it is
    # refused
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=TIERS[:1]))
    error = refused(db, lambda uow: rules.submit(
        uow, program_id=program_id, version_id=draft.id, approval_id=None))  # fmt: skip
    assert error.params["tier"] == "金卡" and error.params["known"] == "普通"
    # and, tiers changed past this check (by an earlier release), approving it
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=TIERS))
    db.run(lambda uow: rules.submit(uow, program_id=program_id, version_id=draft.id,
                                    approval_id=None))  # fmt: skip
    db.run(lambda uow: uow.conn.execute(tier_rows.delete().where(
        tier_rows.c.program_id == program_id, tier_rows.c.code == "金卡")))  # fmt: skip
    error = refused(db, lambda uow: rules.approve(
        uow, program_id=program_id, version_id=draft.id, approved_by="checker"))  # fmt: skip
    assert error.params["tier"] == "金卡" and error.params["known"] == "普通"


def test_the_caps_name_only_the_programmes_tiers(db: Database) -> None:
    program_id = with_tiers(db)
    caps = ProgramCaps.model_validate({"by_tier": {"普通": {"day": 100}, "Gold": {"day": 200}}})
    error = refused(db, lambda uow: rules.set_caps(uow, program_id=program_id, caps=caps))
    assert (error.params["field"], error.params["tier"]) == ("by_tier", "Gold")
    assert db.run(lambda uow: rules.get_caps(uow, program_id=program_id)).by_tier == {}


def pack(tiers_: list[str], named: str) -> RulePack:
    return RulePack.model_validate({
        "tiers": [{"code": c, "name": c, "rank": n} for n, c in enumerate(tiers_)],
        "caps": {"by_tier": {named: {"day": 1000}}},
        "rules": [
            {"code": "base", "name": "base", "event_types": ["order.paid"],
             "params": {"kind": "spend_rate", "rate": "1"}},
            {"code": "tier", "name": "tier", "event_types": ["order.paid"],
             "params": {"kind": "multiplier", "by_tier": {named: "1.5"}}},
        ],
    })  # fmt: skip


def load(db: Database, program_id: int, pack_: RulePack) -> None:
    db.run(lambda uow: rules.load_pack(uow, program_id=program_id, pack=pack_, actor="installer",
                                       activate=True))  # fmt: skip


def test_a_rule_pack_is_checked_against_the_tiers_it_brings(db: Database) -> None:
    """A pack bringing its tiers loads into a programme with none yet (its rules and caps
    name the tiers it defines); a pack naming one it does not bring is refused before
    anything is written, naming the rule."""
    program = new_program(db)
    with pytest.raises(TierNotDefined) as caught:
        load(db, program.id, pack(["普通", "白金"], "金卡"))
    assert caught.value.params["field"] == "rules.tier.params.by_tier"
    assert caught.value.params["known"] == "普通, 白金"
    assert db.run(lambda uow: tiers.list_tiers(uow, program_id=program.id)) == []
    assert db.run(lambda uow: rules.list_versions(uow, program_id=program.id, limit=10)) == []
    load(db, program.id, pack(["普通", "金卡"], "金卡"))
    assert [t.code for t in db.run(lambda uow: tiers.list_tiers(uow, program_id=program.id))] == [
        "普通", "金卡"]  # fmt: skip
    # a pack without tiers of its own is checked against the programme's
    with pytest.raises(TierNotDefined) as caught:
        load(db, program.id, RulePack.model_validate(
            {**pack([], "钻石").model_dump(mode="json"), "tiers": []}))  # fmt: skip
    assert caught.value.params["known"] == "普通, 金卡"


def test_a_reward_names_only_the_programmes_tiers(db: Database) -> None:
    program_id = with_tiers(db)
    base = {"code": "mug", "kind": "physical", "name": {"zh": "杯子"}, "points": 100}
    for fields, where in (({"visible_tiers": ["金卡", "gold"]}, "visible_tiers"),
                          ({"early_access": {"gold": 24}, "sales_start": "2030-01-01T00:00:00Z"},
                           "early_access")):  # fmt: skip
        body = RewardCreate.model_validate({**base, **fields})
        error = refused(db, lambda uow, b=body: rewards.create_reward(
            uow, program_id=program_id, body=b))  # fmt: skip
        assert (error.params["field"], error.params["tier"]) == (where, "gold")


def test_a_condition_compares_the_members_tier_only_with_the_programmes_tiers(
    db: Database,
) -> None:
    """``member.tier == "金 卡"`` would never hold (``!=`` always): refused like a factor by
    tier, naming the condition and the tier, whichever form the comparison takes."""
    program_id = with_tiers(db)
    fixed = {"kind": "fixed", "points": 5}
    for condition, tier in (('member.tier == "gold"', "gold"),
                            ('"金 卡" != member.tier', "金 卡"),
                            ('event.amount_fen > 100 && member.tier in ["金卡", "钻石"]', "钻石"),
                            ("member['tier'] == 'Gold'", "Gold")):  # fmt: skip
        error = refused(db, lambda uow, c=condition: rules.create_version(
            uow, program_id=program_id, spec=rule(fixed).model_copy(update={"condition": c}),
            created_by="maker"))  # fmt: skip
        assert (error.params["field"], error.params["tier"]) == ("condition", tier)
        assert error.message().startswith(f"condition: {tier!r} is not a tier of this programme")
    # the programme's tiers, and "" (no tier), are taken
    good = rule(fixed).model_copy(update={"condition": 'member.tier in ["金卡", ""]'})
    draft = db.run(lambda uow: rules.create_version(uow, program_id=program_id, spec=good,
                                                    created_by="maker"))  # fmt: skip
    error = refused(db, lambda uow: rules.update_draft(
        uow, program_id=program_id, version_id=draft.id,
        spec=good.model_copy(update={"condition": 'member.tier == "钻石"'})))  # fmt: skip
    assert (error.params["field"], error.params["tier"]) == ("condition", "钻石")
    # a tier removed while it is a draft: submitting it is refused
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=TIERS[:1]))
    error = refused(db, lambda uow: rules.submit(
        uow, program_id=program_id, version_id=draft.id, approval_id=None))  # fmt: skip
    assert (error.params["field"], error.params["tier"]) == ("condition", "金卡")


def test_a_rule_packs_conditions_are_checked_against_the_tiers_it_brings(db: Database) -> None:
    program = new_program(db)
    bad = pack(["普通", "金卡"], "金卡")
    vip = bad.rules[0].model_copy(update={"condition": 'member.tier == "钻石"'})
    with pytest.raises(TierNotDefined) as caught:
        load(db, program.id, bad.model_copy(update={"rules": [vip, *bad.rules[1:]]}))
    assert caught.value.params["field"] == "rules.base.condition"
    assert caught.value.params["known"] == "普通, 金卡"
    assert db.run(lambda uow: tiers.list_tiers(uow, program_id=program.id)) == []
