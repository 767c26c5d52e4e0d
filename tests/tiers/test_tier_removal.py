"""A tier cannot be removed while something stored still names it — a rule version that is
or may go live (its factors or gifts by tier, its condition), the earning caps, the
programme's policy, the benefits matrix, a reward not retired — for it would then silently
apply to no member. Refused naming what names it and how to change that; renaming a tier,
removing one nothing names, and removing one only drafts, retired rules or retired rewards
name stay allowed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import StateConflict
from jifen.expiry.schemas import ExpiryPolicy
from jifen.programs import service as programs
from jifen.rewards import service as rewards
from jifen.rewards.schemas import RedemptionPolicy, RewardCreate
from jifen.rules import service as rules
from jifen.rules.schemas import ProgramCaps, RulePack, RuleSpec, RuleVersionRead
from jifen.tiers import service as tiers
from jifen.tiers.schemas import TierDef
from tests.factories import new_program
from tests.tiers.scheme import scheme

TIERS = [TierDef(code="普通", name="普通", rank=0), TierDef(code="金卡", name="金卡", rank=1)]
WITHOUT_GOLD = TIERS[:1]


def with_tiers(db: Database) -> int:
    program = new_program(db)
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program.id, definitions=TIERS))
    return program.id


def codes(db: Database, program_id: int) -> list[str]:
    return [t.code for t in db.run(lambda uow: tiers.list_tiers(uow, program_id=program_id))]


def remove_gold(db: Database, program_id: int) -> None:
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=WITHOUT_GOLD))


def refused(db: Database, program_id: int) -> StateConflict:
    """Removing 金卡 is refused, and the tiers are as they were."""
    with pytest.raises(StateConflict) as caught:
        remove_gold(db, program_id)
    assert codes(db, program_id) == ["普通", "金卡"]
    return caught.value


def spec(code: str, params: dict[str, Any], condition: str | None = None) -> RuleSpec:
    events = ["member.birthday"] if params["kind"] == "birthday_gift" else ["order.paid"]
    body = {"code": code, "name": code, "event_types": events, "params": params}
    return RuleSpec.model_validate({**body, "condition": condition} if condition else body)


MULTIPLIER = {"kind": "multiplier", "by_tier": {"金卡": "1.5"}}


def draft(db: Database, program_id: int, rule: RuleSpec) -> RuleVersionRead:
    return db.run(lambda uow: rules.create_version(uow, program_id=program_id, spec=rule,
                                                   created_by="maker"))  # fmt: skip


def submitted(db: Database, program_id: int, rule: RuleSpec) -> RuleVersionRead:
    version = draft(db, program_id, rule)
    return db.run(lambda uow: rules.submit(uow, program_id=program_id, version_id=version.id,
                                           approval_id=None))  # fmt: skip


def live(db: Database, program_id: int, rule: RuleSpec, after: timedelta | None = None) -> int:
    """The id of a version of ``rule`` approved to go live now, or ``after`` from now."""
    version = submitted(db, program_id, rule)
    db.run(lambda uow: rules.approve(
        uow, program_id=program_id, version_id=version.id, approved_by="checker",
        activate_at=uow.clock.now() + after if after else None))  # fmt: skip
    return version.id


def test_a_live_rules_factor_by_tier_holds_the_tier(db: Database) -> None:
    program_id = with_tiers(db)
    version_id = live(db, program_id, spec("spend-x", MULTIPLIER))
    # given a live multiplier naming 金卡, removing 金卡 is refused, saying what names it
    error = refused(db, program_id)
    assert error.code == "state_conflict"
    assert error.message() == (
        "Tier '金卡' is still named, and would apply to no member there once removed: rule "
        "spend-x (version 1) names 金卡 in params.by_tier (retire it, or have a new version "
        "without it approved, which ends this one). Change these first, then remove the tier."
    )
    assert error.message("zh") == (
        "等级 '金卡' 仍被引用,删除后这些设置将不适用于任何会员:规则 spend-x 第 1 版的 "
        "params.by_tier 引用了 金卡(请停用该版本,或另建不含该等级的新版本并审批,生效时替换"
        "该版本)。请先修改这些设置,再删除该等级。"
    )
    # renaming it keeps its code: allowed
    renamed = [TIERS[0], TierDef(code="金卡", name="金卡会员", rank=5)]
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program_id, definitions=renamed))
    assert [t.name for t in db.run(lambda uow: tiers.list_tiers(uow, program_id=program_id))] == [
        "普通", "金卡会员"]  # fmt: skip
    # once the version is retired, the tier goes
    db.run(lambda uow: rules.retire(uow, program_id=program_id, version_id=version_id))
    remove_gold(db, program_id)
    assert codes(db, program_id) == ["普通"]


def test_a_tier_nothing_names_is_removed(db: Database) -> None:
    program_id = with_tiers(db)
    live(db, program_id, spec("base", {"kind": "spend_rate", "rate": "1"},
                              condition='member.tier == "普通"'))  # fmt: skip
    db.run(lambda uow: rules.set_caps(uow, program_id=program_id, caps=ProgramCaps.model_validate(
        {"by_tier": {"普通": {"day": 100}}})))  # fmt: skip
    remove_gold(db, program_id)
    assert codes(db, program_id) == ["普通"]


def test_rule_versions_that_may_go_live_hold_the_tier_and_drafts_do_not(
    db: Database, clock: ManualClock
) -> None:
    program_id = with_tiers(db)
    # a draft is no obstacle (it is refused when submitted: see test_tier_codes)
    draft(db, program_id, spec("gift", {"kind": "birthday_gift", "by_tier": {"金卡": 500}}))
    # a submitted version is
    waiting = submitted(db, program_id, spec("gift", {"kind": "birthday_gift",
                                                      "by_tier": {"金卡": 500}}))  # fmt: skip
    error = refused(db, program_id)
    assert "rule gift (version 2) names 金卡 in params.by_tier (have it rejected" in str(error)
    db.run(lambda uow: rules.reject(uow, program_id=program_id, version_id=waiting.id))
    # a scheduled one is
    later = live(db, program_id, spec("later", MULTIPLIER), after=timedelta(days=2))
    assert "rule later (version 1) names 金卡" in str(refused(db, program_id))
    db.run(lambda uow: rules.retire(uow, program_id=program_id, version_id=later))
    # a paused one is (it may be resumed)
    paused = live(db, program_id, spec("paused", MULTIPLIER))
    db.run(lambda uow: rules.pause(uow, program_id=program_id, version_id=paused))
    assert "rule paused (version 1) names 金卡" in str(refused(db, program_id))
    db.run(lambda uow: rules.retire(uow, program_id=program_id, version_id=paused))
    # a version retired by a successor approved for a later start is live until then
    live(db, program_id, spec("switch", MULTIPLIER))
    live(db, program_id, spec("switch", {"kind": "multiplier", "factor": "2"}),
         after=timedelta(days=1))  # fmt: skip
    error = refused(db, program_id)
    assert "rule switch (version 1) names 金卡 in params.by_tier (it stays live until" in str(
        error)  # fmt: skip
    clock.advance(timedelta(days=1))
    remove_gold(db, program_id)
    assert codes(db, program_id) == ["普通"]


def test_a_condition_comparing_the_members_tier_holds_the_tier(db: Database) -> None:
    program_id = with_tiers(db)
    vip = spec("vip", {"kind": "fixed", "points": 5}, condition='member.tier in ["普通", "金卡"]')
    version_id = live(db, program_id, vip)
    error = refused(db, program_id)
    assert "rule vip (version 1) names 金卡 in condition (retire it" in str(error)
    assert "规则 vip 第 1 版的 condition 引用了 金卡" in error.message("zh")
    db.run(lambda uow: rules.retire(uow, program_id=program_id, version_id=version_id))
    remove_gold(db, program_id)


def test_the_caps_hold_the_tiers_they_name(db: Database) -> None:
    program_id = with_tiers(db)
    caps = ProgramCaps.model_validate({"by_tier": {"金卡": {"day": 100}}})
    db.run(lambda uow: rules.set_caps(uow, program_id=program_id, caps=caps))
    error = refused(db, program_id)
    assert "the earning caps setting names 金卡 in by_tier (set the caps without it)" in str(
        error)  # fmt: skip
    assert "积分上限设置的 by_tier 引用了 金卡" in error.message("zh")
    db.run(lambda uow: rules.set_caps(uow, program_id=program_id, caps=ProgramCaps()))
    remove_gold(db, program_id)


def settings_with(uow: UnitOfWork, program_id: int, **policies: Any) -> None:
    settings = programs.get_settings(uow, program_id=program_id)
    programs.set_settings(uow, program_id=program_id,
                          settings=settings.model_copy(update=policies))  # fmt: skip


def test_the_programmes_policy_holds_the_tiers_it_names(db: Database) -> None:
    program_id = with_tiers(db)
    expiry = ExpiryPolicy.model_validate({"by_tier": {"金卡": {"kind": "never"}}})
    db.run(lambda uow: settings_with(uow, program_id, expiry=expiry))
    assert "the programme's policy names 金卡 in expiry.by_tier" in str(refused(db, program_id))
    terms = RedemptionPolicy.model_validate({"tiers": {"金卡": {"discount_pct": 90}}})
    db.run(lambda uow: settings_with(uow, program_id, expiry=ExpiryPolicy(), redemption=terms))
    error = refused(db, program_id)
    assert "the programme's policy names 金卡 in redemption.tiers" in str(error)
    assert "计划设置的 redemption.tiers 引用了 金卡" in error.message("zh")
    db.run(lambda uow: settings_with(uow, program_id, redemption=RedemptionPolicy()))
    remove_gold(db, program_id)


def test_the_benefits_matrix_holds_the_tiers_it_names(db: Database) -> None:
    """The matrix names only the tier scheme's levels, and the scheme holds those."""
    program = new_program(db)
    four = [TierDef(code=c, name=c, rank=n) for n, c in enumerate(["普通", "银卡", "金卡", "钻石"])]
    db.run(lambda uow: tiers.set_tiers(uow, program_id=program.id, definitions=four))
    matrix = scheme(benefits={"金卡": {"earn_multiplier": "1.5"}})
    db.run(lambda uow: settings_with(uow, program.id, tier_scheme=matrix))
    with pytest.raises(StateConflict, match="tier scheme ranks its members into"):
        db.run(lambda uow: tiers.set_tiers(uow, program_id=program.id,
                                           definitions=[*four[:2], four[3]]))  # fmt: skip


