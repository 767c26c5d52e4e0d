"""CSV imports of events, orders and members: streamed in batches (memory stays flat
however long the file), each batch one transaction with a savepoint per record, so a bad
record is written to the error file with its line and reason while the good ones go in.

An import can be interrupted at any point and run again: a progress file beside the CSV
records how many records are committed, the last of them and how long the error file was
then, and the next run continues after them, once it has found that record in the
database (a database restored or rebuilt behind the same URL may not hold it: the run then
starts from the top). Even without it nothing is applied twice: events are keyed by (source,
external id), members by their reference.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any, BinaryIO, TextIO
from zoneinfo import ZoneInfo

from sqlalchemy import select

from jifen.crypto import keyed_hashes
from jifen.db.uow import Database, UnitOfWork
from jifen.errors import (
    DuplicateReference,
    IdempotencyConflict,
    InvalidInput,
    JifenError,
    UnknownMember,
)
from jifen.events import service as events_service
from jifen.events.models import events
from jifen.events.schemas import EventIn
from jifen.imports import BATCH as BATCH
from jifen.imports.core import (
    ERROR_COLUMNS,
    Kind,
    Misshapen,
    Place,
    Record,
    Row,
    RowError,
    check_header,
    event_record,
    member_record,
    misshapen,
    order_column,
    order_records,
    split_orders,
)
from jifen.members import core as members_core
from jifen.members import service as members_service
from jifen.members.models import members
from jifen.members.schemas import MemberCreate
from jifen.programs import service as programs_service
from jifen.tiers import service as tiers_service

BATCH_ROWS = 10_000
"""The most rows a batch holds, however few records they make (an order has up to 500 lines,
and one refused for more is read in parts of as many): memory stays flat."""
SCAN_EVERY = 10_000
"""Rows between two progress reports while an orders file is read through before importing."""
LINE_LIMIT = 1 << 20
"""The longest text line an import reads, in bytes (1 MiB): a longer one stops it before it
is read whole (a CSV field is at most ``csv.field_size_limit()``, 128 KiB, anyway)."""
_SOURCE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
"""What a source may be named (as an event's ``source``)."""
_MEMBER_COLUMNS = {"duplicate_reference": "phone", "unknown_tier": "tier"}
"""The column a members row is refused for, by the error's code (a reference already there
is not refused)."""


@dataclass
class Report:
    kind: str
    path: str
    records: int = 0
    """Records committed so far (events, orders or members), this run and earlier ones."""
    accepted: int = 0
    replayed: int = 0
    """Already there from an earlier run: nothing changed."""
    refused: int = 0
    points: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    errors_path: str = ""
    bytes_read: int = 0
    bytes_total: int = 0
    scanning: bool = False
    """The file is being read through first (an orders file: for orders split over it)."""
    started_over: str = ""
    """Why a run that had an earlier one to continue started from the top instead (in the
    language asked), or empty."""


@dataclass(frozen=True)
class _Rejected:
    """Rows that could not even become a request; counted as a record, so that a resumed
    import skips them too (and does not write them to the error file twice)."""

    lines: tuple[Place, ...]
    rows: tuple[Row, ...]
    error: RowError
    more: bool = False
    """Further rows of the record before (an order refused in parts): not counted again."""


@dataclass(frozen=True)
class _Refusal:
    """A record refused: the column, code and reason of the row at fault (``at``, an index
    into its rows; None: every row); the other rows of an order are refused with it."""

    item: Record | _Rejected
    column: str
    code: str
    reason: str
    at: int | None = None


@dataclass
class _Outcome:
    accepted: int = 0
    replayed: int = 0
    points: int = 0
    refused: list[_Refusal] = field(default_factory=list)
    held: Record | None = None
    """The last record of the batch that the database holds (applied or already there)."""


@dataclass
class _Saved:
    """What the progress record keeps after each committed batch."""

    position: int = 0
    """Items committed: records, and parts of an order refused in parts."""
    records: int = 0
    last: list[str] | None = None
    """The key of the last committed record the database holds (:func:`_key`), if any."""
    errors_bytes: int = 0
    """The error file's length then: a run killed after writing a batch's refusals, before
    saving, wrote them once more than its resumed run would."""
    options: dict[str, str | None] | None = None
    """The ``--source`` and ``--merchant`` the records were imported with (None: not known);
    a run continuing after them must give the same."""


Progress = Callable[[Report], None]


def target_of(db: Database, program_id: int) -> str:
    """A digest naming the database (its URL without the password) and the programme an
    import writes to: a progress record says how far the import into that one came."""
    url = db.engine.url.set(password=None).render_as_string(hide_password=False)
    return hashlib.blake2b(f"{url}\n{program_id}".encode(), digest_size=6).hexdigest()


def progress_path(path: Path, target: str) -> Path:
    """The progress record of an import of ``path`` into ``target`` (:func:`target_of`),
    beside the file."""
    return path.with_name(f"{path.name}.{target}.progress.json")


def errors_path_for(path: Path) -> Path:
    return path.with_name(path.stem + ".errors.csv")


def run_import(
    db: Database,
    *,
    program_id: int,
    kind: Kind,
    path: Path,
    source: str = "csv",
    errors_path: Path | None = None,
    batch: int = BATCH,
    restart: bool = False,
    progress: Progress | None = None,
    language: str = "en",
    merchant: str | None = None,
) -> Report:
    """Import ``path``; continue after the records an earlier, interrupted run into the same
    database and programme committed (unless ``restart``). The reasons in the error file are
    in ``language``; the points of events and orders are posted for ``merchant`` and the
    order's (or event's) store.

    A file that cannot be read to the end (not UTF-8, a malformed or overlong line) stops the
    import with :class:`InvalidInput` naming the row; the batches before it stay committed,
    and the next run continues after them."""
    started = time.monotonic()
    if not _SOURCE.fullmatch(source):
        raise InvalidInput(
            field="source",
            problem=f"{source!r} is not a source name: lower-case letters, digits, '.', '_' "
            "and '-', starting with a letter or digit, at most 64 (for example pos or crm)",
            problem_zh=f"{source!r} 不是有效的来源名:只能用小写字母、数字及 . _ -,"
            "以字母或数字开头,至多 64 个字符(例如 pos 或 crm)",
        )
    if (merchant is not None and not 0 < len(merchant) <= 64) or "\x00" in (merchant or ""):
        raise InvalidInput(
            field="merchant",
            problem="give a merchant code of 1 to 64 characters",
            problem_zh="请给出 1 至 64 个字符的商户代码",
        )
    errors_path = errors_path or errors_path_for(path)
    _check_not_input(path, errors_path)
    target = target_of(db, program_id)
    checkpoint = progress_path(path, target)
    _check_writable(checkpoint, errors_path)
    zone = ZoneInfo(
        db.run(lambda uow: programs_service.time_zone(uow, program_id=program_id), read_only=True)
    )
    stat = path.stat()
    fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "kind": kind,
                   "program_id": program_id, "database": target,
                   "errors": str(errors_path.resolve())}  # fmt: skip
    with _Checkpoint(checkpoint, fingerprint, path) as saved:
        report = Report(kind=kind, path=str(path), errors_path=str(errors_path),
                        bytes_total=stat.st_size)  # fmt: skip
        state = _Saved() if restart else saved.committed()
        options: dict[str, str | None] = {"source": source, "merchant": merchant}
        _check_same_options(state, options, path)
        state.options = options
        if state.position and not _resumable(db, program_id, kind, state, errors_path, report,
                                             language):  # fmt: skip
            state = _Saved()
        if state.position == 0:
            _check_not_shared(path, checkpoint, fingerprint, errors_path, restart=restart)
            errors_path.unlink(missing_ok=True)  # an earlier run's, which this run replaces
        else:
            _cut(errors_path, state.errors_bytes)
        report.records = report.resumed_from = state.records
        saved.save(report, state)  # so that an import into another target sees this one

        def commit(pending: list[Record | _Rejected]) -> None:
            held = _commit(db, program_id, kind, pending, report, errors, language, merchant)
            state.position += len(pending)
            state.records = report.records
            state.last = _key(held) if held is not None else state.last
            state.errors_bytes = errors.size()

        with path.open("rb") as raw, _ErrorFile(errors_path, append=state.position > 0) as errors:
            rows = _Rows(raw)
            try:
                header, width = _header(kind, rows, path)
                errors.header(header)
                split = _scan(path, header, width, report, progress) if kind == "orders" else {}
                records = _records(kind, rows, header, width, source, zone, split)
                pending: list[Record | _Rejected] = []
                held = 0  # rows in pending
                for index, record in enumerate(records):
                    if index < state.position:
                        continue  # committed by an earlier run
                    pending.append(record)
                    held += len(record.rows)
                    if len(pending) >= batch or held >= BATCH_ROWS:
                        commit(pending)
                        pending, held = [], 0
                        report.bytes_read = raw.tell()
                        saved.save(report, state)
                        if progress:
                            progress(report)
            except (_Unreadable, _TooLong, csv.Error) as exc:
                raise _stopped(exc, rows.at_fault(exc), report.records) from None
            if pending:
                commit(pending)
            report.bytes_read = stat.st_size
            saved.save(report, state)
        saved.finish()  # finished: a new run starts from the top
    report.seconds = time.monotonic() - started
    if progress:
        progress(report)
    return report


