"""Sign-in credentials for the demo: one staff user per built-in role, one member and one
merchant API key, made once and kept in ``<data dir>/demo-credentials.json`` (mode 0600)
so that ``jifen demo`` can print them again. Passwords and keys are random per installation:
the database holds only their hashes, which is why the file keeps the plain ones."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from jifen.auth import service as auth_service
from jifen.auth.core import BUILTIN_ROLES
from jifen.db.uow import Database, UnitOfWork
from jifen.members import service as members_service
from jifen.programs import service as programs

DEMO_MEMBER_REF = "M000001"
DEMO_MERCHANT = "demo-store"


@dataclass(frozen=True)
class Credential:
    """One way into the demo."""

    who: str
    """``staff:<role>``, ``member`` or ``api_key``."""
    login: str
    password: str = ""
    totp_secret: str = ""
    token: str = ""


def _file(data_dir: Path, code: str) -> Path:
    return data_dir / f"{code}-credentials.json"


def load(data_dir: Path, code: str) -> list[Credential] | None:
    path = _file(data_dir, code)
    if not path.exists():
        return None
    try:
        return [Credential(**item) for item in json.loads(path.read_text())]
    except (ValueError, TypeError):  # damaged or from another version: made again
        return None


def _valid(uow: UnitOfWork, made: list[Credential]) -> bool:
    """Whether the kept credentials still sign in to this database (it may have been
    rebuilt, or be another one)."""
    for item in made:
        if item.who.startswith("staff:") and not auth_service.password_of_staff_matches(
            uow, username=item.login, password=item.password
        ):
            return False
    return True


def ensure(db: Database, *, data_dir: Path, code: str) -> list[Credential]:
    """The demo's credentials: read from their file if they still work, or made (again) and
    written to it."""
    existing = load(data_dir, code)
    if existing is not None and db.run(lambda uow: _valid(uow, existing), read_only=True):
        return existing

    def create(uow: UnitOfWork) -> list[Credential]:
        program = programs.get_program(uow, code=code)
        auth_service.sync_builtin_roles(uow)
        made: list[Credential] = []
        for role in BUILTIN_ROLES:
            username = f"{code}-{role.replace('_', '-')}"
            password = secrets.token_urlsafe(9)
            seed = auth_service.reset_staff_secrets(uow, username=username, password=password)
            if seed is None:
                created = auth_service.create_staff(
                    uow,
                    username=username,
                    password=password,
                    roles_in=[(role, program.id if role != "super_admin" else None)],
                )
                seed = created.totp_secret
            made.append(
                Credential(who=f"staff:{role}", login=username, password=password, totp_secret=seed)
            )
        member = members_service.find_member(
            uow, program_id=program.id, external_ref=DEMO_MEMBER_REF
        )
        member_password = secrets.token_urlsafe(9)
        auth_service.set_member_password(uow, member_id=member.id, password=member_password)
        made.append(Credential(who="member", login=DEMO_MEMBER_REF, password=member_password))
        key = auth_service.create_api_key(
            uow, program_id=program.id, name="demo store POS", created_by="jifen demo",
            merchant=DEMO_MERCHANT,
        )  # fmt: skip
        made.append(Credential(who="api_key", login=key.prefix, token=key.token))
        return made

    made = db.run(create)
    path = _file(data_dir, code)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump([asdict(item) for item in made], file, ensure_ascii=False, indent=2)
    return made
