"""Replacing the installation's secret key: what was stored under the old one is still read
and recognised while it is listed in JIFEN_PREVIOUS_SECRET_KEYS, and `jifen keys rekey`
moves the stored personal data and secrets to the new key so the old one can be retired."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from jifen import crypto
from jifen.api.app import create_app
from jifen.auth import service as auth_service
from jifen.cli import app as cli
from jifen.db.uow import Database
from jifen.errors import IdempotencyConflict, Unauthenticated
from jifen.jobs import service as jobs
from jifen.members.models import members
from jifen.members.service import find_by_phone
from jifen.notify.models import webhook_subscriptions
from jifen.programs.models import programs
from tests.api import support
from tests.api.conftest import api_settings
from tests.events.test_fingerprints import (
    SEAL,
    assert_known_again,
    canonical,
    order_event,
    orders_stored_before,
    program_with_member,
    send,
    store_as,
    stored,
    unkeyed,
)
from tests.factories import new_program, secret_keys

OLD = "the-old-secret-key-" + "o" * 32
NEW = "the-new-secret-key-" + "n" * 32
VALID_ID = "11010519491231002X"
runner = CliRunner()


def rekey(db: Database, *args: str) -> tuple[int, str]:
    url = db.engine.url.render_as_string(hide_password=False)
    result = runner.invoke(cli, ["--database-url", url, "keys", "rekey", *args])
    return result.exit_code, result.output


def stored_fields(db: Database) -> list[Any]:
    return db.run(
        lambda uow: uow.conn.execute(
            select(members.c.phone_hash, members.c.phone_enc, members.c.id_number_enc)
            .where(members.c.phone_enc.is_not(None))
            .order_by(members.c.id)
        ).all()
    )


def test_a_replaced_key_keeps_members_api_keys_sessions_and_answers_until_rekeyed(
    own_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a programme run under the old key: a member with a bound phone and ID number,
    # an API key, a staff session, a webhook and a registration answered under a key
    with secret_keys(monkeypatch, OLD):
        program = new_program(own_database)
        operator = support.staff(own_database, "super_admin")
        till = support.api_key(own_database, program.id)
        base = f"/v1/programs/{program.code}/members"
        registration = {**support.key(), **operator}
        with TestClient(create_app(own_database, api_settings())) as client:
            first = client.post(base, json={"external_ref": "M1"}, headers=registration)
            assert first.status_code == 201, first.text
            member_id = first.json()["id"]
            bound = client.put(
                f"{base}/{member_id}/identity",
                json={"id_number": VALID_ID, "phone": "13900000001"},
                headers={**operator, **support.key()},
            )
            assert bound.status_code == 200, bound.text
            hook = client.post(
                f"/v1/programs/{program.code}/webhooks",
                json={
                    "url": "http://127.0.0.1:9/jifen",
                    "event_types": ["*"],
                    "allow_private": True,
                },
                headers={**operator, **support.key()},
            )
            assert hook.status_code == 201, hook.text
        before = stored_fields(own_database)

    # when the key is replaced, the old one listed as previous
    with secret_keys(monkeypatch, NEW, OLD):
        with TestClient(create_app(own_database, api_settings())) as client:
            # then the session and the API key made under the old key still sign in
            assert client.get(f"{base}/{member_id}", headers=till).status_code == 200
            shown = client.get(f"{base}/{member_id}/identity", headers=operator)
            # and the ID number encrypted under it is still shown in full to those allowed
            assert shown.status_code == 200 and shown.json()["id_number"] == VALID_ID
            # and the registration sent again is replayed, not refused as another request
            again = client.post(base, json={"external_ref": "M1"}, headers=registration)
            assert again.status_code == 201, again.text
            assert again.headers.get("Idempotent-Replayed") == "true"
            # and the phone is found (a second member cannot take it)
            taken = client.post(
                base, json={"external_ref": "M2", "phone": "13900000001"},
                headers={**operator, **support.key()},
            )  # fmt: skip
            assert taken.status_code == 409 and taken.json()["code"] == "duplicate_reference"
        found = own_database.run(
            lambda uow: find_by_phone(uow, program_id=program.id, phone="13900000001")
        )
        assert found == member_id

        # a dry run counts what is still under the old key and changes nothing
        code, output = rekey(own_database, "--dry-run")
        assert code == 0, output
        assert "members: 1 of 1 rows to move" in output
        assert "staff_users: 1 of 1 rows to move" in output
        assert "webhook_subscriptions: 1 of 1 rows to move" in output
        assert stored_fields(own_database) == before
        # the rekey moves them; a second run finds nothing left to move
        code, output = rekey(own_database)
        assert code == 0, output
        assert "members: 1 of 1 rows moved" in output
        after = stored_fields(own_database)
        assert after != before and after[0].phone_hash == crypto.keyed_hash("13900000001")
        code, output = rekey(own_database)
        assert code == 0 and "members: 0 of 1 rows moved" in output, output

    # and once the old key is retired, the moved data is read under the new key alone
    with secret_keys(monkeypatch, NEW):
        with TestClient(create_app(own_database, api_settings())) as client:
            shown = client.get(f"{base}/{member_id}/identity", headers=operator)
            # (the staff session was made under the old key: sessions are hashes only)
            assert shown.status_code == 401
        staff = support.staff(own_database, "super_admin")
        with TestClient(create_app(own_database, api_settings())) as client:
            shown = client.get(f"{base}/{member_id}/identity", headers=staff)
            assert shown.status_code == 200 and shown.json()["phone"] == "13900000001"
        found = own_database.run(
            lambda uow: find_by_phone(uow, program_id=program.id, phone="13900000001")
        )
        assert found == member_id
        secret = own_database.run(
            lambda uow: uow.conn.execute(select(webhook_subscriptions.c.secret_enc)).scalar_one()
        )
        assert crypto.decrypt(secret)  # the webhook's signing secret is readable


def test_an_api_key_made_under_a_previous_key_signs_in(
    own_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with secret_keys(monkeypatch, OLD):
        program = new_program(own_database)
        token = own_database.run(
            lambda uow: (
                auth_service.create_api_key(
                    uow, program_id=program.id, name="till", created_by="test"
                ).token
            )
        )
    with secret_keys(monkeypatch, NEW, OLD):
        principal = own_database.run(lambda uow: auth_service.authenticate(uow, token))
        assert principal.kind == "key"
    # the old key retired: a key hashed under it is unknown
    with secret_keys(monkeypatch, NEW), pytest.raises(Unauthenticated):
        own_database.run(lambda uow: auth_service.authenticate(uow, token))


def test_an_event_stored_under_a_previous_key_is_known_when_sent_again(
    own_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = order_event(own_database)
    with secret_keys(monkeypatch, OLD):
        program_id = program_with_member(own_database)
        first = send(own_database, program_id, event)
    with secret_keys(monkeypatch, NEW, OLD):
        again = send(own_database, program_id, event)
        assert again.replayed and again.id == first.id
        # while another content under the same id is still refused
        changed = event.model_copy(update={"payload": {**event.payload, "order_id": "B2"}})
        with pytest.raises(IdempotencyConflict):
            send(own_database, program_id, changed)


def test_events_and_answers_stored_under_a_previous_key_are_replays_after_the_rekey(
    own_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events and the API's stored answers keep only keyed fingerprints of what was sent,
    which the rekey cannot make anew (the bodies are not kept): sent again after the rekey,
    they are replays while the old key is listed, whichever key sealed an event's
    fingerprint since (the sealing job runs before and after the key is replaced)."""
    db = own_database
    with secret_keys(monkeypatch, OLD):
        program_id = program_with_member(db)
        # given orders stored by the releases before fingerprints were sealed (the unkeyed
        # digest, then the bare keyed one), sealed by the job under the old key
        orders = orders_stored_before(db, program_id)
        assert jobs.run(db, SEAL, program_id=program_id).figures == {"sealed": 3}
        # and two more stored so, left for the job to seal after the key is replaced
        later = [order_event(db, f"o{n}", order_id=f"A{n}") for n in (4, 5)]
        ids = [send(db, program_id, event).id for event in later]
        payloads = [stored(db, event_id).payload for event_id in ids]
        store_as(db, {
            ids[0]: unkeyed(later[0], payloads[0]),
            ids[1]: crypto.event_fingerprint(canonical(later[1], payloads[1])),
        })  # fmt: skip
        orders += list(zip(later, ids, strict=True))
        # and an order stored as this release stores it, sealed
        sent = order_event(db, "o6", order_id="A6")
        orders.append((sent, send(db, program_id, sent).id))
        # and a registration answered under an Idempotency-Key
        program_code = db.run(
            lambda uow: uow.conn.execute(
                select(programs.c.code).where(programs.c.id == program_id)
            ).scalar_one()
        )
        operator = support.staff(db, "super_admin")
        registration = {**support.key(), **operator}
        base = f"/v1/programs/{program_code}/members"
        with TestClient(create_app(db, api_settings())) as client:
            first = client.post(base, json={"external_ref": "R1"}, headers=registration)
            assert first.status_code == 201, first.text

    with secret_keys(monkeypatch, NEW, OLD):
        # when the key is replaced, the rekey run and the job seal what is left
        code, output = rekey(db)
        assert code == 0, output
        assert "events and stored answers" in output, output
        next_night = db.clock.now() + timedelta(days=1)
        assert jobs.run(db, SEAL, program_id=program_id, now=next_night).figures == {"sealed": 2}
        # then each order sent again is a replay, and another content under its id refused
        assert_known_again(db, program_id, orders)
        # and the registration sent again is replayed
        with TestClient(create_app(db, api_settings())) as client:
            again = client.post(base, json={"external_ref": "R1"}, headers=registration)
            assert again.status_code == 201, again.text
            assert again.headers.get("Idempotent-Replayed") == "true"
            other = client.post(base, json={"external_ref": "R2"}, headers=registration)
            assert other.status_code == 409, other.text

    # and the order the job sealed under the new key from the unkeyed digest is known
    # under the new key alone
    with secret_keys(monkeypatch, NEW):
        assert_known_again(db, program_id, [orders[3]])