def _check_same_options(state: _Saved, options: Mapping[str, str | None], path: Path) -> None:
    """Refuse to continue an interrupted import with another ``--source`` or ``--merchant``
    than its records so far were imported with: the file would be split between the two
    without a word (and imported again from the top, the records keyed by the other source
    would be applied twice)."""
    if not state.position or state.options is None:
        return
    for option, value in options.items():
        before = state.options.get(option)
        if before == value:
            continue
        given = f"--{option} {before}" if before is not None else f"no --{option}"
        given_zh = f"--{option} {before}" if before is not None else f"不带 --{option}"
        raise InvalidInput(
            field=option,
            problem=f"an import of {path.name} into this programme with {given} stopped after "
            f"{state.records:,} records: run it again with {given} to continue it, or with "
            f"--restart to import the file from the top with this {option}",
            problem_zh=f"此前以 {given_zh} 把 {path.name} 导入本计划,在 {state.records:,} 条后"
            f"中断:请仍以 {given_zh} 再次运行以继续,或加 --restart 以本次的设置从头导入",
        )


def _key(record: Record) -> list[str]:
    """What names a record in the database: an event's (or order's) source and external id,
    a member's reference."""
    if isinstance(record.request, EventIn):
        return [record.request.source, record.request.external_id]
    return [record.request[0].external_ref]


