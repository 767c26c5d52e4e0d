"""The four doors (one event per request, a batch, a CSV import, the JetStream worker) end
in the same service: the same events give the same ledger through each, and sending every
event again changes nothing."""

from __future__ import annotations

import csv
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from jifen.api.app import create_app
from jifen.db.uow import Database, UnitOfWork
from jifen.events import stream
from jifen.events.models import events
from jifen.events.schemas import EventIn
from jifen.events.service import order_subject
from jifen.imports import service as imports
from jifen.members import service as members
from jifen.points import service as points
from jifen.programs.schemas import ProgramRead
from jifen.rules import service as rules
from jifen.tiers import service as tiers
from tests.api import support
from tests.api.conftest import api_settings
from tests.conftest import START
from tests.events.test_stream import Names, running, wait_drained
from tests.factories import assert_ledger_sound, new_program
from tests.rules.test_pack import demo_pack

REFS = ["d0", "d1", "d2", "d3", "d4"]
TIERS = ["普通", "银卡", "金卡", "普通", "钻石"]


def the_events() -> list[EventIn]:
    """A week of a small shop: orders of every size, a refund, check-ins, a review, a
    referral; members named by reference, so the same list fits every programme."""
    made: list[dict[str, Any]] = []
    for day in range(7):
        when = START + timedelta(days=day, hours=2)
        for n, ref in enumerate(REFS):
            yuan = [80, 260, 1200, 45, 3000][n] + day * 10
            made.append(
                {
                    "external_id": f"o{day}-{ref}",
                    "type": "order.paid",
                    "member_ref": ref,
                    "occurred_at": when.isoformat(),
                    "payload": {
                        "order_id": f"{day}-{ref}",
                        "pickup": n == day % 5,
                        "lines": [
                            {"sku": "T", "category": "日用品", "amount_fen": yuan * 100},
                            {"sku": "TV", "category": "家电", "amount_fen": yuan * 50},
                        ],
                    },
                }
            )
            made.append(
                {
                    "external_id": f"c{day}-{ref}",
                    "type": "member.checked_in",
                    "member_ref": ref,
                    "occurred_at": when.isoformat(),
                    "payload": {},
                }
            )
    late = (START + timedelta(days=7, hours=3)).isoformat()
    made.append(
        {
            "external_id": "r1",
            "type": "order.refunded",
            "member_ref": "d2",
            "occurred_at": late,
            "payload": {"order_id": "3-d2", "lines": [{"sku": "T", "amount_fen": 50_000}]},
        }
    )
    made.append(
        {
            "external_id": "v1",
            "type": "review.posted",
            "member_ref": "d1",
            "occurred_at": late,
            "payload": {"review_id": "R1", "media": "video"},
        }
    )
    return [EventIn.model_validate({"source": "shop", **e}) for e in made]


def shop(db: Database) -> ProgramRead:
    program = new_program(db)

    def go(uow: UnitOfWork) -> None:
        rules.load_pack(uow, program_id=program.id, pack=demo_pack(), actor="t", activate=True)
        for ref, tier in zip(REFS, TIERS, strict=True):
            member = members.register_member(uow, program_id=program.id, external_ref=ref)
            tiers.set_member_tier(
                uow, program_id=program.id, member_id=member.id, tier=tier, reason="t", set_by="t"
            )

    db.run(go)
    return program


def ledger_of(db: Database, program_id: int) -> dict[str, Any]:
    """Balances by member reference, and points by event."""

    def read(uow: UnitOfWork) -> dict[str, Any]:
        found = {}
        for ref in REFS:
            member = members.find_member(uow, program_id=program_id, external_ref=ref)
            summary = points.balance(uow, member_id=member.id)
            found[ref] = (summary.balance, summary.pending, summary.debt)
        return found

    return db.run(read, read_only=True)


