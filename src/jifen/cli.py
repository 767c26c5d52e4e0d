"""The ``jifen`` command: schema, ledger checks and the demo programme.

Every command is a thin adapter: parse, open a :class:`Database`, call a service, print.
A :class:`JifenError` becomes one line ``error[<code>]: <message>`` and exit status 2;
an unreachable database likewise, never a traceback.

The module itself imports only what every command needs (Typer, Rich's console, the
settings): each command imports the services, the database layer and the libraries it uses
when it runs, so that ``jifen --help``, ``jifen totp`` and a cron job's start do not load
FastAPI, Alembic, NATS and every domain service first. A type named in a command's
parameters is read by Typer as the module is imported, so it must stay a light one.
"""

from __future__ import annotations

import copy
import gc
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import typer
from pydantic import ValidationError
from rich.console import Console

from jifen.clock import EARLIEST, LATEST
from jifen.demo import DAYS as DEMO_DAYS
from jifen.errors import JifenError, field_problem, invalid_field
from jifen.imports import BATCH as IMPORT_BATCH
from jifen.settings import Settings, get_settings, normalise_database_url, secret_key

if TYPE_CHECKING:
    from jifen.db.uow import Database, UnitOfWork
    from jifen.demo.credentials import Credential
    from jifen.imports.core import Kind
    from jifen.points.integrity import Problem
    from jifen.rewards.schemas import HoldsReport


def _chinese(language: str) -> bool:
    """Whether a ``JIFEN_LANGUAGE`` (``zh``, ``zh-CN``, ``en`` …) asks for Chinese."""
    return language.lower().startswith("zh")


def _help_in_chinese() -> bool:
    """The language of the ``--help`` texts, decided once as the module is imported (Typer
    reads them then). Read without filling :func:`get_settings`' cache, so that importing
    the module fixes nothing for later; an environment jifen cannot read (a malformed
    ``JIFEN_`` variable, an unreadable ``.env``) must still let ``--help`` print, in
    English: the commands themselves say what is wrong with it."""
    try:
        return _chinese(Settings().language)
    except Exception:  # whatever it is, --help must print
        return False


_HELP_IN_CHINESE = _help_in_chinese()


def _h(en: str, zh: str) -> str:
    """A ``--help`` text in the language ``JIFEN_LANGUAGE`` asked for at import."""
    return zh if _HELP_IN_CHINESE else en


_HELP_LAYOUT: Literal["rich"] | None = None if _HELP_IN_CHINESE else "rich"
"""Rich's help tables break a line only at a space and cut a longer run short with "…",
which is most of a Chinese sentence: Chinese help takes Click's plain layout, which keeps
every word (a line too long for the terminal wraps there)."""