def _resumable(
    db: Database, program_id: int, kind: Kind, state: _Saved, errors_path: Path,
    report: Report, language: str,
) -> bool:  # fmt: skip
    """Whether the run can continue after what the progress record says is committed: the
    database holds its last committed record (another database behind the same URL, a
    backup restored or a demo rebuilt, may not), and the error file is at least as long as
    it was then (else some of its rows are gone). Else ``report`` says why not."""
    zh = language.lower().startswith("zh")
    if state.last is not None and not db.run(
        lambda uow: _holds(uow, program_id, kind, state.last or []), read_only=True
    ):
        what = _named(kind, state.last, zh)
        report.started_over = (
            f"本数据库中没有上次运行最后提交的{what}:它不是上次导入的数据库(已恢复或重建?),"
            f"本次从头开始(已导入的记录不会重复导入)"
            if zh
            else f"this database does not hold {what}, the last record an earlier run "
            f"committed: it is not the database that run imported into (restored or rebuilt?), "
            f"so this run starts from the top (nothing is applied twice)"
        )
        return False
    length = errors_path.stat().st_size if errors_path.exists() else 0
    if length < state.errors_bytes:
        report.started_over = (
            f"错误文件 {errors_path} 已被改动或删除,本次从头开始,以完整写出被拒绝的行"
            f"(已导入的记录不会重复导入)"
            if zh
            else f"the error file {errors_path} was changed or removed since the earlier run, "
            f"so this run starts from the top to write the rejected rows whole (nothing is "
            f"applied twice)"
        )
        return False
    return True


def _holds(uow: UnitOfWork, program_id: int, kind: Kind, key: list[str]) -> bool:
    """Whether the database holds the record named by ``key`` (:func:`_key`)."""
    if kind == "members":
        query = select(members.c.id).where(
            members.c.program_id == program_id, members.c.external_ref == key[0]
        )
    else:
        query = select(events.c.id).where(
            events.c.program_id == program_id, events.c.source == key[0],
            events.c.external_id == key[1],
        )  # fmt: skip
    return uow.conn.execute(query).first() is not None


def _named(kind: Kind, key: list[str], zh: bool) -> str:
    """A record by its key, as a message names it."""
    if kind == "members":
        return f"会员 {key[0]}" if zh else f"member {key[0]}"
    if zh:
        return f"来源 {key[0]} 的{'订单' if kind == 'orders' else '事件'} {key[1]}"
    return f"the {'order' if kind == 'orders' else 'event'} {key[1]} of source {key[0]}"


def _cut(errors_path: Path, length: int) -> None:
    """The error file as the last committed batch left it: rows written after it, by a run
    that stopped before saving its progress, are written again by this one."""
    if length == 0:
        errors_path.unlink(missing_ok=True)
    else:
        os.truncate(errors_path, length)


def _check_not_shared(
    path: Path, checkpoint: Path, fingerprint: Mapping[str, Any], errors_path: Path, *,
    restart: bool,
) -> None:  # fmt: skip
    """Refuse to start an import from the top over an error file that an unfinished import
    of the same file into another database or programme writes to: this run would remove
    that one's rejected rows. With ``restart``, that import's progress is dropped instead
    (unless it is running)."""
    pattern = glob.escape(path.name) + ".*.progress.json"
    for other in sorted(path.parent.glob(pattern)):
        if other == checkpoint:
            continue
        with other.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                running = False
            except BlockingIOError:
                running = True
            try:
                theirs = json.loads(handle.read() or "{}")
            except ValueError:
                continue
            same = all(theirs.get(k) == fingerprint[k] for k in ("size", "mtime_ns", "errors"))
            if not same or not (running or theirs.get("position")):
                continue
            if restart and not running:
                other.unlink(missing_ok=True)
                continue
        raise InvalidInput(
            field="errors",
            problem=f"{errors_path} holds the rejected rows of an import of {path.name} into "
            f"another database or programme that is {'running' if running else 'unfinished'} "
            f"({other.name}): finish that import first (run it again), or give this one "
            f"another error file with --errors OTHER.csv"
            + ("" if running else "; --restart drops the unfinished import"),
            problem_zh=f"{errors_path} 存有 {path.name} 导入另一数据库或计划时被拒绝的行,该导入"
            f"{'正在运行' if running else '尚未完成'}({other.name}):请先完成该导入(再次运行它),"
            f"或用 --errors OTHER.csv 为本次导入另给错误文件"
            + ("" if running else ";--restart 会放弃那个未完成的导入"),
        )