def through_api(
    db: Database, program: ProgramRead, batch: bool, merchant: str | None = None
) -> None:
    key = support.api_key(db, program.id, merchant=merchant)
    base = f"/v1/programs/{program.code}/events"
    with TestClient(create_app(db, api_settings())) as client:
        for _ in range(2):  # everything twice: the second round changes nothing
            payloads = [e.model_dump(mode="json", exclude_none=True) for e in the_events()]
            if batch:
                answer = client.post(
                    f"{base}/batch", json={"events": payloads}, headers={**key, **support.key()}
                )
                assert answer.status_code == 200, answer.text
                assert all(item["ok"] for item in answer.json()["items"]), answer.text
            else:
                for payload in payloads:
                    answer = client.post(base, json=payload, headers={**key, **support.key()})
                    assert answer.status_code == 201, answer.text


def through_csv(
    db: Database, program: ProgramRead, folder: Path, merchant: str | None = None
) -> None:
    path = folder / "events.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "external_id", "type", "occurred_at", "member_ref", "payload"])
        for e in the_events():
            writer.writerow(
                [
                    e.source,
                    e.external_id,
                    e.type,
                    e.occurred_at.isoformat(),
                    e.member_ref,
                    json.dumps(e.payload, ensure_ascii=False),
                ]
            )
    for restart in (False, True):
        report = imports.run_import(
            db, program_id=program.id, kind="events", path=path, batch=7, restart=restart,
            merchant=merchant,
        )  # fmt: skip
        assert report.refused == 0


def through_stream(db: Database, program: ProgramRead, names: Names) -> None:
    with running(db, names):
        for _ in range(2):
            stream.publish_sync(
                names.url,
                program.code,
                the_events(),
                subject_prefix=names.prefix,
                stream=names.stream,
            )
        wait_drained(names)


def test_the_same_events_give_the_same_ledger_through_every_door(
    db: Database, names: Names, tmp_path: Path
) -> None:
    doors = {name: shop(db) for name in ("request", "batch", "csv", "stream")}
    db.clock.set(START + timedelta(days=8))  # type: ignore[attr-defined]  # the week is past
    through_api(db, doors["request"], batch=False)
    through_api(db, doors["batch"], batch=True)
    through_csv(db, doors["csv"], tmp_path)
    through_stream(db, doors["stream"], names)
    ledgers = {name: ledger_of(db, program.id) for name, program in doors.items()}
    assert ledgers["request"]["d2"][0] > 0 and ledgers["request"]["d4"][0] > 0
    assert ledgers["batch"] == ledgers["request"]
    assert ledgers["csv"] == ledgers["request"]
    assert ledgers["stream"] == ledgers["request"]
    for program in doors.values():
        assert_ledger_sound(db, program.id)


def order_subjects(db: Database, program_id: int) -> dict[str, tuple[str | None, str]]:
    """The merchant and subject of each order event of the programme, by external id."""
    query = select(events.c.external_id, events.c.merchant, events.c.subject).where(
        events.c.program_id == program_id,
        events.c.type.in_(("order.paid", "order.refunded")),
    )
    rows = db.run(lambda uow: uow.conn.execute(query).all(), read_only=True)
    return {row.external_id: (row.merchant, row.subject) for row in rows}


def test_every_door_qualifies_an_order_by_the_merchant_it_is_sent_for(
    db: Database, names: Names, tmp_path: Path
) -> None:
    merchant = "mall/7"
    doors = {name: shop(db) for name in ("request", "batch", "csv", "stream")}
    db.clock.set(START + timedelta(days=8))  # type: ignore[attr-defined]  # the week is past
    through_api(db, doors["request"], batch=False, merchant=merchant)
    through_api(db, doors["batch"], batch=True, merchant=merchant)
    through_csv(db, doors["csv"], tmp_path, merchant=merchant)
    through_stream(db, doors["stream"], names)  # a stream sends for no merchant
    wanted = {
        e.external_id: e.payload["order_id"]
        for e in the_events()
        if e.type in ("order.paid", "order.refunded")
    }
    for name, program in doors.items():
        sent_for = None if name == "stream" else merchant
        assert order_subjects(db, program.id) == {
            external_id: (sent_for, order_subject(sent_for, order_id))
            for external_id, order_id in wanted.items()
        }, name
    assert order_subject(merchant, "0-d1") == "mall%2F7/0-d1"
