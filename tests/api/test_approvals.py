"""Maker–checker over HTTP: large adjustments, clearing and settings wait for a second person,
nobody approves their own request, an approved request executes exactly once, and a request
left undecided past its programme's time to live expires."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from jifen.api.app import create_app
from jifen.approvals import service as approvals_service
from jifen.approvals.models import approvals
from jifen.audit.models import audit_entries
from jifen.auth import service as auth
from jifen.clock import ManualClock
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import StateConflict
from jifen.points.models import postings
from jifen.programs.models import programs
from tests.api import support
from tests.api.conftest import api_settings
from tests.api.earning import RATES, Shop, body, rule
from tests.factories import assert_ledger_sound, new_members, new_program
from tests.points.test_concurrency import run_together


class Desk:
    """A programme with a member, an operator (the maker) and a reviewer (the checker)."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client = client
        self.db = db
        self.program = new_program(db)
        (self.member,) = new_members(db, self.program.id, 1)
        self.operator = support.staff(db, "operator", program_id=self.program.id)
        self.reviewer = support.staff(db, "reviewer", program_id=self.program.id)
        self.base = f"/v1/programs/{self.program.code}"

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        return self.client.post(self.base + path, json=body, headers={**headers, **support.key()})

    def points(self, tail: str) -> str:
        return f"/members/{self.member}/points{tail}"

    def earn(self, amount: int) -> None:
        answer = self.post(self.points("/earn"), {"amount": amount}, self.operator)
        assert answer.status_code == 201, answer.text

    def adjust(self, amount: int) -> Any:
        return self.post(
            self.points("/adjust"), {"amount": amount, "reason": "goodwill"}, self.operator
        )

    def decide(self, approval_id: int, verb: str, headers: dict[str, str] | None = None) -> Any:
        return self.post(
            f"/approvals/{approval_id}/{verb}", {"note": "checked"}, headers or self.reviewer
        )

    def balance(self) -> dict[str, Any]:
        answer = self.client.get(self.base + self.points(""), headers=self.operator)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def approval(self, approval_id: int) -> dict[str, Any]:
        answer = self.client.get(f"{self.base}/approvals/{approval_id}", headers=self.reviewer)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def put_settings(self, change: dict[str, Any]) -> Any:
        """The operator's request to change the settings by ``change``."""
        url = f"{self.base}/settings"
        current = self.client.get(url, headers=self.operator).json()
        return self.client.put(
            url, json={**current, **change}, headers={**self.operator, **support.key()}
        )

    def settings(self) -> dict[str, Any]:
        answer = self.client.get(f"{self.base}/settings", headers=self.operator)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def posting_count(self) -> int:
        return int(
            self.db.run(
                lambda uow: uow.conn.execute(
                    select(func.count()).where(postings.c.program_id == self.program.id)
                ).scalar_one()
            )
        )