def test_a_reward_not_retired_holds_the_tiers_it_names(db: Database) -> None:
    program_id = with_tiers(db)
    base = {"kind": "physical", "name": {"zh": "杯子"}, "points": 100}
    for code, fields in (("mug", {"visible_tiers": ["金卡"]}),
                         ("pen", {"early_access": {"金卡": 24},
                                  "sales_start": "2030-01-01T00:00:00Z"})):  # fmt: skip
        body = RewardCreate.model_validate({**base, "code": code, **fields})
        db.run(lambda uow, b=body: rewards.create_reward(uow, program_id=program_id, body=b))
    error = refused(db, program_id)
    assert (
        "reward mug names 金卡 in visible_tiers (edit the reward to leave it out, or retire "
        "the reward); reward pen names 金卡 in early_access"
    ) in str(error)
    assert "礼品 mug的 visible_tiers 引用了 金卡" in error.message("zh")
    db.run(lambda uow: rewards.set_state(uow, program_id=program_id, code="mug", state="paused"))
    assert "reward mug names 金卡" in str(refused(db, program_id))
    for code in ("mug", "pen"):
        db.run(lambda uow, c=code: rewards.set_state(uow, program_id=program_id, code=c,
                                                     state="retired"))  # fmt: skip
    remove_gold(db, program_id)