app = typer.Typer(
    help=_h(
        "jifen (积分): a membership loyalty points platform with an exact ledger.",
        "jifen(积分):会员积分平台,账本精确无误。",
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=_HELP_LAYOUT,
)
db_app = typer.Typer(
    help=_h("Create and migrate the database schema.", "创建并迁移数据库结构。"),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
ledger_app = typer.Typer(
    help=_h(
        "Prove the ledger: verify, reconcile, checkpoint.",
        "核验账本:verify 校验、reconcile 对账、checkpoint 设检查点。",
    ),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(db_app, name="db")
app.add_typer(ledger_app, name="ledger")

# soft_wrap: a long line (a problem naming a posting, an error) stays one line for grep.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _State:
    given_database_url: str | None = None
    """``--database-url`` (or ``JIFEN_DATABASE_URL``) as the command line gave it."""

    @property
    def database_url(self) -> str:
        """The database the command works on, worked out when a command first asks, not in
        the callback: Click runs that before it reads a subcommand's ``--help``, which must
        print even where the settings cannot be read."""
        # A plain postgresql:// or postgres:// URL means psycopg 3, as in JIFEN_DATABASE_URL.
        if self.given_database_url:
            return normalise_database_url(self.given_database_url)
        return get_settings().resolved_database_url()


state = _State()

HostOption = Annotated[str, typer.Option(help=_h("Address to listen on.", "监听地址。"))]
PortOption = Annotated[
    int, typer.Option(min=1, max=65535, help=_h("Port to listen on.", "监听端口。"))
]


@app.callback()
def _options(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="JIFEN_DATABASE_URL",
            help=_h(
                "SQLAlchemy URL; default: the embedded SQLite file in JIFEN_DATA_DIR.",
                "SQLAlchemy 数据库地址;默认:JIFEN_DATA_DIR 中内置的 SQLite 文件。",
            ),
        ),
    ] = None,
) -> None:
    state.given_database_url = database_url


def _say(en: str, zh: str) -> str:
    """The CLI's own words in the configured language (``JIFEN_LANGUAGE``)."""
    return zh if _chinese(get_settings().language) else en


def fail(code: str, message: str) -> typer.Exit:
    err.print(f"error[{code}]: {message}", markup=False)
    return typer.Exit(2)


@contextmanager
def _boundary() -> Iterator[None]:
    """Turn jifen's errors and an unusable database into one line and exit status 2."""
    import psycopg  # loaded already: only the commands that use a database come here
    from sqlalchemy.exc import DatabaseError, OperationalError

    try:
        yield
    except JifenError as exc:
        raise fail(exc.code, exc.message(get_settings().language)) from None
    except (DatabaseError, psycopg.OperationalError) as exc:
        orig = exc.orig if isinstance(exc, DatabaseError) else exc
        reason = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        # Only what says "this is not a database you can use" is the operator's to fix; any
        # other database error is a bug and keeps its traceback.
        if not isinstance(exc, OperationalError | psycopg.OperationalError) and (
            "not a database" not in reason
        ):
            raise
        raise fail(
            "database_unreachable",
            _say(
                f"cannot use the database at {_safe(state.database_url)}: {reason}. "
                "Check --database-url / JIFEN_DATABASE_URL and that the server is running.",
                f"无法使用数据库 {_safe(state.database_url)}:{reason}。"
                "请检查 --database-url / JIFEN_DATABASE_URL,并确认数据库服务正在运行。",
            ),
        ) from None


@contextmanager
def _database(*, create: bool = False) -> Iterator[Database]:
    """The configured database; an SQLite file that is not there is made only where
    ``create`` says (the commands that make a database), and refused elsewhere: a mistyped
    path should not leave an empty database behind."""
    with _boundary():
        if not create:
            _require_file(state.database_url)
        database = _open(state.database_url)
        try:
            yield database
        finally:
            database.dispose()


def _require_file(url: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return  # _open says what is wrong with it
    path = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if not path or path == ":memory:" or path.startswith("file:") or Path(path).exists():
        return
    raise fail(
        "no_database",
        _say(f"there is no database at {path}: check --database-url (or JIFEN_DATABASE_URL), "
             f"or create one there with `jifen db upgrade`",
             f"{path} 处没有数据库:请检查 --database-url(或 JIFEN_DATABASE_URL),"
             f"或用 `jifen db upgrade` 在该处创建"),
    )  # fmt: skip


def _open(url: str) -> Database:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from jifen.db.uow import Database

    try:
        backend = make_url(url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ArgumentError(f"jifen runs on SQLite or PostgreSQL, not {backend}")
        return Database(url, pool_size=2)
    except (
        ArgumentError,
        ValueError,
        ImportError,
    ) as exc:  # unparsable, unknown dialect, no driver
        raise fail(
            "invalid_database_url",
            _say(
                f"{_safe(url)!r} is not a database URL jifen can use ({exc}). Give "
                "sqlite:///path/to/file.db or postgresql://user@host/database.",
                f"{_safe(url)!r} 不是 jifen 可用的数据库地址({exc})。"
                "请使用 sqlite:///path/to/file.db 或 postgresql://user@host/database。",
            ),
        ) from None
    except OSError as exc:  # the SQLite file's folder cannot be created
        raise fail(
            "database_unreachable",
            _say(
                f"cannot create the database at {_safe(url)}: {exc.strerror or exc}. "
                "Set JIFEN_DATA_DIR to a writable folder or give --database-url.",
                f"无法在 {_safe(url)} 创建数据库:{exc.strerror or exc}。"
                "请将 JIFEN_DATA_DIR 设为可写目录,或指定 --database-url。",
            ),
        ) from None


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: still never show what may be a password
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _program_id(database: Database, code: str | None) -> int | None:
    from jifen.programs import service as programs

    if code is None:
        return None
    return database.run(lambda uow: programs.get_program(uow, code=code).id, read_only=True)


def _refuse_unknown_schema(database: Database) -> None:
    """Stop where the schema was written by a newer jifen: this one must not touch it."""
    from jifen.db import migrate

    unknown = migrate.unknown_revision(database.engine)
    if unknown is not None:
        raise fail(
            "schema_unknown",
            _say(f"the database schema is at revision {unknown}, which this jifen does not "
                 f"know: a newer jifen wrote it. Use that version (or a newer one) with it",
                 f"数据库结构的版本为 {unknown},本 jifen 无法识别:它由更新版本的 jifen 写入,"
                 f"请使用该版本(或更新版本)"),
        )  # fmt: skip


def _warn_without_autovacuum(database: Database) -> None:
    """Say so where PostgreSQL's autovacuum is off: nothing would then clear the dead row
    versions every posting leaves, nor refresh the statistics the planner picks its plans
    by, and jifen would slow down week by week."""
    from sqlalchemy import text

    if database.dialect != "postgresql":
        return
    with database.engine.connect() as conn:
        if conn.execute(text("SHOW autovacuum")).scalar_one() == "on":
            return
    err.print(
        _say(
            "warning: autovacuum is off on this PostgreSQL server. Nothing clears the dead "
            "row versions each posting leaves or refreshes the planner's statistics, so jifen "
            "slows down as it is used: turn autovacuum on (autovacuum = on in "
            "postgresql.conf), or run VACUUM ANALYZE regularly.",
            "警告:此 PostgreSQL 服务器关闭了 autovacuum。每次记账留下的旧行版本不会被清理,"
            "查询规划所依据的统计信息也不会更新,jifen 会越用越慢:请开启 autovacuum"
            "(在 postgresql.conf 中设 autovacuum = on),或定期运行 VACUUM ANALYZE。",
        ),
        markup=False,
    )


def _require_schema(database: Database) -> None:
    from jifen.db import migrate

    _refuse_unknown_schema(database)
    if not migrate.is_current(database.engine):
        raise fail(
            "schema_not_current",
            _say(
                "the database schema is missing or out of date; run `jifen db upgrade` first.",
                "数据库结构不存在或不是最新;请先运行 `jifen db upgrade`。",
            ),
        )


# --------------------------------------------------------------------------- db


@db_app.command(
    "upgrade",
    help=_h(
        "Create the schema, or bring it up to the newest revision.",
        "创建数据库结构,或将其升级到最新版本。",
    ),
)
def db_upgrade() -> None:
    from jifen.db import migrate

    with _database(create=True) as database:
        _refuse_unknown_schema(database)
        migrate.upgrade(database.engine)
        revision = migrate.current_revision(database.engine)
        out.print(_say(f"schema at revision {revision}", f"数据库结构已是版本 {revision}"))
        _warn_without_autovacuum(database)


@db_app.command(
    "current",
    help=_h(
        "Show the schema revision in use and the newest one.",
        "显示数据库结构当前所用的版本和最新版本。",
    ),
)
def db_current() -> None:
    from jifen.db import migrate

    with _database() as database:
        _refuse_unknown_schema(database)
        current, head = (
            migrate.current_revision(database.engine),
            migrate.head_revision(database.engine),
        )
        out.print(
            _say(f"current: {current or '(empty database)'}  newest: {head}",
                 f"当前:{current or '(空数据库)'}  最新:{head}")
        )  # fmt: skip
        if current != head:  # exit 1, so scripts and health checks can tell
            out.print(_say("run `jifen db upgrade` to migrate", "请运行 `jifen db upgrade` 迁移"))
            raise typer.Exit(1)


# --------------------------------------------------------------------------- ledger

ProgramOption = Annotated[
    str | None,
    typer.Option(
        "--program",
        help=_h("Programme code; default: every programme.", "计划代码;默认:所有计划。"),
    ),
]
RootOption = Annotated[
    str | None,
    typer.Option(
        help=_h(
            "A root hash a checkpoint printed, kept outside the database: a history rewritten "
            "since, checkpoints and all, no longer has it.",
            "检查点打印并保存在数据库之外的根哈希:此后历史连同检查点被整体改写,"
            "就不再有这个根哈希。",
        ),
        show_default=False,
    ),
]


def _print_problems(problems: list[Problem]) -> None:
    # One line each, never wrapped, each naming its posting or account: grep-able.
    for problem in problems:
        out.print(f"  PROBLEM {problem}", markup=False)


@ledger_app.command(
    "verify",
    help=_h(
        "Recompute every posting digest and hash chain, and check the checkpoints.",
        "重新计算每笔记录的摘要与哈希链,并核对检查点。",
    ),
)
def ledger_verify(program: ProgramOption = None, root: RootOption = None) -> None:
    from jifen.points import integrity

    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        report = database.run(
            lambda uow: integrity.verify(uow, program_id=program_id, kept_root=root),
            read_only=True,
        )
    out.print(
        _say(f"verified {report.postings} postings, {report.accounts} member accounts, "
             f"{report.checkpoints} checkpoints",
             f"已校验 {report.postings} 笔记录、{report.accounts} 个会员账户、"
             f"{report.checkpoints} 个检查点")
    )  # fmt: skip
    _print_problems(report.problems)
    if not report.ok:
        out.print(
            _say(
                f"{len(report.problems)} problem(s): the ledger was changed outside jifen",
                f"{len(report.problems)} 个问题:账本在 jifen 之外被改动过",
            )
        )
        raise typer.Exit(1)
    out.print(_say("ok: every posting is as it was written", "ok:每笔记录都与写入时一致"))


@ledger_app.command(
    "reconcile",
    help=_h(
        "Recompute balances, lots, frozen and debt from the lines; report every difference.",
        "根据分录重新计算余额、批次、冻结积分和欠分;报告每一处差异。",
    ),
)
def ledger_reconcile(program: ProgramOption = None) -> None:
    from rich.table import Column, Table

    from jifen.points import integrity

    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        report = database.run(
            lambda uow: integrity.reconcile(uow, program_id=program_id), read_only=True
        )
    table = Table(
        "account", Column("balance", justify="right"), title="system accounts (from their lines)"
    )
    for code, amount in sorted(report.system_balances.items()):
        table.add_row(code, f"{amount:,}")
    table.add_row("members (all)", f"{report.member_total:,}")
    out.print(table, soft_wrap=False)  # tables lay themselves out
    total = report.member_total + sum(report.system_balances.values())
    out.print(
        _say(f"{report.accounts} member accounts, {report.lots} lots; programme total {total}",
             f"{report.accounts} 个会员账户、{report.lots} 个积分批次;计划合计 {total}")
    )  # fmt: skip
    _print_problems(report.problems)
    if not report.ok:
        out.print(_say(f"{len(report.problems)} difference(s)", f"{len(report.problems)} 处差异"))
        raise typer.Exit(1)
    out.print(
        _say("ok: every balance equals its lines and its lots", "ok:每个余额都等于其分录与批次")
    )


@ledger_app.command(
    "checkpoint",
    help=_h(
        "Seal every member account's chain head; keep the printed root hash outside the database.",
        "封存每个会员账户的链头;请把打印出的根哈希保存在数据库之外。",
    ),
)
def ledger_checkpoint(
    program: Annotated[str, typer.Option("--program", help=_h("Programme code.", "计划代码。"))],
) -> None:
    from jifen.points import integrity
    from jifen.programs import service as programs

    with _database() as database:
        _require_schema(database)

        def seal(uow: UnitOfWork) -> tuple[int, str]:
            program_id = programs.get_program(uow, code=program).id
            return integrity.checkpoint(uow, program_id=program_id)

        checkpoint_id, root = database.run(seal)
    _print_checkpoint(checkpoint_id, root, "ledger")


def _print_checkpoint(checkpoint_id: int, root: str, of: str) -> None:
    """A checkpoint's root, and where to keep it: ``jifen <of> verify --root`` finds a
    history rewritten since, checkpoints and all, only against a copy outside the database."""
    out.print(_say(f"checkpoint {checkpoint_id}: {root}", f"检查点 {checkpoint_id}:{root}"))
    out.print(
        _say(
            "keep this root hash somewhere outside the database (a ticket, a log, a notebook): "
            f"`jifen {of} verify --root` then finds a history rewritten since, checkpoints "
            "and all",
            "请把该根哈希保存在数据库之外(工单、日志或笔记本):"
            f"之后 `jifen {of} verify --root` 可发现此后连同检查点被整体改写的历史",
        )
    )


# --------------------------------------------------------------------------- audit

audit_app = typer.Typer(
    help=_h(
        "Prove the audit log: verify its hash chains, checkpoint them.",
        "核验审计日志:校验其哈希链、设检查点。",
    ),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(audit_app, name="audit")


@audit_app.command(
    "verify",
    help=_h(
        "Recompute every audit entry's hash and follow each chain to its head.",
        "重新计算每条审计记录的哈希,并沿每条链核对到链头。",
    ),
)
def audit_verify(root: RootOption = None) -> None:
    from jifen.audit import service as audit_service  # only this command needs it

    with _database() as database:
        _require_schema(database)
        with audit_service.snapshot(database) as uow:
            report = audit_service.verify_report(uow, kept_root=root)
    language = get_settings().language
    # One line each, never wrapped, each naming its entry or stripe: grep-able.
    for problem in report.problems:
        out.print(f"  PROBLEM {problem.message(language)}", markup=False)
    if not report.ok:
        out.print(
            _say(
                f"{len(report.problems)} problem(s) in {report.entries} entries: the audit log "
                "was changed outside jifen",
                f"{report.entries} 条记录中有 {len(report.problems)} 个问题:"
                "审计日志在 jifen 之外被改动过",
            )
        )
        raise typer.Exit(1)
    out.print(
        _say(
            f"audit log verified: {report.entries} entries in {report.chains} chains, "
            f"{report.checkpoints} checkpoints",
            f"审计日志已验证:{report.chains} 条链,共 {report.entries} 条记录,"
            f"{report.checkpoints} 个检查点",
        )
    )


@audit_app.command(
    "checkpoint",
    help=_h(
        "Seal every chain's head under one root hash; keep the printed root outside the "
        "database and give it to `jifen audit verify --root`.",
        "把每条链的链头封存为一个根哈希;请把打印的根哈希保存在数据库之外,"
        "并交给 `jifen audit verify --root` 核对。",
    ),
)
def audit_checkpoint() -> None:
    from jifen.audit import service as audit_service  # only this command needs it

    with _database() as database:
        _require_schema(database)
        checkpoint_id, root = database.run(audit_service.checkpoint)
    _print_checkpoint(checkpoint_id, root, "audit")


DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help=_h("Report what would change; change nothing.", "只报告将有何变化,不做任何更改。"),
    ),
]


# --------------------------------------------------------------------------- keys

keys_app = typer.Typer(
    help=_h(
        "The installation's secret key: move what is stored under a replaced key to the "
        "current one.",
        "系统密钥:把仍在旧密钥下保存的数据迁移到当前密钥。",
    ),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(keys_app, name="keys")

REKEY_CHUNK = 500
"""Rows moved to the current key a transaction."""


def _encrypted_fields() -> list[Any]:
    """Every table holding fields encrypted (or hashed for lookup) under the secret key."""
    from jifen.auth.models import staff_users
    from jifen.db.rekey import Encrypted
    from jifen.members.models import members
    from jifen.notify.models import outbox, webhook_subscriptions

    return [
        Encrypted(members, {"phone_enc": "phone_hash", "id_number_enc": "id_number_hash"}),
        Encrypted(staff_users, {"totp_secret_enc": None}),
        Encrypted(webhook_subscriptions, {"secret_enc": None, "previous_secret_enc": None}),
        Encrypted(outbox, {"address_enc": None}),
    ]


def _require_current_key() -> None:
    """Stop a rekey that has no current key to move to: without JIFEN_SECRET_KEY and a key
    file in the data directory, one would be made there now, a key no server uses, and
    every field moved to it (unreadable to the server until that file is found and listed)."""
    settings = get_settings()
    if settings.secret_key or (settings.data_dir / "secret.key").exists():
        return
    raise fail(
        "no_secret_key",
        _say(
            f"JIFEN_SECRET_KEY is not set and {settings.data_dir} holds no key file: there is "
            "no current key to move the fields to. Set JIFEN_SECRET_KEY to the key the server "
            "now uses (and JIFEN_DATA_DIR as the server has it) and run again",
            f"未设置 JIFEN_SECRET_KEY,{settings.data_dir} 中也没有密钥文件:没有可迁移到的当前"
            "密钥。请把 JIFEN_SECRET_KEY 设为服务器现用的密钥(JIFEN_DATA_DIR 与服务器一致)后"
            "重新运行",
        ),
    )


@keys_app.command(
    "rekey",
    help=_h(
        "After JIFEN_SECRET_KEY was replaced, with the old key in JIFEN_PREVIOUS_SECRET_KEYS: "
        "encrypt and hash anew under the current key the phone and ID numbers, TOTP seeds, "
        "webhook secrets and outbox addresses still under an old key. Safe to run again; "
        "--dry-run counts them and changes nothing. API keys, sessions and one-time codes are "
        "kept as hashes only, and events and stored answers (Idempotency-Key) keep only "
        "fingerprints of what was sent: they are recognised under an old key while it stays "
        "listed (an event or request sent again is a replay, not a conflict).",
        "更换 JIFEN_SECRET_KEY 并把旧密钥写入 JIFEN_PREVIOUS_SECRET_KEYS 之后:把仍在旧密钥下"
        "加密或哈希的手机号、证件号、动态码种子、Webhook 密钥和发件箱地址改用当前密钥重新加密和"
        "哈希。可重复运行;--dry-run 只统计、不改动。API 密钥、会话和一次性验证码只保存哈希,"
        "事件和已存应答(Idempotency-Key)只保存所发内容的指纹:旧密钥仍列出时,它们照常可用"
        "(再次发送的事件或请求按重放处理,而非冲突)。",
    ),
)
def keys_rekey(
    dry_run: DryRun = False,
) -> None:
    from jifen import crypto
    from jifen.db.rekey import rekey

    _require_current_key()
    with _database() as database:
        _require_schema(database)
        total = 0
        for fields in _encrypted_fields():
            name, cursor, rows, moved = fields.table.name, 0, 0, 0
            while True:
                try:
                    chunk = database.run(partial(rekey, fields=fields, after_id=cursor,
                                                 limit=REKEY_CHUNK, dry_run=dry_run))  # fmt: skip
                except ValueError:
                    raise fail(
                        "unreadable_field",
                        _say(
                            f"a field of {name} after id {cursor} cannot be read with "
                            "JIFEN_SECRET_KEY or any key in JIFEN_PREVIOUS_SECRET_KEYS; add "
                            f"the key it was encrypted with and run again ({rows} rows of "
                            f"{name} were done)",
                            f"{name} 中 id {cursor} 之后的某个字段无法用 JIFEN_SECRET_KEY 或 "
                            "JIFEN_PREVIOUS_SECRET_KEYS 中的任何密钥读取;请加入加密它时所用的"
                            f"密钥后重新运行(已处理 {name} 的 {rows} 行)",
                        ),
                    ) from None
                rows, moved = rows + chunk.rows, moved + chunk.moved
                if chunk.last_id is None or chunk.rows < REKEY_CHUNK:
                    break
                cursor = chunk.last_id
            total += moved
            out.print(
                _say(
                    f"{name}: {moved:,} of {rows:,} rows "
                    + ("to move" if dry_run else "moved")
                    + " to the current key",
                    f"{name}:{rows:,} 行中有 {moved:,} 行"
                    + ("待迁移" if dry_run else "已迁移")
                    + "到当前密钥",
                ),
                markup=False,
            )
        if crypto.rotating():
            out.print(
                _say(
                    "events and stored answers (Idempotency-Key) keep only keyed fingerprints "
                    "of what was sent, which cannot be made anew without it: those stored "
                    "under a previous key are recognised when sent again (a replay, not a "
                    "conflict) while that key stays in JIFEN_PREVIOUS_SECRET_KEYS, as API "
                    "keys, sessions and one-time codes are",
                    "事件和已存应答(Idempotency-Key)只保存所发内容的带密钥指纹,没有原文无法"
                    "重新生成:在旧密钥下保存的,只要该密钥仍在 JIFEN_PREVIOUS_SECRET_KEYS 中,"
                    "再次发送时仍按重放处理(而非冲突),API 密钥、会话和一次性验证码也是如此",
                ),
                markup=False,
            )
        elif total == 0:
            out.print(
                _say(
                    "no previous key is configured (JIFEN_PREVIOUS_SECRET_KEYS): "
                    "everything is under the current key",
                    "未配置旧密钥(JIFEN_PREVIOUS_SECRET_KEYS):所有数据都在当前密钥下",
                ),
                markup=False,
            )


# --------------------------------------------------------------------------- demo


@app.command(
    "demo",
    help=_h(
        "Build the demo programme (a year of history unless --days says otherwise) on the "
        "embedded database, print its summary and sign-in credentials, and serve the API on "
        "it until interrupted.\n\n"
        "If it exists already, only its summary is printed.",
        "在内置数据库上生成示例计划(默认一年的积分记录,可用 --days 指定天数),"
        "打印其摘要和登录凭据,并在其上提供 API 服务,直到被中断。\n\n"
        "示例计划已存在时,只打印其摘要。",
    ),
)
def demo(
    members: Annotated[
        int,
        typer.Option(min=1, max=100_000, help=_h("Members to create.", "要创建的会员数。")),
    ] = 2000,
    seed: Annotated[
        int,
        typer.Option(help=_h("Seed of the generated history.", "生成历史记录所用的随机种子。")),
    ] = 7,
    days: Annotated[
        int,
        typer.Option(
            min=1,
            max=3660,
            help=_h(
                "Days of history to generate, ending now (a year by default; fewer build faster).",
                "要生成的历史天数,截至当前(默认一年;天数越少生成越快)。",
            ),
        ),
    ] = DEMO_DAYS,
    reset: Annotated[
        bool,
        typer.Option(
            "--reset",
            help=_h(
                "Delete the embedded SQLite database and build it again (refused where it "
                "holds any other programme than the demo).",
                "删除内置的 SQLite 数据库并重新生成(其中有示例以外的计划时拒绝)。",
            ),
        ),
    ] = False,
    serve_api: Annotated[
        bool,
        typer.Option(
            "--serve/--no-serve",
            help=_h("Serve the API on the demo afterwards.", "生成后在示例数据上提供 API 服务。"),
        ),
    ] = True,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
) -> None:
    from jifen.db import migrate
    from jifen.demo import credentials
    from jifen.demo import service as demo_service

    with _boundary():
        if reset:
            demo_service.reset_sqlite(state.database_url)
    with _database(create=True) as database:
        _refuse_unknown_schema(database)
        migrate.upgrade(database.engine)
        if demo_service.exists(database):
            out.print(
                _say(
                    "the demo programme exists already; its summary follows "
                    "(`jifen demo --reset` builds it again)",
                    "示例计划已存在,以下是其摘要(`jifen demo --reset` 可重新生成)",
                )
            )
        else:
            demo_service.refuse_beside_other_programmes(database)
            _require_secret_key()
            started = time.perf_counter()  # elapsed time for the operator, not ledger time
            _build_demo(database, members=members, seed=seed, days=days)
            took = time.perf_counter() - started
            out.print(
                _say(
                    f"built {members:,} members and {_history_en(days)} in {took:.1f} s",
                    f"已生成 {members:,} 名会员及{_history_zh(days)},用时 {took:.1f} 秒",
                )
            )
        summary = demo_service.summary(database)
    demo_service.print_summary(summary, out, chinese=_chinese(get_settings().language))
    if not (summary.ok and summary.complete):
        raise typer.Exit(1)
    with _database() as database:
        made = credentials.ensure(
            database, data_dir=get_settings().data_dir, code=demo_service.DEMO_CODE
        )
    _print_credentials(made, f"http://{host}:{port}")
    if serve_api:
        _serve(host=host, port=port, workers=1, log_level="warning")


def _print_credentials(made: list[Credential], base: str) -> None:
    # Plain lines, not a table: a token must stay whole for copying, at any width.
    out.print(_say("demo credentials (who, sign in as, password or token, TOTP seed):",
                   "示例账户(身份、登录名、密码或令牌、动态码种子):"))  # fmt: skip
    for item in made:
        fields = [item.who, item.login, item.password or item.token, item.totp_secret]
        out.print("  " + "  ".join(field for field in fields if field), markup=False)
    out.print(
        _say(
            f"API: {base}/docs — staff whose role can write also give a TOTP code "
            "(`jifen totp SEED` prints the current one); kept in "
            f"{get_settings().data_dir}.",
            f"API:{base}/docs —— 可写角色的员工登录还需动态验证码"
            f"(`jifen totp 种子` 显示当前验证码);账户信息保存在 {get_settings().data_dir}。",
        ),
        markup=False,
    )


# --------------------------------------------------------------------------- serve


LOG_EVERY = 10.0
"""Seconds between the progress lines of a long command whose output is not a terminal."""

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@app.command(
    "serve",
    help=_h(
        "Serve the HTTP API (OpenAPI document at /openapi.json, docs at /docs).",
        "提供 HTTP API 服务(OpenAPI 文档在 /openapi.json,说明文档在 /docs)。",
    ),
)
def serve(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help=_h("Worker processes.", "工作进程数。"))
    ] = 1,
    log_level: Annotated[
        str,
        typer.Option(
            help=_h(
                f"uvicorn's log level: {', '.join(LOG_LEVELS)}.",
                f"uvicorn 的日志级别:{', '.join(LOG_LEVELS)}。",
            )
        ),
    ] = "info",
) -> None:
    if log_level.lower() not in LOG_LEVELS:
        raise fail(
            "invalid_input",
            _say(f"--log-level: give one of {', '.join(LOG_LEVELS)}",
                 f"--log-level:请从 {'、'.join(LOG_LEVELS)} 中选一个"),
        )  # fmt: skip
    with _database() as database:
        _require_schema(database)
        _warn_without_autovacuum(database)
    _serve(host=host, port=port, workers=workers, log_level=log_level)


def _require_secret_key() -> None:
    """Make (or read) the installation's secret key before a command that needs it starts
    (to key what it stores), so that a data directory jifen cannot write to stops it in
    one line rather than part-way through."""
    try:
        secret_key(get_settings())
    except OSError as exc:
        raise fail(
            "no_secret_key",
            _say(
                f"cannot keep the secret key in {get_settings().data_dir} ({exc.strerror}): "
                f"set JIFEN_SECRET_KEY, or JIFEN_DATA_DIR to a folder jifen can write to",
                f"无法在 {get_settings().data_dir} 保存密钥({exc.strerror}):请设置 "
                f"JIFEN_SECRET_KEY,或把 JIFEN_DATA_DIR 设为 jifen 可写入的文件夹",
            ),
        ) from None


def _serve(*, host: str, port: int, workers: int, log_level: str) -> None:
    # The app reads its settings from the environment, in this process (one worker) or in
    # each worker process: the URL given on the command line goes there first.
    os.environ["JIFEN_DATABASE_URL"] = state.database_url
    get_settings.cache_clear()
    # Made once here, before any worker starts, so every worker reads the same key.
    _require_secret_key()
    import uvicorn

    out.print(
        _say(
            f"jifen API on http://{host}:{port} (docs: /docs); Ctrl+C stops it",
            f"jifen API 运行于 http://{host}:{port}(文档:/docs);按 Ctrl+C 停止",
        ),
        markup=False,
    )
    uvicorn.run(
        "jifen.api.app:app_from_settings",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=_log_config(),
    )


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, plus jifen's own loggers at INFO (the built-in SMS provider's
    messages among them) through the same handler. (The access log's query values are
    hidden by the app itself: ``jifen.api.access_log``.)"""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["jifen"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


import_app = typer.Typer(
    help=_h(
        "Import events, orders or members from a CSV file (streamed, resumable).",
        "从 CSV 文件导入事件、订单或会员(流式读取,中断后可继续)。",
    ),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(import_app, name="import")

FileArgument = Annotated[Path, typer.Argument(help=_h("The CSV file.", "CSV 文件。"))]


def _require_readable(path: Path) -> None:
    """Stop, in one line in the user's language, where ``path`` is no file jifen can read
    (Click's own check says it in English only, in a box)."""
    if path.is_dir():
        problem = _say(f"{path} is a folder, not a file: give the file's path",
                       f"{path} 是文件夹,不是文件:请给出文件的路径")  # fmt: skip
    elif not path.exists():
        problem = _say(f"there is no file {path}: check its path",
                       f"没有文件 {path}:请检查其路径")  # fmt: skip
    elif not os.access(path, os.R_OK):
        problem = _say(f"{path} cannot be read: check its permissions",
                       f"无法读取 {path}:请检查其权限")  # fmt: skip
    else:
        return
    raise fail("no_file", problem)


RequiredProgram = Annotated[
    str, typer.Option("--program", help=_h("The programme's code.", "计划代码。"))
]
SourceOption = Annotated[
    str,
    typer.Option(
        help=_h(
            "The source the events are keyed by, where a row names none.",
            "行中未给出来源时所用的事件来源(事件按来源和编号识别)。",
        )
    ),
]
ErrorsOption = Annotated[
    Path | None,
    typer.Option(
        "--errors",
        help=_h(
            "Where rejected rows go, as they were, with why (FILE.errors.csv).",
            "被拒绝的行原样写入的文件,附拒绝原因(FILE.errors.csv)。",
        ),
    ),
]
BatchOption = Annotated[
    int,
    typer.Option(min=1, max=10_000, help=_h("Records per transaction.", "每个事务的记录数。")),
]
RestartOption = Annotated[
    bool,
    typer.Option(
        help=_h(
            "Start from the top even if an earlier run was interrupted.",
            "即使上次运行被中断,也从头开始。",
        )
    ),
]
MerchantOption = Annotated[
    str | None,
    typer.Option(
        "--merchant",
        metavar="CODE",
        help=_h(
            "The merchant every row's points are posted for (the store is the row's own).",
            "每行积分所记入的商户(门店取自该行)。",
        ),
    ),
]


def _settle() -> None:
    """Move what the process has built by now (the libraries and jifen's modules, some
    200,000 objects that live as long as it does) out of the garbage collector's sight, as
    the server's workers do (``app_from_settings``): a long import or a worker would
    otherwise walk all of them in each full collection, which a batch of events sets off,
    about a fifth of the Python time of ingesting an event."""
    gc.collect()
    gc.freeze()


def _import(kind: Kind, path: Path, program: str, source: str, errors: Path | None,
            batch: int, restart: bool, merchant: str | None = None) -> None:  # fmt: skip
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from jifen.imports import service as imports

    _require_readable(path)
    _require_secret_key()
    with _database() as database:
        _require_schema(database)
        _settle()
        program_id = _program_id(database, program)
        assert program_id is not None
        with Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[counts]}"), console=err, transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task(f"{kind} {path.name}", total=path.stat().st_size, counts="")

            committed = [0]
            next_line = [time.monotonic() + LOG_EVERY]

            def show(report: imports.Report) -> None:
                committed[0] = report.records
                share = report.bytes_read / max(report.bytes_total, 1)
                if not err.is_terminal and time.monotonic() >= next_line[0]:
                    # No bar where no one watches a terminal (a log, a pipe): a line now and then.
                    next_line[0] = time.monotonic() + LOG_EVERY
                    err.print(
                        _say(f"… checking the file's orders ({share:.0%} read)",
                             f"… 正在检查文件中的订单(已读 {share:.0%})")
                        if report.scanning else
                        _say(f"… {report.records:,} {kind} done ({share:.0%} of the file), "
                             f"{report.refused:,} refused",
                             f"… 已完成 {report.records:,} 条(文件的 {share:.0%}),"
                             f"拒绝 {report.refused:,}"),
                        markup=False,
                    )  # fmt: skip
                bar.update(
                    task,
                    description=_say(f"checking {path.name}", f"检查 {path.name}")
                    if report.scanning else f"{kind} {path.name}",
                    completed=report.bytes_read,
                    counts=_say(f"{report.records:,} done, {report.refused:,} refused",
                                f"已完成 {report.records:,},拒绝 {report.refused:,}"),
                )  # fmt: skip

            try:
                report = imports.run_import(
                    database, program_id=program_id, kind=kind, path=path, source=source,
                    errors_path=errors, batch=batch, restart=restart, progress=show,
                    language=get_settings().language, merchant=merchant,
                )  # fmt: skip
            except KeyboardInterrupt:
                bar.stop()
                err.print(
                    _say(f"interrupted: {committed[0]:,} records are committed; run the same "
                         f"command again to continue after them",
                         f"已中断:已提交 {committed[0]:,} 条;再次运行同一命令即从其后继续"),
                    markup=False,
                )  # fmt: skip
                raise typer.Exit(130) from None
    if report.started_over:
        out.print(report.started_over, markup=False)
    if report.resumed_from:
        out.print(_say(f"resumed after {report.resumed_from:,} records committed earlier",
                       f"从上次已提交的 {report.resumed_from:,} 条之后继续"))  # fmt: skip
    out.print(
        _say(
            f"{report.records:,} {kind} read in {report.seconds:.1f} s: {report.accepted:,} "
            f"applied, {report.replayed:,} already there, {report.refused:,} refused; "
            f"{report.points:,} points",
            f"共读取 {report.records:,} 条({report.seconds:.1f} 秒):导入 {report.accepted:,},"
            f"已存在 {report.replayed:,},拒绝 {report.refused:,};积分 {report.points:,}",
        ),
        markup=False,
    )
    if report.refused:
        out.print(_say(f"rejected rows and why: {report.errors_path}",
                       f"被拒绝的行及原因:{report.errors_path}"), markup=False)  # fmt: skip
        raise typer.Exit(1)