def _member_with_a_phone(database: Database) -> None:
    """A programme with one member registered over the API with a phone (encrypted and
    hashed under whatever key is current)."""
    program = new_program(database)
    operator = support.staff(database, "operator", program_id=program.id)
    with TestClient(create_app(database, api_settings())) as client:
        made = client.post(
            f"/v1/programs/{program.code}/members",
            json={"external_ref": "P1", "phone": "13900000002"},
            headers={**operator, **support.key()},
        )
        assert made.status_code == 201, made.text


def test_a_field_no_listed_key_can_read_stops_the_rekey_with_what_to_do(
    own_database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with secret_keys(monkeypatch, OLD):
        _member_with_a_phone(own_database)
    with secret_keys(monkeypatch, NEW):  # the old key was not listed
        code, output = rekey(own_database)
    assert code != 0
    assert "JIFEN_PREVIOUS_SECRET_KEYS" in output and "Traceback" not in output


def test_a_rekey_without_a_current_key_stops_rather_than_make_one_and_move_everything_to_it(
    own_database: Database, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """JIFEN_SECRET_KEY forgotten in the rekey's shell, with no key file in the data
    directory: the rekey would make a key there and move every field to it, a key no server
    has. It stops instead, saying to set the key, and changes nothing."""
    with secret_keys(monkeypatch, OLD):
        _member_with_a_phone(own_database)
        before = stored_fields(own_database)
    with secret_keys(monkeypatch, "", OLD):
        monkeypatch.setenv("JIFEN_DATA_DIR", str(tmp_path / "data"))
        for args in ((), ("--dry-run",)):
            code, output = rekey(own_database, *args)
            assert code == 2, output
            assert "JIFEN_SECRET_KEY" in output and "Traceback" not in output
    assert not (tmp_path / "data" / "secret.key").exists()
    assert stored_fields(own_database) == before