def _scan(
    path: Path, header: list[str], width: int, report: Report, progress: Progress | None
) -> dict[int, list[int]]:
    """The orders split over the file (see :func:`split_orders`), read through once before
    importing, reported as it goes. Of a file that cannot be read to the end, the rows
    before the one at fault: the import stops there, saying why, after the orders before
    it, as it does for events and members."""
    report.scanning = True
    with path.open("rb") as raw:
        rows = _Rows(raw)
        next(iter(rows))  # the header, read already

        def read() -> Iterator[tuple[Place, Row]]:
            try:
                for count, item in enumerate(_rows_of(rows, header, width), 1):
                    if progress and count % SCAN_EVERY == 0:
                        report.bytes_read = raw.tell()
                        progress(report)
                    yield item
            except (_Unreadable, _TooLong, csv.Error):
                return

        split = split_orders(read())
    report.scanning, report.bytes_read = False, 0
    return split


def _header(kind: Kind, rows: _Rows, path: Path) -> tuple[list[str], int]:
    """The file's column names, checked, and how many fields it has: empty names at the end
    (a trailing comma, as spreadsheets write for an empty formatted column) are left out."""
    try:
        _, values = next(iter(rows))
    except StopIteration:
        raise InvalidInput(
            field="file", problem=f"{path} is empty", problem_zh=f"{path} 是空文件"
        ) from None
    header = [h.strip() for h in values]
    while header and not header[-1]:
        header.pop()
    try:
        check_header(kind, header)
    except RowError as exc:
        raise InvalidInput(field=exc.column, problem=exc.reason, problem_zh=exc.reason_zh) from exc
    return header, len(values)


def _check_not_input(path: Path, errors_path: Path) -> None:
    """Refuse an error file that is the file imported: a run from the top removes the error
    file of the run before, which would be the user's data."""
    if errors_path.resolve() == path.resolve() or (
        errors_path.exists() and os.path.samefile(errors_path, path)
    ):
        raise InvalidInput(
            field="errors",
            problem=f"{errors_path} is the file being imported: give another file for the "
            "rejected rows (by default FILE.errors.csv)",
            problem_zh=f"{errors_path} 就是要导入的文件:请为被拒绝的行另给一个文件"
            "(默认为 FILE.errors.csv)",
        )


def _check_writable(checkpoint: Path, errors_path: Path) -> None:
    """Refuse, before anything is imported, an import whose progress file or error file
    could not be written (rather than failing after the first batch)."""
    if errors_path.is_dir():
        raise InvalidInput(
            field="errors",
            problem=f"{errors_path} is a folder: give the path of a file for the rejected rows",
            problem_zh=f"{errors_path} 是一个文件夹:请给出存放被拒绝行的文件路径",
        )
    for target, option in ((checkpoint, "file"), (errors_path, "errors")):
        probe = target if target.exists() else target.with_name(target.name + ".probe")
        try:
            with probe.open("a"):
                pass
            if probe is not target:
                probe.unlink()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            if option == "file":
                raise InvalidInput(
                    field="file",
                    problem=f"an import keeps its progress beside the file ({checkpoint}), so "
                    f"that an interrupted import continues where it stopped, but it cannot be "
                    f"written there ({why}): copy the file to a folder you can write to",
                    problem_zh=f"导入会在文件旁记录进度({checkpoint}),中断后可从中断处继续,"
                    f"但无法写入该位置({why}):请把文件复制到可写的文件夹",
                ) from None
            raise InvalidInput(
                field="errors",
                problem=f"cannot write the rejected rows to {errors_path} ({why})",
                problem_zh=f"无法把被拒绝的行写入 {errors_path}({why})",
            ) from None


class _Unreadable(Exception):
    """A line of the file that is not UTF-8 text."""

    def __init__(self, line: int, byte: int, position: int, gbk: bool = False) -> None:
        super().__init__(f"line {line} is not UTF-8 text")
        self.line, self.byte, self.position = line, byte, position
        self.gbk = gbk
        """The line reads as GBK (Excel's plain CSV on a Chinese Windows)."""


class _TooLong(Exception):
    """A line longer than :data:`LINE_LIMIT`; ``cr_only``: lines seem to end in CR alone."""

    def __init__(self, cr_only: bool) -> None:
        super().__init__("line too long")
        self.cr_only = cr_only


