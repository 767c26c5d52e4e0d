"""A programme set up for earning over HTTP: members, staff, an API key, and short ways to
draft and approve rules, define tiers and send events through the API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from jifen.db.uow import Database
from jifen.events.models import events
from tests.api import support
from tests.factories import new_members, new_program

Json = dict[str, Any]
TIERS = [
    {"code": "普通", "name": "普通会员", "rank": 0},
    {"code": "银卡", "name": "银卡会员", "rank": 1},
    {"code": "金卡", "name": "金卡会员", "rank": 2},
]
RATES = {"kind": "spend_rate", "rate": "1", "category_rates": {"家电": "3"}}
"""1 point per yuan, 3 for appliances."""


def rule(
    code: str, params: Json, *, event_types: tuple[str, ...] = ("order.paid",), **extra: Any
) -> Json:
    """A rule spec as an API body."""
    return {"code": code, "name": code, "event_types": list(event_types), "params": params, **extra}


def order(order_id: str, *lines: tuple[str, str, int]) -> Json:
    """An ``order.paid`` payload of (sku, category, yuan) lines."""
    return {
        "order_id": order_id,
        "lines": [{"sku": s, "category": c, "amount_fen": yuan * 100} for s, c, yuan in lines],
    }


def body(response: Any, status: int) -> Json:
    """The JSON of ``response``, which must have ``status``."""
    assert response.status_code == status, response.text
    result: Json = response.json()
    return result


class Shop:
    """A programme with three members, an operator (maker), a reviewer (checker) and an API
    key with the default permissions."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client = client
        self.db = db
        self.program = new_program(db)
        self.alice, self.bob, self.carol = new_members(db, self.program.id, 3)
        self.operator = support.staff(db, "operator", program_id=self.program.id)
        self.reviewer = support.staff(db, "reviewer", program_id=self.program.id)
        self.key = support.api_key(db, self.program.id)
        self.base = f"/v1/programs/{self.program.code}"

    # ------------------------------------------------------------------ plain HTTP

    def get(self, path: str, headers: support.Headers | None = None, **params: Any) -> Any:
        return self.client.get(self.base + path, params=params, headers=headers or self.operator)

    def write_headers(self, headers: support.Headers | None, language: str | None) -> Any:
        """``headers`` (the operator's by default) with a fresh Idempotency-Key."""
        extra = {"Accept-Language": language} if language else {}
        return {**(headers or self.operator), **support.key(), **extra}

    def post(
        self,
        path: str,
        json: Any = None,
        headers: support.Headers | None = None,
        *,
        language: str | None = None,
    ) -> Any:
        return self.client.post(
            self.base + path, json=json, headers=self.write_headers(headers, language)
        )

    def put(
        self,
        path: str,
        json: Any,
        headers: support.Headers | None = None,
        *,
        language: str | None = None,
    ) -> Any:
        return self.client.put(
            self.base + path, json=json, headers=self.write_headers(headers, language)
        )

    # ------------------------------------------------------------------ rules and approvals

    def draft(self, spec: Json) -> Json:
        return body(self.post("/rules", spec), 201)

    def submit(self, version_id: int, headers: support.Headers | None = None) -> Json:
        """The approval request filed for the version."""
        return body(self.post(f"/rules/{version_id}/submit", {}, headers), 202)

    def decide(
        self,
        approval_id: int,
        verb: str,
        headers: support.Headers | None = None,
        note: str = "checked",
    ) -> Any:
        return self.post(
            f"/approvals/{approval_id}/{verb}", {"note": note}, headers or self.reviewer
        )

    def version(self, version_id: int) -> Json:
        return body(self.get(f"/rules/{version_id}"), 200)

    def activate(self, spec: Json) -> Json:
        """A rule drafted by the operator and approved by the reviewer: live from now."""
        draft = self.draft(spec)
        approval = self.submit(draft["id"])
        body(self.decide(approval["id"], "approve"), 200)
        version = self.version(draft["id"])
        assert version["status"] == "active"
        return version

    def set_caps(self, caps: Json) -> Json:
        """Caps requested by the operator and approved by the reviewer."""
        filed = body(self.put("/earning-caps", caps), 202)
        body(self.decide(filed["id"], "approve"), 200)
        return filed

    # ------------------------------------------------------------------ tiers

    def define_tiers(self) -> None:
        body(self.put("/tiers", {"tiers": TIERS}), 200)

    def set_tier(self, member_id: int, tier: str) -> Json:
        return body(self.put(f"/members/{member_id}/tier", {"tier": tier, "reason": "test"}), 200)

    # ------------------------------------------------------------------ events and points

    def event(
        self,
        member_id: int,
        external_id: str,
        payload: Json,
        type_: str = "order.paid",
        when: datetime | None = None,
    ) -> Json:
        """An event body from the POS."""
        return {
            "source": "pos",
            "external_id": external_id,
            "type": type_,
            "occurred_at": (when or self.db.clock.now()).isoformat(),
            "member_id": member_id,
            "payload": payload,
        }

    def send(self, event: Json, headers: support.Headers | None = None) -> Any:
        """Send one event, by the API key unless told otherwise."""
        return self.post("/events", event, headers or self.key)

    def earn(self, event: Json) -> Json:
        return body(self.send(event), 201)

    def balance(self, member_id: int) -> Json:
        return body(self.get(f"/members/{member_id}/points", self.key), 200)

    def stored_events(self) -> int:
        """How many events the programme holds."""
        return int(
            self.db.run(
                lambda uow: uow.conn.execute(
                    select(func.count())
                    .select_from(events)
                    .where(events.c.program_id == self.program.id)
                ).scalar_one(),
                read_only=True,
            )
        )