def test_a_long_list_of_what_names_the_tier_is_cut_short(db: Database) -> None:
    program_id = with_tiers(db)
    for n in range(7):
        live(db, program_id, spec(f"r{n}", MULTIPLIER))
    error = refused(db, program_id)
    assert "rule r4 (version 1)" in str(error) and "r5" not in str(error)
    assert "; and 2 more. Change these first" in str(error)
    assert ";另有 2 处。" in error.message("zh")


def pack(tier_codes: list[str], rules_: list[dict[str, Any]],
         caps: dict[str, Any] | None = None) -> RulePack:  # fmt: skip
    return RulePack.model_validate({
        "tiers": [{"code": c, "name": c, "rank": n} for n, c in enumerate(tier_codes)],
        "caps": caps,
        "rules": rules_,
    })  # fmt: skip


def load(db: Database, program_id: int, pack_: RulePack) -> None:
    db.run(lambda uow: rules.load_pack(uow, program_id=program_id, pack=pack_, actor="installer",
                                       activate=True))  # fmt: skip


BASE = {"code": "base", "name": "base", "event_types": ["order.paid"],
        "params": {"kind": "spend_rate", "rate": "1"}}  # fmt: skip


def test_a_rule_pack_may_drop_a_tier_only_with_what_named_it(db: Database) -> None:
    """A pack's tiers replace the programme's: a tier it drops may be named by the rules and
    caps it replaces, not by a rule it leaves live."""
    program = new_program(db)
    gold = {"code": "tier", "name": "tier", "event_types": ["order.paid"], "params": MULTIPLIER}
    load(db, program.id, pack(["普通", "金卡"], [BASE, gold], {"by_tier": {"金卡": {"day": 9}}}))
    other = {**gold, "code": "other"}
    load(db, program.id, pack(["普通", "金卡"], [BASE, other]))
    # dropping 金卡 while "other", which it does not bring, and the caps name it: refused,
    # nothing changed
    plain = {"kind": "multiplier", "factor": "2"}
    with pytest.raises(StateConflict) as caught:
        load(db, program.id, pack(["普通", "钻石"], [BASE, {**gold, "params": plain}]))
    assert "rule other (version 1) names 金卡" in str(caught.value)
    assert "rule tier" not in str(caught.value) and "the earning caps" in str(caught.value)
    assert codes(db, program.id) == ["普通", "金卡"]
    # bringing new versions of both rules and caps without it: 金卡 goes
    replaced = [BASE, {**gold, "params": plain}, {**other, "params": plain}]
    load(db, program.id, pack(["普通", "钻石"], replaced, {"by_tier": {}}))
    assert codes(db, program.id) == ["普通", "钻石"]
