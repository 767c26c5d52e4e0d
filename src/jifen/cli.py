"""The ``jifen`` command: schema, ledger checks and the demo programme.

Every command is a thin adapter: parse, open a :class:`Database`, call a service, print.
A :class:`JifenError` becomes one line ``error[<code>]: <message>`` and exit status 2;
an unreachable database likewise, never a traceback.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError

from jifen.db import migrate
from jifen.db.uow import Database, UnitOfWork
from jifen.demo import service as demo_service
from jifen.errors import JifenError
from jifen.points import integrity
from jifen.programs import service as programs
from jifen.settings import get_settings, normalise_database_url

app = typer.Typer(
    help="jifen (积分): a membership loyalty points platform with an exact ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Create and migrate the database schema.", no_args_is_help=True)
ledger_app = typer.Typer(
    help="Prove the ledger: verify, reconcile, checkpoint.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(ledger_app, name="ledger")

# soft_wrap: a long line (a problem naming a posting, an error) stays one line for grep.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _State:
    database_url: str = ""


state = _State()


@app.callback()
def _options(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="JIFEN_DATABASE_URL",
            help="SQLAlchemy URL; default: the embedded SQLite file in JIFEN_DATA_DIR.",
        ),
    ] = None,
) -> None:
    # A plain postgresql:// or postgres:// URL means psycopg 3, as in JIFEN_DATABASE_URL.
    state.database_url = (
        normalise_database_url(database_url)
        if database_url
        else get_settings().resolved_database_url()
    )


def _say(en: str, zh: str) -> str:
    """The CLI's own words in the configured language (``JIFEN_LANGUAGE``)."""
    return zh if get_settings().language.lower().startswith("zh") else en


def fail(code: str, message: str) -> typer.Exit:
    err.print(f"error[{code}]: {message}", markup=False)
    return typer.Exit(2)


@contextmanager
def _boundary() -> Iterator[None]:
    """Turn jifen's errors and an unusable database into one line and exit status 2."""
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
def _database() -> Iterator[Database]:
    with _boundary():
        database = _open(state.database_url)
        try:
            yield database
        finally:
            database.dispose()


def _open(url: str) -> Database:
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
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparsable: still never show what may be a password
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _program_id(database: Database, code: str | None) -> int | None:
    if code is None:
        return None
    return database.run(lambda uow: programs.get_program(uow, code=code).id, read_only=True)


def _require_schema(database: Database) -> None:
    if not migrate.is_current(database.engine):
        raise fail(
            "schema_not_current",
            _say(
                "the database schema is missing or out of date; run `jifen db upgrade` first.",
                "数据库结构不存在或不是最新;请先运行 `jifen db upgrade`。",
            ),
        )


# --------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the schema, or bring it up to the newest revision."""
    with _database() as database:
        migrate.upgrade(database.engine)
        out.print(f"schema at revision {migrate.current_revision(database.engine)}")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision in use and the newest one."""
    with _database() as database:
        current, head = (
            migrate.current_revision(database.engine),
            migrate.head_revision(database.engine),
        )
        out.print(f"current: {current or '(empty database)'}  newest: {head}")
        if current != head:  # exit 1, so scripts and health checks can tell
            out.print(_say("run `jifen db upgrade` to migrate", "请运行 `jifen db upgrade` 迁移"))
            raise typer.Exit(1)


# --------------------------------------------------------------------------- ledger

ProgramOption = Annotated[
    str | None, typer.Option("--program", help="Programme code; default: every programme.")
]


def _print_problems(problems: list[integrity.Problem]) -> None:
    # One line each, never wrapped, each naming its posting or account: grep-able.
    for problem in problems:
        out.print(f"  PROBLEM {problem}", markup=False)


@ledger_app.command("verify")
def ledger_verify(program: ProgramOption = None) -> None:
    """Recompute every posting digest and hash chain, and check the checkpoints."""
    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        report = database.run(
            lambda uow: integrity.verify(uow, program_id=program_id), read_only=True
        )
    out.print(
        f"verified {report.postings} postings, {report.accounts} member accounts, "
        f"{report.checkpoints} checkpoints"
    )
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


@ledger_app.command("reconcile")
def ledger_reconcile(program: ProgramOption = None) -> None:
    """Recompute balances, lots, frozen and debt from the lines; report every difference."""
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
    out.print(f"{report.accounts} member accounts, {report.lots} lots; programme total {total}")
    _print_problems(report.problems)
    if not report.ok:
        out.print(_say(f"{len(report.problems)} difference(s)", f"{len(report.problems)} 处差异"))
        raise typer.Exit(1)
    out.print(
        _say("ok: every balance equals its lines and its lots", "ok:每个余额都等于其分录与批次")
    )


@ledger_app.command("checkpoint")
def ledger_checkpoint(
    program: Annotated[str, typer.Option("--program", help="Programme code.")],
) -> None:
    """Seal every member account's chain head; keep the printed root hash outside the database."""
    with _database() as database:
        _require_schema(database)

        def seal(uow: UnitOfWork) -> tuple[int, str]:
            program_id = programs.get_program(uow, code=program).id
            return integrity.checkpoint(uow, program_id=program_id)

        checkpoint_id, root = database.run(seal)
    out.print(f"checkpoint {checkpoint_id}: {root}")
    out.print(
        _say(
            "keep this root hash somewhere outside the database (a ticket, a log, a notebook): "
            "`jifen ledger verify` proves the history up to it unchanged only against a copy "
            "the database cannot rewrite",
            "请把这个根哈希保存在数据库之外(工单、日志、笔记本):只有对照数据库改不了的副本,"
            "`jifen ledger verify` 才能证明此前的历史未被改写",
        )
    )


# --------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    members: Annotated[int, typer.Option(min=1, max=100_000, help="Members to create.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the generated history.")] = 7,
    reset: Annotated[
        bool,
        typer.Option("--reset", help="Delete the embedded SQLite database and build it again."),
    ] = False,
) -> None:
    """Build the demo programme (a year of history) on the embedded database; print its summary.

    If it exists already, only its summary is printed.
    """
    with _boundary():
        if reset:
            demo_service.reset_sqlite(state.database_url)
    with _database() as database:
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
            started = time.perf_counter()  # elapsed time for the operator, not ledger time
            _build_demo(database, members=members, seed=seed)
            took = time.perf_counter() - started
            out.print(
                _say(
                    f"built {members:,} members and a year of history in {took:.1f} s",
                    f"已生成 {members:,} 名会员及一年的积分记录,用时 {took:.1f} 秒",
                )
            )
        summary = demo_service.summary(database)
    demo_service.print_summary(summary, out)
    if not (summary.ok and summary.complete):
        raise typer.Exit(1)
    # The web console comes here (a later issue): `jifen demo` will go on to serve it on
    # this database, opened on the demo programme, until interrupted (options such as
    # --host/--port/--no-serve then join the ones above). Until then it ends with the summary.


def _build_demo(database: Database, *, members: int, seed: int) -> None:
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(
            _say(f"{members:,} members, a year of history (days)",
                 f"{members:,} 名会员,一年的积分记录(天)"),
            total=demo_service.DAYS,
        )  # fmt: skip
        demo_service.build(
            database,
            members=members,
            seed=seed,
            on_day=lambda done: progress.update(task, completed=done),
        )


def main() -> None:
    """Entry point of the ``jifen`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