def test_a_large_adjustment_waits_for_another_person_and_executes_once(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    # a small adjustment (at most the default threshold of 1000) posts at once
    small = desk.adjust(1000)
    assert small.status_code == 201, small.text
    assert small.json()["kind"] == "adjust"
    # a larger one is filed for approval and changes nothing yet
    filed = desk.adjust(5000)
    assert filed.status_code == 202, filed.text
    request = filed.json()
    assert request["status"] == "pending" and request["action"] == "points.adjust"
    assert desk.balance()["available"] == 1000
    # the maker cannot approve it (operators lack approvals.decide) ...
    assert desk.decide(request["id"], "approve", desk.operator).status_code == 403
    # ... and neither can a checker approve their own request
    admin = support.staff(db, "super_admin", program_id=desk.program.id)
    own = desk.post(desk.points("/adjust"), {"amount": 2000, "reason": "mine"}, admin)
    assert own.status_code == 202
    self_approval = desk.decide(own.json()["id"], "approve", admin)
    assert self_approval.status_code == 403
    # (no role would change that: the answer does not send them to ask for one)
    assert self_approval.json()["code"] == "wrong_caller"
    assert "your own" in self_approval.json()["detail"]
    assert "role" not in self_approval.json()["detail"]
    assert desk.approval(own.json()["id"])["status"] == "pending"
    # another reviewer approves: posted once
    approved = desk.decide(request["id"], "approve")
    assert approved.status_code == 200, approved.text
    decided = approved.json()
    assert decided["status"] == "approved"
    assert decided["result"]["posting"]["amount"] == 5000
    assert desk.balance()["available"] == 6000
    # approving again is refused and posts nothing
    again = desk.decide(request["id"], "approve")
    assert again.status_code == 409
    assert again.json()["code"] == "state_conflict"
    assert desk.balance()["available"] == 6000
    assert desk.posting_count() == 2
    # the queue lists the requests, filterable by status
    pending = client.get(
        f"{desk.base}/approvals", params={"status": "pending"}, headers=desk.reviewer
    ).json()
    assert [a["id"] for a in pending["items"]] == [own.json()["id"]]
    assert_ledger_sound(db, desk.program.id)


def test_concurrent_approvals_execute_once(pg: Database) -> None:
    with TestClient(create_app(pg, api_settings())) as client:
        desk = Desk(client, pg)
        filed = desk.adjust(-5000)
        desk.earn(9000)
        assert filed.status_code == 202
        reviewers = [support.staff(pg, "reviewer", program_id=desk.program.id) for _ in range(4)]
        statuses: list[int] = []
        barrier = threading.Barrier(len(reviewers))

        def approve(headers: dict[str, str]) -> None:
            barrier.wait()
            statuses.append(desk.decide(filed.json()["id"], "approve", headers).status_code)

        threads = [threading.Thread(target=approve, args=(h,)) for h in reviewers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # then one approval executed and the others were refused
        assert sorted(statuses) == [200, 409, 409, 409]
        assert desk.balance()["available"] == 4000
        assert desk.posting_count() == 2
        assert_ledger_sound(pg, desk.program.id)


def test_clearing_via_approval_empties_the_available_balance(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    desk.earn(300)
    filed = desk.post(desk.points("/clear"), {"reason": "account closed"}, desk.operator)
    assert filed.status_code == 202, filed.text
    # points earned after the request are cleared too: the balance at execution counts
    desk.earn(200)
    approved = desk.decide(filed.json()["id"], "approve")
    assert approved.status_code == 200, approved.text
    assert approved.json()["result"]["cleared"] == 500
    assert desk.balance()["available"] == 0
    assert_ledger_sound(db, desk.program.id)


def test_a_spend_committed_as_a_clearing_is_approved_does_not_make_it_fail(
    pg: Database, monkeypatch: Any
) -> None:
    """The clearing reads the balance it clears under the account's lock: a spend that
    commits meanwhile waits for it (and then finds nothing), instead of leaving the
    approved request failed for want of the points it had counted."""
    from jifen.errors import InsufficientPoints
    from jifen.points import service as points

    with TestClient(create_app(pg, api_settings())) as client:
        desk = Desk(client, pg)
        desk.earn(500)
        filed = desk.post(desk.points("/clear"), {"reason": "fraud"}, desk.operator)
        assert filed.status_code == 202, filed.text
        outcome: list[str] = []

        def spend() -> None:
            try:
                pg.run(lambda uow: points.spend(uow, member_id=desk.member, amount=100, key="s"))
                outcome.append("spent")
            except InsufficientPoints:
                outcome.append("refused")

        real, racer = points.balance, threading.Thread(target=spend)

        def balance_then_a_spend(uow: UnitOfWork, **kwargs: Any) -> Any:
            read = real(uow, **kwargs)
            if not racer.is_alive() and not outcome:  # once: a till spends right after
                racer.start()
                racer.join(timeout=1.0)
            return read

        monkeypatch.setattr(points, "balance", balance_then_a_spend)
        approved = desk.decide(filed.json()["id"], "approve")
        monkeypatch.setattr(points, "balance", real)
        racer.join(timeout=10)
        assert approved.status_code == 200, approved.text
        assert approved.json()["result"]["cleared"] == 500
        assert outcome == ["refused"]
        assert desk.balance()["available"] == 0
        assert_ledger_sound(pg, desk.program.id)


def test_settings_change_only_through_an_approval(client: TestClient, db: Database) -> None:
    desk = Desk(client, db)
    url = f"{desk.base}/settings"
    before = client.get(url, headers=desk.operator).json()
    assert before["adjust_approval_threshold"] == 1000
    # when new settings are put, they are only a request
    wanted = {**before, "adjust_approval_threshold": 10}
    filed = client.put(url, json=wanted, headers={**desk.operator, **support.key()})
    assert filed.status_code == 202, filed.text
    assert client.get(url, headers=desk.operator).json() == before
    # and apply when a reviewer approves
    assert desk.decide(filed.json()["id"], "approve").status_code == 200
    assert client.get(url, headers=desk.operator).json() == wanted
    # so that an adjustment of 11 now needs approval
    assert desk.adjust(11).status_code == 202
    # out-of-range settings are refused outright
    bad = client.put(
        url, json={"return_window_days": 400}, headers={**desk.operator, **support.key()}
    )
    assert bad.status_code == 422
    # as are settings naming a tier the programme does not have: it has none yet
    typo = {
        **wanted,
        "redemption": {**wanted["redemption"], "tiers": {"gold": {"discount_pct": 90}}},
    }
    refused = client.put(url, json=typo, headers={**desk.operator, **support.key()})
    assert refused.status_code == 422 and refused.json()["code"] == "tier_not_defined"
    assert refused.json()["errors"][0]["field"] == "redemption.tiers"
    assert "'gold'" in refused.json()["detail"] and "none defined yet" in refused.json()["detail"]


def test_approving_new_settings_records_the_settings_they_replace(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    before = desk.settings()
    filed = desk.put_settings({"adjust_approval_threshold": 10, "transfers_enabled": False})
    assert filed.status_code == 202, filed.text
    approved = desk.decide(filed.json()["id"], "approve")
    assert approved.status_code == 200, approved.text
    # the request's result holds the settings it replaced besides the new ones
    result = approved.json()["result"]
    assert result["replaced"] == before
    assert result["settings"] == desk.settings()
    # and the approval's audit entry keeps them as what was there before
    auditor = support.staff(db, "auditor", program_id=desk.program.id)
    answer = client.get(
        "/v1/audit",
        params={"target": f"approval:{filed.json()['id']}", "action": "approvals.decide"},
        headers=auditor,
    )
    assert answer.status_code == 200, answer.text
    (entry,) = answer.json()["items"]
    assert entry["before"] == {"settings": before}
    assert entry["after"]["result"]["settings"]["adjust_approval_threshold"] == 10


def test_approving_new_earning_caps_records_the_caps_they_replace(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    url = f"{desk.base}/earning-caps"
    before = client.get(url, headers=desk.operator).json()
    filed = client.put(
        url, json={**before, "budget": 500}, headers={**desk.operator, **support.key()}
    )
    assert filed.status_code == 202, filed.text
    approved = desk.decide(filed.json()["id"], "approve")
    assert approved.status_code == 200, approved.text
    assert approved.json()["result"]["replaced"] == before
    auditor = support.staff(db, "auditor", program_id=desk.program.id)
    (entry,) = client.get(
        "/v1/audit",
        params={"target": f"approval:{filed.json()['id']}", "action": "approvals.decide"},
        headers=auditor,
    ).json()["items"]
    assert entry["before"] == {"caps": before}


def test_a_request_filed_on_settings_changed_since_is_not_approved(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    for url, change in (
        (f"{desk.base}/settings", {"transfers_enabled": False}),
        (f"{desk.base}/earning-caps", {"budget": 500}),
    ):
        base = client.get(url, headers=desk.operator).json()
        # given two requests filed on the same value, the first approved
        first = client.put(url, json={**base, **change}, headers={**desk.operator, **support.key()})
        second = client.put(url, json=base, headers={**desk.operator, **support.key()})
        assert first.status_code == second.status_code == 202, second.text
        assert desk.decide(first.json()["id"], "approve").status_code == 200
        # when the second is approved, it is refused: it would undo the first
        stale = client.post(
            f"{desk.base}/approvals/{second.json()['id']}/approve",
            json={},
            headers={**desk.reviewer, **support.key(), "Accept-Language": "zh"},
        )
        assert stale.status_code == 409, stale.text
        assert "重新提交" in stale.json()["detail"]
        # and nothing changed: the first stays, the second waits
        assert client.get(url, headers=desk.operator).json() == {**base, **change}
        assert desk.approval(second.json()["id"])["status"] == "pending"


def _waits_on_a_lock(db: Database, pid: int) -> None:
    """Return once the PostgreSQL backend ``pid`` waits on a lock (10 s at most)."""
    query = text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid")

    def waiting(uow: UnitOfWork) -> bool:
        return bool(uow.conn.execute(query, {"pid": pid}).scalar() == "Lock")

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if db.run(waiting, read_only=True):
            return
        time.sleep(0.02)
    raise AssertionError(f"backend {pid} never waited on a lock")


def test_two_requests_on_one_base_approved_at_once_do_not_both_pass(pg: Database) -> None:
    with TestClient(create_app(pg, api_settings())) as client:
        desk = Desk(client, pg)

        def checker(uow: UnitOfWork, i: int) -> int:
            made = auth.create_staff(
                uow, username=f"checker{i}-{desk.program.code}", password="correct horse 1"
            )
            auth.grant_role(uow, staff_id=made.id, role="reviewer", program_id=desk.program.id)
            return made.id

        checkers = [pg.run(lambda uow, i=i: checker(uow, i)) for i in (1, 2)]
        for url, first_change, second_change in (
            (f"{desk.base}/settings", {"transfers_enabled": False},
             {"adjust_approval_threshold": 10}),
            (f"{desk.base}/earning-caps", {"budget": 500}, {"budget": 700}),
        ):  # fmt: skip
            base = client.get(url, headers=desk.operator).json()
            filed = [
                client.put(url, json={**base, **change},
                           headers={**desk.operator, **support.key()}).json()["id"]
                for change in (first_change, second_change)
            ]  # fmt: skip
            second: dict[str, Any] = {}

            def approve_second(filed: list[int] = filed, second: dict[str, Any] = second) -> None:
                with pg.transaction() as uow:
                    second["pid"] = uow.conn.execute(text("SELECT pg_backend_pid()")).scalar()
                    try:
                        approvals_service.approve(
                            uow, program_id=desk.program.id, approval_id=filed[1],
                            decided_by=checkers[1],
                        )  # fmt: skip
                    except StateConflict as exc:
                        second["refused"] = exc

            # given the first request approved by one checker, not yet committed
            with pg.transaction() as uow:
                approvals_service.approve(
                    uow, program_id=desk.program.id, approval_id=filed[0], decided_by=checkers[0]
                )
                # when another checker approves the second meanwhile (it waits on the first)
                thread = threading.Thread(target=approve_second)
                thread.start()
                while "pid" not in second:
                    time.sleep(0.01)
                _waits_on_a_lock(pg, second["pid"])
            thread.join()
            # then the second finds its base changed: refused, and the first change stays
            assert "refused" in second, "the second request was approved over the first"
            assert desk.approval(filed[1])["status"] == "pending"
            assert client.get(url, headers=desk.operator).json() == {**base, **first_change}


def test_a_request_filed_before_bases_were_kept_is_approved_as_before(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    url = f"{desk.base}/settings"
    base = client.get(url, headers=desk.operator).json()
    filed = client.put(url, json={**base, "adjust_approval_threshold": 10},
                       headers={**desk.operator, **support.key()})  # fmt: skip
    db.run(
        lambda uow: uow.conn.execute(
            approvals.update().where(approvals.c.id == filed.json()["id"]).values(based_on=None)
        )
    )
    other = client.put(url, json={**base, "transfers_enabled": False},
                       headers={**desk.operator, **support.key()})  # fmt: skip
    assert desk.decide(other.json()["id"], "approve").status_code == 200
    assert desk.decide(filed.json()["id"], "approve").status_code == 200
    assert client.get(url, headers=desk.operator).json()["adjust_approval_threshold"] == 10


def _staff_id(client: TestClient, headers: dict[str, str]) -> int:
    return int(client.get("/v1/auth/me", headers=headers).json()["id"])


def test_a_request_whose_maker_was_disabled_or_lost_the_permission_waits(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    maker = _staff_id(client, desk.operator)
    filed = desk.adjust(50_000).json()["id"]
    # when the maker is disabled, its request is not approved, and stays pending
    db.run(
        lambda uow: auth.update_staff(
            uow, staff_id=maker, display_name=None, active=False, unlock=False
        )
    )
    refused = desk.decide(filed, "approve")
    assert refused.status_code == 409, refused.text
    assert "maker" in refused.json()["detail"]
    assert desk.approval(filed)["status"] == "pending"
    # nor when it is active again but no longer holds points.adjust here
    db.run(
        lambda uow: auth.update_staff(
            uow, staff_id=maker, display_name=None, active=True, unlock=False
        )
    )
    for grant in db.run(lambda uow: auth.get_staff(uow, staff_id=maker)).grants:
        db.run(lambda uow, g=grant.id: auth.revoke_grant(uow, staff_id=maker, grant_id=g))
    assert desk.decide(filed, "approve").status_code == 409
    assert desk.posting_count() == 0
    # a checker can still reject it
    assert desk.decide(filed, "reject").status_code == 200


def test_a_settings_request_waits_when_its_maker_keeps_only_tiers_write(
    client: TestClient, db: Database
) -> None:
    # given a maker holding operator and a custom role with tiers.write
    desk = Desk(client, db)
    maker = _staff_id(client, desk.operator)
    db.run(
        lambda uow: auth.create_role(
            uow, program_id=desk.program.id, code="tier_clerk", name="Tier clerk",
            permissions=["programs.read", "tiers.read", "tiers.write"],
        )
    )  # fmt: skip
    db.run(lambda uow: auth.grant_role(uow, staff_id=maker, role="tier_clerk",
                                       program_id=desk.program.id))  # fmt: skip
    url = f"{desk.base}/settings"
    base = client.get(url, headers=desk.operator).json()
    filed = client.put(url, json={**base, "transfers_enabled": False},
                       headers={**desk.operator, **support.key()})  # fmt: skip
    assert filed.status_code == 202, filed.text
    # when it loses programs.settings (its operator grant) but keeps tiers.write
    operator = next(
        g for g in db.run(lambda uow: auth.get_staff(uow, staff_id=maker)).grants
        if g.role == "operator"
    )  # fmt: skip
    db.run(lambda uow: auth.revoke_grant(uow, staff_id=maker, grant_id=operator.id))
    # then its old request is not approved: tiers.write files no settings
    refused = desk.decide(filed.json()["id"], "approve")
    assert refused.status_code == 409, refused.text
    assert "programs.settings" in refused.json()["detail"]
    assert client.get(url, headers=desk.reviewer).json() == base


def test_a_settings_request_waits_when_its_maker_keeps_one_merchants_grant_only(
    client: TestClient, db: Database
) -> None:
    # given a settings request filed by a programme-wide operator
    desk = Desk(client, db)
    maker = _staff_id(client, desk.operator)
    url = f"{desk.base}/settings"
    base = client.get(url, headers=desk.operator).json()
    filed = client.put(url, json={**base, "transfers_enabled": False},
                       headers={**desk.operator, **support.key()})  # fmt: skip
    assert filed.status_code == 202, filed.text
    # when the maker is left an operator of one merchant only
    db.run(lambda uow: auth.grant_role(uow, staff_id=maker, role="operator",
                                       program_id=desk.program.id, merchant="mall"))  # fmt: skip
    wide = next(
        g for g in db.run(lambda uow: auth.get_staff(uow, staff_id=maker)).grants
        if g.role == "operator" and g.merchant is None
    )  # fmt: skip
    db.run(lambda uow: auth.revoke_grant(uow, staff_id=maker, grant_id=wide.id))
    # then its request is not approved: the programme's policy needs a programme-wide grant
    refused = desk.decide(filed.json()["id"], "approve")
    assert refused.status_code == 409, refused.text
    assert "whole programme" in refused.json()["detail"]
    assert client.get(url, headers=desk.reviewer).json() == base


def test_a_reviewer_of_one_merchant_decides_no_change_of_the_programmes_policy(
    client: TestClient, db: Database
) -> None:
    # given a settings request filed by a programme-wide operator
    desk = Desk(client, db)
    url = f"{desk.base}/settings"
    base = client.get(url, headers=desk.operator).json()
    filed = client.put(url, json={**base, "transfers_enabled": False},
                       headers={**desk.operator, **support.key()})  # fmt: skip
    assert filed.status_code == 202, filed.text
    # a reviewer of one merchant neither approves nor rejects it, and it stays pending
    mall = support.staff(db, "reviewer", program_id=desk.program.id, merchant="mall")
    for verb in ("approve", "reject"):
        refused = desk.decide(filed.json()["id"], verb, mall)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "scope_too_narrow"
        assert "whole programme" in refused.json()["detail"]
    assert client.get(url, headers=desk.reviewer).json() == base
    # while it decides a member's adjustment, and a programme-wide reviewer the policy
    adjusted = desk.adjust(5000)
    assert adjusted.status_code == 202, adjusted.text
    assert desk.decide(adjusted.json()["id"], "approve", mall).status_code == 200
    approved = desk.decide(filed.json()["id"], "approve")
    assert approved.status_code == 200, approved.text
    assert client.get(url, headers=desk.reviewer).json()["transfers_enabled"] is False


def test_a_maker_withdraws_its_own_pending_request(client: TestClient, db: Database) -> None:
    desk = Desk(client, db)
    filed = desk.adjust(5000).json()["id"]
    # nobody else withdraws it: a reviewer lacks the permission, another operator is refused
    assert desk.decide(filed, "withdraw").status_code == 403
    other = support.staff(db, "operator", program_id=desk.program.id)
    assert desk.decide(filed, "withdraw", other).status_code == 403
    # its maker does: it ends withdrawn, and can no longer be approved
    withdrawn = desk.decide(filed, "withdraw", desk.operator)
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["status"] == "withdrawn" and withdrawn.json()["decided_by"] is None
    assert desk.decide(filed, "approve").status_code == 409
    assert desk.decide(filed, "withdraw", desk.operator).status_code == 409
    assert desk.balance()["available"] == 0
    # and the withdrawal is in the audit log
    actions = db.run(
        lambda uow: uow.conn.execute(
            select(audit_entries.c.action).where(audit_entries.c.target == f"approval:{filed}")
        ).scalars().all()
    )  # fmt: skip
    assert actions == ["approvals.withdraw"]


def test_an_operators_adjustments_of_a_day_count_together_against_the_threshold(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    # adjustments that add up to the threshold (1000) post at once
    assert desk.adjust(600).status_code == 201
    assert desk.adjust(-400).status_code == 201
    # one more point, either way, would pass it: it waits for a second person
    for amount in (1, -1):
        held = desk.adjust(amount)
        assert held.status_code == 202, held.text
        assert held.json()["action"] == "points.adjust"
    # another operator's adjustments count on their own
    other = support.staff(db, "operator", program_id=desk.program.id)
    answer = desk.post(desk.points("/adjust"), {"amount": 1000, "reason": "goodwill"}, other)
    assert answer.status_code == 201, answer.text
    # and once they are a day old the operator's count starts again
    db.run(
        lambda uow: uow.conn.execute(
            postings.update()
            .where(postings.c.program_id == desk.program.id)
            .values(created_at=db.clock.now() - timedelta(hours=24, seconds=1))
        )
    )
    assert desk.adjust(1000).status_code == 201
    assert desk.balance()["available"] == 2200


def test_adjustments_sent_at_once_count_against_the_threshold_one_after_another(
    pg: Database,
) -> None:
    with TestClient(create_app(pg, api_settings())) as client:
        desk = Desk(client, pg)
        other = support.staff(pg, "operator", program_id=desk.program.id)
        # when one operator sends ten adjustments of the threshold (1000) at once, and
        # another ten of 300
        for headers, amount, posted in ((desk.operator, 1000, 1), (other, 300, 3)):
            statuses = run_together(
                10,
                lambda _, h=headers, a=amount: (
                    desk.post(
                        desk.points("/adjust"), {"amount": a, "reason": "goodwill"}, h
                    ).status_code
                ),
            )
            # then as many post as fit under the threshold, and the rest wait for approval
            assert Counter(statuses) == {201: posted, 202: 10 - posted}, statuses
        assert desk.balance()["available"] == 1000 + 900
        pending = client.get(
            f"{desk.base}/approvals", params={"status": "pending", "limit": 50},
            headers=desk.reviewer,
        ).json()  # fmt: skip
        assert len(pending["items"]) == 9 + 7
        assert_ledger_sound(pg, desk.program.id)


def test_an_adjustment_that_could_never_execute_is_refused_when_filed(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    # a credit whose points would lapse before it could be approved
    past = desk.post(
        desk.points("/adjust"),
        {"amount": 5000, "reason": "goodwill", "expires_at": "2025-12-31T23:00:00+08:00"},
        desk.operator,
    )
    assert past.status_code == 422, past.text
    assert past.json()["code"] == "invalid_dates"
    # a correction of a closed account, which takes no adjustment
    admin = support.staff(db, "super_admin", program_id=desk.program.id)
    closing = desk.post(
        f"/members/{desk.member}/state", {"state": "closed", "reason": "left"}, admin
    )
    assert closing.status_code == 200, closing.text
    closed = desk.adjust(5000)
    assert closed.status_code == 409, closed.text
    assert "closed" in closed.json()["detail"]
    # neither left a request in the queue
    queue = client.get(f"{desk.base}/approvals", headers=desk.reviewer).json()
    assert queue["items"] == []


def test_a_rejected_request_executes_nothing(client: TestClient, db: Database) -> None:
    desk = Desk(client, db)
    filed = desk.adjust(5000)
    rejected = desk.decide(filed.json()["id"], "reject")
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["status"] == "rejected"
    assert rejected.json()["decision_note"] == "checked"
    assert desk.decide(filed.json()["id"], "approve").status_code == 409
    assert desk.balance()["balance"] == 0
    assert desk.posting_count() == 0


def test_a_failed_execution_is_recorded_as_failed(client: TestClient, db: Database) -> None:
    desk = Desk(client, db)
    # given a request to take away more points than the member will have
    desk.earn(100)
    filed = desk.adjust(-5000)
    assert filed.status_code == 202
    # when it is approved, the ledger refuses it
    approved = client.post(
        f"{desk.base}/approvals/{filed.json()['id']}/approve",
        json={},
        headers={**desk.reviewer, **support.key(), "Accept-Language": "zh"},
    )
    assert approved.status_code == 409
    assert approved.json()["code"] == "insufficient_points"
    assert "执行失败" in approved.json()["detail"]
    # then the request is kept as failed, with the error, and nothing was posted
    kept = desk.approval(filed.json()["id"])
    assert kept["status"] == "failed"
    assert kept["result"]["code"] == "insufficient_points"
    assert desk.balance()["available"] == 100
    assert desk.posting_count() == 1
    assert_ledger_sound(db, desk.program.id)


def test_only_staff_file_requests(client: TestClient, db: Database) -> None:
    desk = Desk(client, db)
    key = support.api_key(
        db, desk.program.id, permissions=["points.read", "points.earn", "points.freeze"]
    )
    member = support.member(db, desk.member)
    for headers in (key, member):
        answer = desk.post(desk.points("/clear"), {"reason": "x"}, headers)
        assert answer.status_code == 403
    listed = client.get(f"{desk.base}/approvals", headers=desk.reviewer).json()
    assert listed["items"] == []


def test_the_queue_pages_with_a_cursor_and_an_unknown_request_is_not_found(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    filed = [desk.adjust(2000 + i).json()["id"] for i in range(3)]
    url = f"{desk.base}/approvals"
    first = client.get(url, params={"limit": 2}, headers=desk.reviewer).json()
    second = client.get(
        url, params={"limit": 2, "cursor": first["next_cursor"]}, headers=desk.reviewer
    ).json()
    assert [a["id"] for a in first["items"] + second["items"]] == filed[::-1]
    assert second["next_cursor"] is None
    assert client.get(f"{url}/{filed[-1] + 1000}", headers=desk.reviewer).status_code == 404
    assert desk.decide(filed[-1] + 1000, "approve").status_code == 404


# --------------------------------------------------------------------------- expiry


def _later(desk: Desk | Shop, delta: timedelta) -> None:
    """Move the clock on by ``delta`` and sign the maker and the checker in again (a staff
    session lasts 12 hours)."""
    assert isinstance(desk.db.clock, ManualClock)
    ids = {who: _staff_id(desk.client, getattr(desk, who)) for who in ("operator", "reviewer")}
    desk.db.clock.advance(delta)
    for who, staff_id in ids.items():
        token = desk.db.run(
            lambda uow, s=staff_id: (
                auth.new_session(uow, subject="staff", subject_id=s, totp_verified=True).token
            )
        )
        setattr(desk, who, support.bearer(token))


def _listed(desk: Desk, status: str) -> list[int]:
    answer = desk.client.get(
        f"{desk.base}/approvals", params={"status": status}, headers=desk.reviewer
    )
    assert answer.status_code == 200, answer.text
    return [a["id"] for a in answer.json()["items"]]


def test_a_request_approved_within_its_time_to_live_executes_once(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    filed = desk.adjust(5000).json()
    # it expires 72 hours (the default) after it was filed
    requested_at = datetime.fromisoformat(filed["requested_at"])
    assert datetime.fromisoformat(filed["expires_at"]) == requested_at + timedelta(hours=72)
    # a second before then it is still pending, and approving it posts once
    _later(desk, timedelta(hours=72) - timedelta(seconds=1))
    assert desk.approval(filed["id"])["status"] == "pending"
    assert _listed(desk, "pending") == [filed["id"]] and _listed(desk, "expired") == []
    approved = desk.decide(filed["id"], "approve")
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "approved" and approved.json()["expires_at"] is None
    # and once decided it does not expire
    _later(desk, timedelta(hours=1))
    assert desk.approval(filed["id"])["status"] == "approved"
    assert desk.decide(filed["id"], "approve").status_code == 409
    # so it posted once
    assert (desk.balance()["available"], desk.posting_count()) == (5000, 1)
    assert_ledger_sound(db, desk.program.id)


def test_a_request_past_its_time_to_live_is_not_approved_but_may_be_rejected(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    before = desk.settings()
    adjustment = desk.adjust(5000).json()
    change = desk.put_settings({"transfers_enabled": False}).json()
    # when its 72 hours have passed
    _later(desk, timedelta(hours=72))
    # then it reads expired, in the queue and on its own
    for filed in (adjustment, change):
        read = desk.approval(filed["id"])
        assert read["status"] == "expired" and read["expires_at"] == filed["expires_at"]
    assert _listed(desk, "expired") == [change["id"], adjustment["id"]]
    assert _listed(desk, "pending") == []
    # and approving it is refused, saying when it expired, in English and Chinese
    expired_at = datetime.fromisoformat(adjustment["expires_at"]).isoformat(timespec="seconds")
    refused = desk.decide(adjustment["id"], "approve")
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "state_conflict"
    assert f"expired at {expired_at}" in refused.json()["detail"]
    assert "File the request again" in refused.json()["detail"]
    zh = client.post(
        f"{desk.base}/approvals/{change['id']}/approve",
        json={},
        headers={**desk.reviewer, **support.key(), "Accept-Language": "zh"},
    )
    assert zh.status_code == 409, zh.text
    assert "已于" in zh.json()["detail"] and "过期" in zh.json()["detail"]
    assert "重新提交" in zh.json()["detail"]
    # and nothing changed: no points, the same settings
    assert desk.balance()["available"] == 0
    assert desk.posting_count() == 0
    assert desk.settings() == before
    # a checker may still reject it, which closes it in the queue and executes nothing
    for filed in (adjustment, change):
        closed = desk.decide(filed["id"], "reject")
        assert closed.status_code == 200, closed.text
        assert desk.approval(filed["id"])["status"] == "rejected"
    assert _listed(desk, "expired") == []
    assert desk.balance()["available"] == 0
    assert desk.settings() == before
    # a request filed again is open for its own 72 hours
    again = desk.adjust(5000).json()
    assert again["status"] == "pending"
    assert desk.decide(again["id"], "approve").status_code == 200
    assert desk.balance()["available"] == 5000


def test_each_programme_sets_how_long_its_requests_stay_open(
    client: TestClient, db: Database
) -> None:
    brisk, patient = Desk(client, db), Desk(client, db)
    # the setting reads 72 hours until changed, and is kept between 1 hour and 90 days
    assert brisk.settings()["approval_ttl_hours"] == 72
    for hours in (0, 90 * 24 + 1):
        assert brisk.put_settings({"approval_ttl_hours": hours}).status_code == 422
    # given one programme whose requests stay open for an hour, the other at the default
    filed = brisk.put_settings({"approval_ttl_hours": 1}).json()
    assert brisk.decide(filed["id"], "approve").status_code == 200
    assert brisk.settings()["approval_ttl_hours"] == 1
    quick, slow = brisk.adjust(5000).json(), patient.adjust(5000).json()
    assert datetime.fromisoformat(quick["expires_at"]) == datetime.fromisoformat(
        quick["requested_at"]
    ) + timedelta(hours=1)
    # when an hour has passed
    _later(brisk, timedelta(hours=1))
    _later(patient, timedelta(0))
    # then the first programme's request has expired, and the other's is approved
    assert brisk.decide(quick["id"], "approve").status_code == 409
    assert brisk.approval(quick["id"])["status"] == "expired"
    assert patient.decide(slow["id"], "approve").status_code == 200
    assert (brisk.balance()["available"], patient.balance()["available"]) == (0, 5000)


def test_a_maker_may_withdraw_an_expired_request(client: TestClient, db: Database) -> None:
    desk = Desk(client, db)
    filed = desk.adjust(5000).json()
    _later(desk, timedelta(days=4))
    # its maker withdraws it: it leaves the expired requests, and executes nothing
    withdrawn = desk.decide(filed["id"], "withdraw", desk.operator)
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["status"] == "withdrawn" and withdrawn.json()["expires_at"] is None
    assert _listed(desk, "expired") == []
    assert desk.decide(filed["id"], "approve").status_code == 409
    assert desk.balance()["available"] == 0 and desk.posting_count() == 0


def test_withdrawing_an_expired_rule_request_sends_the_rule_back(
    client: TestClient, db: Database
) -> None:
    # given a rule submitted, whose request expired
    shop = Shop(client, db)
    draft = shop.draft(rule("base", RATES))
    approval = shop.submit(draft["id"])
    _later(shop, timedelta(hours=73))
    assert shop.decide(approval["id"], "approve").status_code == 409
    assert shop.version(draft["id"])["status"] == "submitted"
    # when its maker withdraws the request, the rule goes back as a rejection sends it
    body(shop.decide(approval["id"], "withdraw", shop.operator), 200)
    assert shop.version(draft["id"])["status"] == "rejected"


def test_settings_stored_before_the_time_to_live_still_load_and_old_requests_pass(
    client: TestClient, db: Database
) -> None:
    desk = Desk(client, db)
    # given settings stored by a release without approval_ttl_hours nor closing_policy
    later = {"approval_ttl_hours": 72, "closing_policy": "forfeit"}
    stored = {k: v for k, v in desk.settings().items() if k not in later}
    db.run(
        lambda uow: uow.conn.execute(
            programs.update().where(programs.c.id == desk.program.id).values(settings=stored)
        )
    )
    # then they load, with the default
    assert desk.settings() == {**stored, **later}
    # and a settings request filed then (on the digest of those settings) is approved
    filed = desk.put_settings({"transfers_enabled": False}).json()
    old_base = hashlib.sha256(
        json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    db.run(
        lambda uow: uow.conn.execute(
            approvals.update()
            .where(approvals.c.id == filed["id"])
            .values(
                based_on=old_base,
                params={"settings": {**stored, "transfers_enabled": False}},
            )
        )
    )
    assert desk.decide(filed["id"], "approve").status_code == 200
    assert desk.settings() == {**stored, "transfers_enabled": False, **later}