@import_app.command(
    "events",
    help=_h(
        "Events, one per row: external_id, type, occurred_at, member_ref or member_id, and a "
        "JSON payload (source optional).",
        "事件,每行一个:external_id, type, occurred_at, member_ref 或 member_id,"
        "以及 JSON 格式的 payload(source 可选)。",
    ),
)
def import_events(
    file: FileArgument, program: RequiredProgram, source: SourceOption = "csv",
    errors: ErrorsOption = None, batch: BatchOption = IMPORT_BATCH, restart: RestartOption = False,
    merchant: MerchantOption = None,
) -> None:  # fmt: skip
    _import("events", file, program, source, errors, batch, restart, merchant)


@import_app.command(
    "orders",
    help=_h(
        "Paid orders, one row per order line (order_id, member_ref, occurred_at, sku, "
        "amount_fen; category, quantity, store, channel, paid_with_points, pickup optional): "
        "each order becomes one order.paid event.",
        "已支付的订单,每行一条订单明细(order_id, member_ref, occurred_at, sku, amount_fen;"
        "category, quantity, store, channel, paid_with_points, pickup 可选):"
        "每个订单生成一个 order.paid 事件。",
    ),
)
def import_orders(
    file: FileArgument, program: RequiredProgram, source: SourceOption = "csv",
    errors: ErrorsOption = None, batch: BatchOption = IMPORT_BATCH, restart: RestartOption = False,
    merchant: MerchantOption = None,
) -> None:  # fmt: skip
    _import("orders", file, program, source, errors, batch, restart, merchant)