class _Lines:
    """The file's text lines, each read with a bound (memory stays flat whatever the file
    holds) and decoded alone, so that a line that is not UTF-8 is named by its number (a
    newline byte never occurs inside a UTF-8 or GBK character); ``number``: the last read."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        while chunk := self.raw.readline(LINE_LIMIT + 1):
            self.number += 1
            if len(chunk) > LINE_LIMIT and not chunk.endswith(b"\n"):
                raise _TooLong(cr_only=b"\r" in chunk)
            try:
                yield chunk.decode("utf-8-sig" if self.number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                gbk = _reads_as(chunk, "gbk")
                raise _Unreadable(self.number, chunk[exc.start], exc.start + 1, gbk) from None


def _reads_as(chunk: bytes, encoding: str) -> bool:
    try:
        chunk.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


class _Rows:
    """The file's CSV records, each with its :class:`Place`: its row (the header is row 1)
    and the text line it starts on, which differ after a quoted field with line breaks."""

    def __init__(self, raw: BinaryIO) -> None:
        self.lines = _Lines(raw)
        self.reader = csv.reader(self.lines)
        self.row = 0
        self.began = 1
        """The text line the row being read begins on."""

    def __iter__(self) -> Iterator[tuple[Place, list[str]]]:
        while True:
            line = self.began = self.lines.number + 1
            try:
                values = next(self.reader)
            except StopIteration:
                return
            self.row += 1
            yield Place(self.row, line), values

    def at_fault(self, exc: Exception | None = None) -> Place:
        """The row being read and the line read last: where reading stopped; for a field
        longer than a field may be (``exc``), the line the row begins on, where the double
        quote that ran on is opened."""
        if isinstance(exc, csv.Error) and _RAN_ON in str(exc):
            return Place(self.row + 1, self.began)
        return Place(self.row + 1, self.lines.number)


_RAN_ON = "field larger than field limit"
"""What Python's CSV reader says of a field too long: a double quote never closed, mostly."""


def _stopped(exc: Exception, place: Place, committed: int) -> InvalidInput:
    """Why the file could not be read on, and what stands."""
    where, where_zh = place.said("en"), place.said("zh")
    if isinstance(exc, _Unreadable):
        en = (
            f"{where} is not UTF-8 text (byte {exc.position} of the line, {exc.byte:#04x})"
            + (", it reads as GBK (Excel's plain CSV on a Chinese Windows)" if exc.gbk else "")
            + ": save the file as UTF-8 (in Excel: CSV UTF-8) and run the import again"
        )
        zh = (
            f"{where_zh}不是 UTF-8 文本(第 {exc.position} 个字节 {exc.byte:#04x})"
            + (",看来是 GBK 编码(中文 Windows 上 Excel 的普通“CSV”)" if exc.gbk else "")
            + ":请将文件另存为 UTF-8 编码(Excel 中选“CSV UTF-8”)后重新导入"
        )
    elif isinstance(exc, _TooLong):
        en = f"{where} is longer than {LINE_LIMIT:,} bytes: it is not read"
        zh = f"{where_zh}超过 {LINE_LIMIT:,} 字节,未予读取"
        if exc.cr_only:
            en += "; its lines seem to end in CR alone (CSV for Macintosh): save it as CSV UTF-8"
            zh += ";其各行似乎只以 CR 结尾(Macintosh 格式 CSV):请另存为“CSV UTF-8”"
    elif _RAN_ON in str(exc):
        en = (
            f"{where} cannot be read as CSV: a field of it is longer than "
            f"{csv.field_size_limit():,} characters, most likely as a double quote opened in it "
            f'is never closed. Close it (a double quote inside a field is written twice, "") '
            f"and run the import again"
        )
        zh = (
            f"{where_zh}无法按 CSV 读取:其中某个字段超过 {csv.field_size_limit():,} 个字符,"
            f'多半是其中的双引号没有闭合。请补上闭合的双引号(字段内的双引号须写两次:""),'
            f"然后重新导入"
        )
    elif "new-line character seen in unquoted field" in str(exc):
        en = (
            f"{where} cannot be read as CSV: it has a line break (CR) outside double quotes. "
            f"If the file's lines end in CR alone (CSV for Macintosh), save it as CSV UTF-8; "
            f"else put the field that holds it in double quotes, and run the import again"
        )
        zh = (
            f"{where_zh}无法按 CSV 读取:双引号外有换行符(CR)。若文件各行只以 CR 结尾"
            f"(Macintosh 格式 CSV),请另存为“CSV UTF-8”;否则请给含换行符的字段加上双引号,"
            f"然后重新导入"
        )
    else:
        en = f"{where} cannot be read as CSV ({exc}): correct it and run the import again"
        zh = f"{where_zh}无法按 CSV 读取({exc}):请修改后重新导入"
    if committed:
        en += (
            f"; the {committed:,} records before it are imported, and the next run continues "
            f"after them"
        )
        zh += f";之前的 {committed:,} 条已导入,下次运行将从其后继续"
    return InvalidInput(field="file", problem=en, problem_zh=zh)


