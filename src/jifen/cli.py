"""The ``jifen`` command: schema, ledger checks and the demo programme.

Every command is a thin adapter: parse, open a :class:`Database`, call a service, print.
A :class:`JifenError` becomes one line ``error[<code>]: <message>`` and exit status 2;
an unreachable database likewise, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import psycopg
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table
from sqlalchemy.exc import OperationalError

from jifen.db import migrate
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import JifenError
from jifen.points import integrity
from jifen.programs import service as programs
from jifen.settings import get_settings

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

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


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
    state.database_url = database_url or get_settings().resolved_database_url()


def fail(code: str, message: str) -> typer.Exit:
    err.print(f"error[{code}]: {message}", markup=False)
    return typer.Exit(2)


@contextmanager
def _database() -> Iterator[Database]:
    database = Database(state.database_url, pool_size=2)
    try:
        yield database
    except JifenError as exc:
        raise fail(exc.code, exc.message(get_settings().language)) from None
    except (OperationalError, psycopg.OperationalError) as exc:
        orig = exc.orig if isinstance(exc, OperationalError) else exc
        reason = str(orig).strip().splitlines()[0] if orig else str(exc)
        raise fail(
            "database_unreachable",
            f"cannot use the database at {_safe(state.database_url)}: {reason}. "
            "Check --database-url / JIFEN_DATABASE_URL and that the server is running.",
        ) from None
    finally:
        database.dispose()


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _program_id(database: Database, code: str | None) -> int | None:
    if code is None:
        return None
    return database.run(lambda uow: programs.get_program(uow, code=code).id, read_only=True)


def _require_schema(database: Database) -> None:
    if not migrate.is_current(database.engine):
        raise fail(
            "schema_not_current",
            "the database schema is missing or out of date; run `jifen db upgrade` first.",
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
        if current != head:
            out.print("run `jifen db upgrade` to migrate")
            raise typer.Exit(1)


# --------------------------------------------------------------------------- ledger

ProgramOption = Annotated[
    str | None, typer.Option("--program", help="Programme code; default: every programme.")
]


def _print_problems(problems: list[integrity.Problem]) -> None:
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
        out.print(f"{len(report.problems)} problem(s): the ledger was changed outside jifen")
        raise typer.Exit(1)
    out.print("ok: every posting is as it was written")


@ledger_app.command("reconcile")
def ledger_reconcile(program: ProgramOption = None) -> None:
    """Recompute balances, lots, frozen and debt from the lines; report every difference."""
    with _database() as database:
        _require_schema(database)
        program_id = _program_id(database, program)
        report = database.run(
            lambda uow: integrity.reconcile(uow, program_id=program_id), read_only=True
        )
    table = Table("account", "balance", title="system accounts (from their lines)")
    for code, amount in sorted(report.system_balances.items()):
        table.add_row(code, f"{amount:,}")
    table.add_row("members (all)", f"{report.member_total:,}")
    out.print(table)
    total = report.member_total + sum(report.system_balances.values())
    out.print(f"{report.accounts} member accounts, {report.lots} lots; programme total {total}")
    _print_problems(report.problems)
    if not report.ok:
        out.print(f"{len(report.problems)} difference(s)")
        raise typer.Exit(1)
    out.print("ok: every balance equals its lines and its lots")


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
    out.print("keep this root hash somewhere outside the database (a ticket, a log, a notebook)")


# --------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    members: Annotated[int, typer.Option(min=1, max=100_000, help="Members to create.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the generated history.")] = 7,
    reset: Annotated[
        bool, typer.Option("--reset", help="Delete the embedded demo database and start over.")
    ] = False,
) -> None:
    """Build the demo programme on the embedded database and print its summary."""
    from jifen.demo import service as demo_service

    if reset:
        demo_service.reset_sqlite(state.database_url)
    with _database() as database:
        migrate.upgrade(database.engine)
        if not demo_service.exists(database):
            with Progress(
                "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), console=err, transient=True,
            ) as progress:  # fmt: skip
                task = progress.add_task("building a year of demo history (days)", total=365)
                demo_service.build(
                    database,
                    members=members,
                    seed=seed,
                    on_day=lambda done: progress.update(task, completed=done),
                )
        summary = demo_service.summary(database)
    demo_service.print_summary(summary, out)


def main() -> None:
    """Entry point of the ``jifen`` console script."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