@import_app.command(
    "members",
    help=_h(
        "Members, one per row: external_ref (name, email, birthday, gender, region, tags, "
        "phone, tier optional); a row for a member already there must agree with it (an "
        "existing member is changed through the API or the staff tools).",
        "会员,每行一个:external_ref(name, email, birthday, gender, region, tags, phone, "
        "tier 可选);已存在会员的行须与其一致(修改已有会员请通过 API 或员工工具)。",
    ),
)
def import_members(
    file: FileArgument, program: RequiredProgram, errors: ErrorsOption = None,
    batch: BatchOption = IMPORT_BATCH, restart: RestartOption = False,
) -> None:  # fmt: skip
    _import("members", file, program, "csv", errors, batch, restart)


rules_app = typer.Typer(
    help=_h("Earning rules: load a rule pack.", "积分规则:载入规则包。"),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(rules_app, name="rules")


@rules_app.command(
    "load",
    help=_h(
        "Load a rule pack: its tiers, caps and event types, which take effect at once, and a "
        "new version of each rule (a draft unless --activate).",
        "载入规则包:其中的等级、上限和事件类型立即生效,每条规则各新建一个版本"
        "(不加 --activate 时为草稿)。",
    ),
)
def rules_load(
    pack: Annotated[
        Path,
        typer.Argument(help=_h("The rule pack (JSON).", "规则包(JSON)。")),
    ],
    program: RequiredProgram,
    activate: Annotated[
        bool,
        typer.Option(
            help=_h(
                "Approve and activate the rules at once (for an installation; over the API "
                "every version needs a second person). Without it the rules are drafts to "
                "submit; the pack's tiers, caps and event types are set at once either way.",
                "立即批准并启用规则(用于初次部署;通过 API 时每个版本都须由他人审批)。"
                "不加此选项时,规则为待提交的草稿;无论哪种,规则包中的等级、上限和事件类型"
                "都会立即生效。",
            )
        ),
    ] = False,
) -> None:
    from jifen.rules import service as rules_service
    from jifen.rules.schemas import RulePack

    _require_readable(pack)
    try:
        body = RulePack.model_validate_json(pack.read_bytes().removeprefix(b"\xef\xbb\xbf"))
    except ValidationError as exc:
        refused = invalid_field(exc, whole="pack")
        raise fail(refused.code, f"{pack}: {refused.message(get_settings().language)}") from None
    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        assert program_id is not None
        started = database.clock.now()
        versions = database.run(
            lambda uow: rules_service.load_pack(
                uow, program_id=program_id, pack=body, actor="cli", activate=activate
            )
        )
    unchanged = sum(1 for version in versions if version.created_at < started)
    state_word = _say("active", "已生效") if activate else _say("drafts", "草稿")
    out.print(
        _say(f"{len(versions)} rules loaded into {program} ({state_word}), "
             f"{unchanged} of them unchanged since an earlier load",
             f"已向 {program} 载入 {len(versions)} 条规则({state_word}),"
             f"其中 {unchanged} 条与此前载入的相同,未新建版本"),
        markup=False,
    )  # fmt: skip


events_app = typer.Typer(
    help=_h("Events raised by jifen itself.", "由 jifen 自身产生的事件。"),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(events_app, name="events")


@events_app.command(
    "birthdays",
    help=_h(
        "Raise member.birthday for the members born on a day (run daily; running it twice "
        "raises nothing twice).",
        "为某日生日的会员产生 member.birthday 事件(每天运行;重复运行不会重复产生)。",
    ),
)
def events_birthdays(
    program: RequiredProgram,
    on: Annotated[
        str | None,
        typer.Option(
            "--date",
            help=_h(
                "The day (YYYY-MM-DD); default: today in the programme.",
                "日期(YYYY-MM-DD);默认:按计划所在时区的今天。",
            ),
        ),
    ] = None,
) -> None:
    from jifen.events import service as events_service
    from jifen.programs import service as programs

    _require_secret_key()
    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        assert program_id is not None
        if on is None:
            zone = database.run(lambda uow: programs.time_zone(uow, program_id=program_id))
            day = database.clock.now().astimezone(ZoneInfo(zone)).date()
        else:
            try:
                day = date.fromisoformat(on)
            except ValueError:
                raise fail(
                    "invalid_input",
                    _say(f"--date: {on!r} is not a date like 2026-06-18",
                         f"--date:{on!r} 不是日期(例如 2026-06-18)"),
                ) from None  # fmt: skip
            if not EARLIEST.date() <= day < LATEST.date():
                raise fail(
                    "invalid_input",
                    _say(f"--date: {on} is outside the years the ledger stores (1970 to 9000)",
                         f"--date:{on} 超出账本可记录的年份(1970 至 9000 年)"),
                )  # fmt: skip
        raised = events_service.raise_birthdays(database, program_id=program_id, day=day)
    out.print(_say(f"{raised} birthday events raised for {day}",
                   f"已为 {day} 生成 {raised} 个生日事件"), markup=False)  # fmt: skip


rewards_app = typer.Typer(
    help=_h(
        "Rewards: the daily runs that expire vouchers and lapse held redemptions.",
        "奖励:每日运行,处理到期未用的券和逾期未确认的兑换。",
    ),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(rewards_app, name="rewards")
SWEEP_CHUNK = 200
"""Vouchers or orders a reward sweep handles a transaction."""


@rewards_app.command(
    "expire-vouchers",
    help=_h(
        "Expire vouchers unused at the end of their validity: the points go back less the "
        "programme's fee. Runs in chunks, each its own transaction; running it twice does "
        "nothing the second time.",
        "将有效期结束时仍未使用的券作过期处理:积分扣除计划的手续费后退回。\n\n"
        "分批运行,每批一个事务;重复运行时,第二次不做任何更改。",
    ),
)
def rewards_expire_vouchers(program: RequiredProgram, dry_run: DryRun = False) -> None:
    from jifen.rewards import service as rewards_service

    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        assert program_id is not None
        vouchers = returned = fees = 0
        if dry_run:  # the whole run, rolled back: a dry run counts past its first chunk
            found = _dry_sweep(database, "rewards.expire_vouchers", program_id)
            vouchers, returned, fees = (found.get(name, 0) for name in
                                        ("vouchers", "points_returned", "fees"))  # fmt: skip
        while not dry_run:
            report = database.run(
                lambda uow: rewards_service.expire_vouchers(
                    uow, program_id=program_id, limit=SWEEP_CHUNK
                )
            )
            vouchers += report.vouchers
            returned += report.points_returned
            fees += report.fees
            if report.found < SWEEP_CHUNK:
                break
            err.print(_say(f"… {vouchers} vouchers so far", f"… 已处理 {vouchers} 张券"))
    verb = ("would expire", "将过期") if dry_run else ("expired", "已过期")
    out.print(
        _say(f"{vouchers} vouchers {verb[0]}: {returned} points back, {fees} kept as fees",
             f"{vouchers} 张券{verb[1]}:退回 {returned} 积分,扣除 {fees} 积分手续费"),
        markup=False,
    )  # fmt: skip


@rewards_app.command(
    "expire-holds",
    help=_h(
        "Cancel held (cooling-off) redemptions the member never confirmed: the points are "
        "released and the stock returns.",
        "取消会员始终未确认的冷静期兑换:积分解冻,库存退回。",
    ),
)
def rewards_expire_holds(program: RequiredProgram, dry_run: DryRun = False) -> None:
    from jifen.rewards import service as rewards_service

    _cancel_lapsed_orders(
        program, dry_run, rewards_service.expire_holds, ("held redemptions", "笔待确认兑换"),
        "rewards.expire_holds",
    )  # fmt: skip


@rewards_app.command(
    "lapse-payments",
    help=_h(
        "Cancel redemptions whose cash part was not paid by their time to pay (the "
        "programme's payment_minutes): the points are released and the stock returns. The "
        "worker runs this every 5 minutes.",
        "取消未在支付时限(计划的 payment_minutes)内支付现金部分的兑换:积分解冻,库存退回。"
        "worker 每 5 分钟运行一次。",
    ),
)
def rewards_lapse_payments(program: RequiredProgram, dry_run: DryRun = False) -> None:
    from jifen.rewards import service as rewards_service

    _cancel_lapsed_orders(
        program, dry_run, rewards_service.lapse_payments,
        ("redemptions not paid in time", "笔超时未支付兑换"), "rewards.lapse_payments",
    )  # fmt: skip


def _dry_sweep(database: Database, job: str, program_id: int) -> dict[str, int]:
    """What the sweep ``job`` would do now, done whole in one transaction rolled back."""
    from jifen.jobs import service as jobs_service

    return jobs_service.run(database, job, program_id=program_id, dry_run=True).figures


def _cancel_lapsed_orders(
    program: str, dry_run: bool, cancel: Callable[..., HoldsReport], what: tuple[str, str],
    job: str,
) -> None:  # fmt: skip
    """Run ``cancel`` (a rewards service's sweep of lapsed orders) over the programme in
    chunks of ``SWEEP_CHUNK``, each its own transaction, until it finds no more, and say how
    many it cancelled (or, with ``dry_run``, would cancel: ``job``, the same sweep, run whole
    and rolled back) of ``what`` (English, Chinese)."""
    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        assert program_id is not None
        cancelled = 0
        if dry_run:  # the whole run, rolled back: a dry run counts past its first chunk
            cancelled = _dry_sweep(database, job, program_id).get("cancelled", 0)
        while not dry_run:
            report = database.run(lambda uow: cancel(uow, program_id=program_id, limit=SWEEP_CHUNK))
            cancelled += report.cancelled
            if report.found < SWEEP_CHUNK:
                break
    verb = ("would be cancelled", "将取消") if dry_run else ("cancelled", "已取消")
    out.print(_say(f"{cancelled} {what[0]} {verb[0]}", f"{cancelled} {what[1]}{verb[1]}"),
              markup=False)  # fmt: skip


jobs_app = typer.Typer(
    help=_h(
        "Jobs: expiry, dormancy, reminders, tiers, birthdays, reconciliation, vouchers…",
        "任务:积分到期、休眠、提醒、等级、生日、对账、券…",
    ),
    no_args_is_help=True,
    rich_markup_mode=_HELP_LAYOUT,
)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command(
    "list",
    help=_h(
        "The jobs and when the worker runs them (in each programme's time zone).",
        "列出各任务及 worker 运行它们的时间(按各计划的时区)。",
    ),
)
def jobs_list() -> None:
    from rich.table import Table

    from jifen.jobs import core as jobs_core
    from jifen.jobs import service as jobs_service

    table = Table("job", "what 做什么", "schedule 计划")
    for name, job in jobs_service.jobs().items():
        schedule = jobs_core.SCHEDULES.get(name)
        table.add_row(name, f"{job.title} {job.title_zh}", schedule.describe() if schedule else "")
    out.print(table)


JobPause = Annotated[
    float,
    typer.Option(
        min=0.0, max=100.0,
        help=_h("After each chunk, wait this many times as long as the chunk took, leaving "
                "the machine to live traffic (1.0: about half).",
                "每批完成后暂停,时长为该批耗时乘以此倍数,把机器留给线上流量"
                "(1.0:约让出一半)。"),
    ),
]  # fmt: skip


@jobs_app.command(
    "run",
    help=_h(
        "Run a job once for a programme. A run for a moment that already finished does "
        "nothing; one cut short continues where it stopped.",
        "为一个计划运行一次任务。\n\n针对某一时刻的运行若已完成,再运行不做任何事;"
        "中途被打断的运行从中断处继续。",
    ),
)
def jobs_run(
    name: Annotated[
        str,
        typer.Argument(
            help=_h(
                "The job, as `jifen jobs list` names it.",
                "任务名,即 `jifen jobs list` 列出的名称。",
            )
        ),
    ],
    program: RequiredProgram,
    now: Annotated[
        str | None,
        typer.Option(
            "--now",
            help=_h(
                "The moment the run works for (ISO 8601); default: now.",
                "本次运行所针对的时刻(ISO 8601);默认:当前时刻。",
            ),
        ),
    ] = None,
    size: Annotated[
        int | None, typer.Option(min=1, max=100_000, help=_h("Chunk size.", "每批的大小。"))
    ] = None,
    dry_run: DryRun = False,
    pause: JobPause = 0.0,
    allow_future: Annotated[
        bool,
        typer.Option(
            "--allow-future",
            help=_h(
                "Allow a --now later than the present: the run changes the ledger as if "
                "that moment had come (points lapse before their time).",
                "允许 --now 晚于当前时刻:运行会像该时刻已到一样修改账本(积分提前过期)。",
            ),
        ),
    ] = False,
) -> None:
    from jifen.jobs import service as jobs_service

    moment = None if now is None else _job_moment(now, allow_future or dry_run)
    _require_secret_key()
    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        assert program_id is not None

        def progress(chunks: int, figures: dict[str, int]) -> None:
            shown = ", ".join(f"{k} {v:,}" for k, v in figures.items())
            err.print(_say(f"… chunk {chunks}: {shown}", f"… 第 {chunks} 批:{shown}"), markup=False)

        report = jobs_service.run(
            database, name, program_id=program_id, now=moment, size=size, dry_run=dry_run,
            progress=progress, pause=pause,
        )  # fmt: skip
    shown = ", ".join(f"{k} {v:,}" for k, v in report.figures.items()) or "-"
    verb = {"done": ("done", "完成"), "already-done": ("already done", "此前已完成"),
            "running": ("this worker's share done, others still at it",
                        "本进程的部分已完成,其他进程仍在进行"),
            "dry-run": ("dry run, nothing changed", "演练,未做任何更改")}[report.state]  # fmt: skip
    at = report.run_at.isoformat()
    out.print(
        _say(f"{name} for {at}: {verb[0]} in {report.chunks} chunks: {shown}",
             f"{name}({at}):{verb[1]},共 {report.chunks} 批:{shown}"),
        markup=False,
    )  # fmt: skip
    if report.figures.get("problems"):
        raise typer.Exit(1)


def _check_nats_url(url: str) -> None:
    """Refuse a NATS address that no server could have (the worker would wait for it)."""
    from jifen.events import stream as event_stream

    for part in url.split(","):
        parsed = urlsplit(part.strip())
        if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
            raise fail(
                "invalid_input",
                _say(f"JIFEN_NATS_URL: {event_stream.safe_url(url)!r} is not a NATS address "
                     f"such as nats://127.0.0.1:4222",
                     f"JIFEN_NATS_URL:{event_stream.safe_url(url)!r} 不是 NATS 地址(例如 "
                     f"nats://127.0.0.1:4222)"),
            )  # fmt: skip


def _job_moment(text: str, future_allowed: bool) -> datetime:
    """``--now`` as a moment: a time with its offset, in the years the ledger stores, and
    not ahead of the clock (by more than a clock's drift) unless that is meant."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise fail(
            "invalid_input",
            _say(f"--now: {text!r} is not a time like 2027-01-01T00:10+08:00",
                 f"--now:{text!r} 不是时间(例如 2027-01-01T00:10+08:00)"),
        ) from None  # fmt: skip
    if moment.tzinfo is None:
        raise fail(
            "invalid_input",
            _say(f"--now: {text!r} needs a UTC offset, e.g. +08:00",
                 f"--now:{text!r} 须带 UTC 偏移(例如 +08:00)"),
        )  # fmt: skip
    try:
        in_range = EARLIEST <= moment.astimezone(UTC) < LATEST
    except OverflowError:
        in_range = False
    if not in_range:
        raise fail(
            "invalid_input",
            _say(f"--now: {text!r} is outside the years the ledger stores (1970 to 9000)",
                 f"--now:{text!r} 超出账本可记录的年份(1970 至 9000 年)"),
        )  # fmt: skip
    if not future_allowed and moment > datetime.now(UTC) + timedelta(minutes=5):
        raise fail(
            "invalid_input",
            _say(f"--now: {text!r} is in the future; a run for it changes the ledger as if "
                 f"that moment had come (points lapse before their time). Add --dry-run to "
                 f"see what it would do, or --allow-future if that is what you mean",
                 f"--now:{text!r} 是将来的时刻;按该时刻运行会像该时刻已到一样修改账本"
                 f"(积分提前过期)。加 --dry-run 可预览结果;确需如此请加 --allow-future"),
        )  # fmt: skip
    return moment


@app.command(
    "worker",
    help=_h(
        "Ingest events from NATS JetStream (JIFEN_NATS_URL) and run the scheduled jobs, until "
        "Ctrl+C or SIGTERM. Run as many workers as needed: they share one durable consumer, "
        "and each job run is shared chunk by chunk.",
        "从 NATS JetStream(JIFEN_NATS_URL)接收事件并运行定时任务,直到 Ctrl+C 或 SIGTERM。"
        "worker 可按需运行多个:它们共用一个持久消费者,每次任务运行按批分摊给各 worker。",
    ),
)
def worker(
    batch: Annotated[
        int,
        typer.Option(
            min=1, max=1000,
            help=_h("Messages per fetch, hence per transaction.",
                    "每次拉取的消息数,也即每个事务的消息数。"),
        ),
    ] = 200,
    ack_wait: Annotated[
        float,
        typer.Option(
            min=1.0, max=86_400.0,  # the server keeps it in nanoseconds, in 64 bits
            help=_h("Seconds before an unacknowledged message is handed out again "
                    "(at most a day).",
                    "消息未被确认时,隔多少秒重新投递(至多一天)。"),
        ),
    ] = 30.0,
    events: Annotated[
        bool,
        typer.Option(
            "--events/--no-events",
            help=_h("Ingest events from NATS JetStream.", "从 NATS JetStream 接收事件。"),
        ),
    ] = True,
    run_jobs: Annotated[
        bool,
        typer.Option(
            "--jobs/--no-jobs",
            help=_h("Run the scheduled jobs (`jifen jobs list`).",
                    "运行定时任务(`jifen jobs list`)。"),
        ),
    ] = True,
    job_pause: JobPause = 0.0,
) -> None:  # fmt: skip
    import logging.config

    from jifen.events import stream as event_stream
    from jifen.jobs import scheduler as jobs_scheduler

    settings = get_settings()
    logging.config.dictConfig(_log_config())
    if not events and not run_jobs:
        raise fail(
            "invalid_input",
            _say("--no-events with --no-jobs leaves the worker nothing to do",
                 "同时给出 --no-events 和 --no-jobs,工作进程将无事可做"),
        )  # fmt: skip
    if events:
        _check_nats_url(settings.nats_url)
    _require_secret_key()
    with _database() as database:
        _require_schema(database)
        _warn_without_autovacuum(database)
        stop = event_stream.stop_on_signals()
        scheduler = None
        if run_jobs:
            scheduler = jobs_scheduler.Scheduler(database, pause=job_pause)
            scheduler.start()
            out.print(_say(f"jifen worker: {len(scheduler.scheduled)} scheduled jobs",
                           f"jifen worker:已计划 {len(scheduler.scheduled)} 个任务"),
                      markup=False)  # fmt: skip
        try:
            if not events:
                stop.wait()
                return
            shown = event_stream.safe_url(settings.nats_url)
            _settle()
            out.print(
                _say(f"jifen worker: events from {shown}, stream {settings.nats_stream}",
                     f"jifen worker:从 {shown}(流 {settings.nats_stream})接收事件"),
                markup=False,
            )  # fmt: skip
            stats = event_stream.run_worker(
                database,
                url=settings.nats_url,
                stop=stop,
                stream=settings.nats_stream,
                subject_prefix=settings.nats_subject_prefix,
                durable=settings.nats_durable,
                batch=batch,
                ack_wait=ack_wait,
            )
            out.print(
                _say(f"stopped: {stats.describe()}", f"已停止:{stats.describe()}"), markup=False
            )
        finally:
            if scheduler is not None:
                scheduler.stop()


@app.command(
    "totp",
    help=_h(
        "Print the current TOTP code of a seed, as an authenticator app would (for the demo).",
        "像身份验证器应用那样,显示某个种子当前的动态验证码(试用示例时用)。",
    ),
)
def totp(
    seed: Annotated[
        str, typer.Argument(help=_h("The TOTP seed (base32).", "动态码种子(base32)。"))
    ],
) -> None:
    import binascii

    import pyotp

    # An authenticator shows a seed in groups of four, in either case: taken as it is shown.
    compact = "".join(seed.split()).upper()
    try:
        shown = pyotp.TOTP(compact).now()
    except (TypeError, binascii.Error):
        raise fail(
            "invalid_input",
            _say("that is not a base32 TOTP seed (letters A–Z and digits 2–7)",
                 "这不是 base32 格式的动态码种子(字母 A–Z 与数字 2–7)"),
        ) from None  # fmt: skip
    except ValueError:  # it decodes, to fewer than the 112 bits a seed must have
        raise fail(
            "invalid_input",
            _say("that TOTP seed is too short: a seed has at least 112 bits (23 base32 "
                 "characters; the ones jifen makes have 32)",
                 "动态码种子过短:种子至少 112 位(23 个 base32 字符;jifen 生成的种子为 32 个)"),
        ) from None  # fmt: skip
    out.print(shown)


def _history_en(days: int) -> str:
    return "a year of history" if days == DEMO_DAYS else f"{days:,} days of history"


def _history_zh(days: int) -> str:
    return "一年的积分记录" if days == DEMO_DAYS else f"{days:,} 天的积分记录"


def _build_demo(database: Database, *, members: int, seed: int, days: int) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from jifen.demo import service as demo_service

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(
            _say(f"{members:,} members, {_history_en(days)} (days)",
                 f"{members:,} 名会员,{_history_zh(days)}(天)"),
            total=days,
        )  # fmt: skip

        def on_day(done: int) -> None:
            progress.update(task, completed=done)
            if not err.is_terminal and done % 30 == 0:  # a log or a pipe: a line a month
                err.print(
                    _say(f"… day {done} of {days}", f"… 第 {done} 天,共 {days} 天"), markup=False
                )

        demo_service.build(database, members=members, seed=seed, on_day=on_day, days=days)


def main() -> None:
    """Entry point of the ``jifen`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        err.print(_say("interrupted", "已中断"))
        sys.exit(130)
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        # The settings themselves cannot be read, so neither can JIFEN_LANGUAGE through them.
        chinese = _chinese(os.environ.get("JIFEN_LANGUAGE", ""))
        for error in exc.errors():
            name = "JIFEN_" + "_".join(str(part) for part in error["loc"]).upper()
            english, zh = field_problem(error)
            err.print(f"error[invalid_setting]: {name}: {zh if chinese else english}", markup=False)
        sys.exit(2)