def _records(
    kind: Kind, rows: Iterable[tuple[Place, list[str]]], header: list[str], width: int,
    source: str, zone: tzinfo, split: Mapping[int, list[int]],
) -> Iterator[Record | _Rejected]:  # fmt: skip
    """Records from the rows, and the rows that cannot make one (``split``: the orders split
    over the file)."""
    if kind == "orders":
        for item in order_records(_rows_of(rows, header, width), source, zone, split):
            yield item if isinstance(item, Record) else _Rejected(*item)
        return
    for place, row in _rows_of(rows, header, width):
        if isinstance(row, Misshapen):
            yield _Rejected((place,), (row,), row.error)
            continue
        try:
            if kind == "events":
                yield event_record(place, row, source, zone)
            else:
                yield member_record(place, row)
        except RowError as exc:
            yield _Rejected((place,), (row,), exc)


def _rows_of(
    rows: Iterable[tuple[Place, list[str]]], header: list[str], width: int
) -> Iterator[tuple[Place, Row]]:
    """The rows that are not blank, by column (or misshapen)."""
    for place, values in rows:
        if any(v.strip() for v in values):
            yield place, _row(values, header, width)


def _row(values: list[str], header: list[str], width: int) -> Row:
    """A row's values by column; or, its fields not matching the header, as it came. The
    header's unnamed columns at the end (``width``: named and unnamed) may be left empty or
    out."""
    beyond = [n for n, v in enumerate(values[len(header) :], len(header) + 1) if v.strip()]
    if len(header) <= len(values) <= width and not beyond:
        named = zip(header, values, strict=False)  # without the empty unnamed ones
        return {h: v.strip() for h, v in named if h not in ERROR_COLUMNS}
    if len(header) <= len(values) <= width:
        error = RowError(
            "row",
            f"has a value in column {beyond[0]}, which the header does not name",
            f"第 {beyond[0]} 列有值,但表头没有为该列命名",
        )
    else:
        error = RowError(
            "row",
            f"has {len(values)} fields, the header {len(header)}",
            f"有 {len(values)} 个字段,表头有 {len(header)} 个",
        )
    return misshapen(values, header, error)


def _commit(
    db: Database, program_id: int, kind: Kind, items: list[Record | _Rejected], report: Report,
    errors: _ErrorFile, language: str, merchant: str | None,
) -> Record | None:  # fmt: skip
    """Commit a batch, count it in ``report`` and write its refusals; the last of its
    records that the database now holds, if any."""
    records = [item for item in items if isinstance(item, Record)]

    def work(uow: UnitOfWork) -> _Outcome:
        outcome = _Outcome()  # built afresh if the transaction is retried
        if kind != "members":  # events, and orders (each an order.paid event)
            _ingest(uow, program_id, kind, records, outcome, language, merchant)
            return outcome
        for record in records:
            try:
                with uow.savepoint():
                    _register(uow, program_id, record, outcome, language)
            except JifenError as exc:
                column = _MEMBER_COLUMNS.get(exc.code, str(exc.params.get("field", "")))
                outcome.refused.append(_Refusal(record, column, exc.code, exc.message(language)))
        return outcome

    outcome = db.run(work) if records else _Outcome()
    for item in items:
        if isinstance(item, _Rejected):
            error = item.error
            refusal = _Refusal(item, error.column, "invalid_input", error.said(language), error.at)
            outcome.refused.append(refusal)
    report.records += sum(not _continues(item) for item in items)
    report.accepted += outcome.accepted
    report.replayed += outcome.replayed
    report.points += outcome.points
    report.refused += sum(not _continues(refusal.item) for refusal in outcome.refused)
    for refusal in sorted(outcome.refused, key=lambda r: r.item.lines):
        errors.write(refusal, language)
    return outcome.held


def _continues(item: Record | _Rejected) -> bool:
    """Further rows of the record before, not a record of its own."""
    return isinstance(item, _Rejected) and item.more


def _refuse(outcome: _Outcome, kind: Kind, record: Record, exc: JifenError, language: str) -> None:
    """``record`` refused, named by the CSV column (and for an order, the row) at fault: for
    a member that is not there, the column naming it; for a field inside an event's payload,
    the payload column (the reason names the field)."""
    field_ = str(exc.params.get("field", ""))
    if isinstance(exc, UnknownMember) and isinstance(record.request, EventIn):
        field_ = "member_ref" if record.request.member_ref is not None else "member_id"
    column, at = order_column(field_) if kind == "orders" else (field_.split(".")[0], None)
    reason = exc.message(language)
    if kind == "orders" and type(exc) is InvalidInput and column != field_:
        # said of the file's column, not of the event the order's rows became
        reason = type(exc)(**{**exc.params, "field": column}).message(language)
    outcome.refused.append(_Refusal(record, column, exc.code, reason, at))


def _changed(kind: Kind, event: EventIn, language: str) -> str:
    """Why an event or order imported before cannot be imported again with other values."""
    if kind == "orders":
        order = event.payload.get("order_id", event.external_id)
        if language.startswith("zh"):
            return (
                f"订单 {order} 此前已按其他明细或金额导入:同一订单的各行须相邻;已导入的订单"
                f"不能通过再次导入来修改(退货请发送 order.refunded 事件)"
            )
        return (
            f"order {order} was imported before with other lines or amounts: an order's lines "
            f"must be on consecutive rows, and an order imported before cannot be changed by "
            f"importing it again (send an order.refunded event for a return)"
        )
    if language.startswith("zh"):
        return (
            f"来源 {event.source} 的事件 {event.external_id} 此前已按其他内容导入,"
            f"已导入的事件不能通过再次导入来修改"
        )
    return (
        f"event {event.external_id} of source {event.source} was imported before with other "
        f"values; an event imported before cannot be changed by importing it again"
    )


def _ingest(
    uow: UnitOfWork, program_id: int, kind: Kind, records: list[Record], outcome: _Outcome,
    language: str, merchant: str | None,
) -> None:  # fmt: skip
    """A batch of event records, ingested together (see :func:`events_service.ingest_many`),
    their points posted for ``merchant`` and the store the event names, as the API posts
    them."""
    requests = [record.request for record in records if isinstance(record.request, EventIn)]
    origins = [(merchant, events_service.store_of(request)) for request in requests]
    results = events_service.ingest_many(
        uow, program_id=program_id, events=requests, origins=origins
    )
    for record, request, result in zip(records, requests, results, strict=True):
        if isinstance(result, IdempotencyConflict):
            reason = _changed(kind, request, language)
            outcome.refused.append(_Refusal(record, "", result.code, reason))
        elif isinstance(result, JifenError):
            _refuse(outcome, kind, record, result, language)
        elif isinstance(result, Exception):
            raise result
        elif result.replayed:
            outcome.replayed += 1
            outcome.held = record
        else:
            outcome.accepted += 1
            outcome.points += result.points
            outcome.held = record


def _register(
    uow: UnitOfWork, program_id: int, record: Record, outcome: _Outcome, language: str
) -> None:
    assert not isinstance(record.request, EventIn)
    member, tier = record.request
    try:
        profile = members_service.register(uow, program_id=program_id, body=member)
    except DuplicateReference as duplicate:
        try:  # a member imported before (its phone, if any, is its own)
            found = members_service.find_member(
                uow, program_id=program_id, external_ref=member.external_ref
            )
        except UnknownMember:
            raise duplicate from None  # a new member with another member's phone: refused
        differ = _differs(uow, program_id, found.id, member, tier)
        if not differ:
            outcome.replayed += 1
            outcome.held = record
            return
        reason = _member_changed(member.external_ref, differ, language)
        outcome.refused.append(_Refusal(record, differ[0], IdempotencyConflict.code, reason))
        return
    if tier is not None:
        tiers_service.set_member_tier(uow, program_id=program_id, member_id=profile.id,
                                      tier=tier, reason="import", set_by="import")  # fmt: skip
    outcome.accepted += 1
    outcome.held = record


def _differs(
    uow: UnitOfWork, program_id: int, member_id: int, member: MemberCreate, tier: str | None
) -> list[str]:
    """The columns in which a row for a member already there differs from that member (an
    empty cell says nothing, so it differs in nothing)."""
    profile = members_service.get_profile(uow, program_id=program_id, member_id=member_id)
    given = member.model_fields_set - {"external_ref", "phone"}
    differ = [c for c in sorted(given) if _plain(getattr(member, c)) != _plain(getattr(profile, c))]
    if member.phone is not None:
        stored = uow.conn.execute(
            select(members.c.phone_hash).where(members.c.id == member_id)
        ).scalar_one()
        if stored not in keyed_hashes(members_core.normalise_phone(member.phone)):
            differ.append("phone")
    if tier is not None:
        held = tiers_service.member_tier(uow, program_id=program_id, member_id=member_id)
        if held.tier != tier:
            differ.append("tier")
    return differ


def _plain(value: Any) -> Any:
    """A value as compared: tags in any order."""
    return sorted(value) if isinstance(value, list) else value


def _member_changed(ref: str, columns: list[str], language: str) -> str:
    """Why a row for a member already there, with other values, is refused."""
    if language.startswith("zh"):
        return (
            f"会员 {ref} 已存在,其 {', '.join(columns)} 与本行不同:导入只新增会员,"
            f"修改已有会员请通过 API 或员工工具"
        )
    return (
        f"member {ref} is already there with other values in {', '.join(columns)}: an import "
        f"only adds members; an existing member is changed through the API or the staff tools"
    )


class _Checkpoint:
    """The progress record of an import into one database and programme (:class:`_Saved`),
    kept beside the file, and locked while the import runs, so that a second import of the
    same file into the same programme stops at once (it would write the same rows to the
    error file again). Written in place, a crash in the middle of a write leaves a record
    that is not read: the next run starts from the top, applying nothing twice."""

    def __init__(self, path: Path, fingerprint: Mapping[str, Any], imported: Path) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.imported = imported
        self.handle: TextIO | None = None

    def __enter__(self) -> _Checkpoint:
        while self.handle is None:
            handle = os.fdopen(_owner_only(self.path, os.O_RDWR), "r+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise InvalidInput(
                    field="file",
                    problem=f"{self.imported} is being imported into this programme already "
                    f"(by another process): wait for it to finish, or stop it first",
                    problem_zh=f"{self.imported} 正被另一个进程导入本计划:请等其结束,或先停止它",
                ) from None
            if os.path.exists(self.path) and os.path.samefile(self.path, handle.fileno()):
                self.handle = handle
            else:
                handle.close()  # finished and removed meanwhile by the import before: anew
        return self

    def __exit__(self, *_: object) -> None:
        if self.handle is not None:
            if self.committed().position == 0:
                self.finish()  # stopped before a batch was committed: nothing to continue
            self.handle.close()  # which releases the lock

    def committed(self) -> _Saved:
        """What an earlier run of this import committed (nothing: none, or another file)."""
        assert self.handle is not None
        self.handle.seek(0)
        try:
            saved = json.loads(self.handle.read() or "{}")
            if {k: saved.get(k) for k in self.fingerprint} != dict(self.fingerprint):
                return _Saved()
            return _Saved(int(saved["position"]), int(saved["records"]), saved["last"],
                          int(saved["errors_bytes"]), saved.get("options"))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return _Saved()

    def save(self, report: Report, state: _Saved) -> None:
        assert self.handle is not None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({**self.fingerprint, **asdict(state),
                                      "report": asdict(report)}))  # fmt: skip
        self.handle.flush()

    def finish(self) -> None:
        """The import is done: the next one starts from the top."""
        self.path.unlink(missing_ok=True)


def _owner_only(path: Path, flags: int) -> int:
    """Open (or create) ``path`` readable and writable by its owner alone, whatever the
    umask or an earlier run left: an error file holds refused rows as they were (phone
    numbers, names) and a progress record the last record's reference, which other users
    of the machine have no business reading. The descriptor."""
    descriptor = os.open(path, flags | os.O_CREAT, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


class _ErrorFile:
    """The rejected rows as they were, each with its line, column, code and reason in
    :data:`ERROR_COLUMNS` (opened only when needed): put right, the file can be imported
    again as it is."""

    def __init__(self, path: Path, *, append: bool) -> None:
        self.path = path
        self.append = append
        self.handle: io.TextIOWrapper | None = None
        self.writer: Any = None
        self.columns: list[str] = []
        self.count = 0

    def __enter__(self) -> _ErrorFile:
        return self

    def __exit__(self, *_: object) -> None:
        if self.handle is not None:
            self.handle.close()

    def header(self, columns: list[str]) -> None:
        self.columns = [c for c in columns if c not in ERROR_COLUMNS]

    def size(self) -> int:
        """The file's length in bytes: what it holds so far (0: none)."""
        if self.handle is not None:
            return os.fstat(self.handle.fileno()).st_size
        return self.path.stat().st_size if self.append and self.path.exists() else 0

    def write(self, refusal: _Refusal, language: str) -> None:
        """The rows of a refused record: the row at fault (or every row) with why, a
        misshapen row with its own reason, the other rows of its order naming that row."""
        if self.writer is None:
            exists = self.append and self.path.exists()
            flags = os.O_WRONLY | (os.O_APPEND if exists else os.O_TRUNC)
            self.handle = os.fdopen(
                _owner_only(self.path, flags), "a" if exists else "w", encoding="utf-8",
                newline="",
            )  # fmt: skip
            self.writer = csv.writer(self.handle)
            if not exists:
                self.writer.writerow([*self.columns, *ERROR_COLUMNS])
        lines, at = refusal.item.lines, refusal.at
        for index, (place, row) in enumerate(zip(lines, refusal.item.rows, strict=True)):
            column, code, reason = refusal.column, refusal.code, refusal.reason
            if isinstance(row, Misshapen):
                column, code, reason = row.error.column, "invalid_input", row.error.said(language)
            elif at is not None and index != at:
                column, reason = "", _with_its_order(lines[at], language)
            self.writer.writerow([*self._values(row), place.row, column, code, reason])
        self.handle.flush()  # type: ignore[union-attr]
        self.count += 1

    def _values(self, row: Row) -> list[str]:
        width = len(self.columns)
        if isinstance(row, Mapping):
            return [row.get(c, "") for c in self.columns]
        values = list(row.values)  # a row whose fields do not match the header: as they came
        if len(values) > width:
            values[width - 1 :] = [",".join(values[width - 1 :])]
        return values + [""] * (width - len(values))


def _with_its_order(fault: Place, language: str) -> str:
    """Why a good row of an order with a bad one is refused too: so that the order, put
    right, imports whole from the error file."""
    if language.startswith("zh"):
        return f"随所在订单一并拒绝:{fault.said(language)}有误"
    return f"refused with the rest of its order: {fault.said(language)} is at fault"
