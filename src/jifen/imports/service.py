"""CSV imports of events, orders and members: streamed in batches (memory stays flat
however long the file), each batch one transaction with a savepoint per record, so a bad
record is written to the error file with its line and reason while the good ones go in.

An import can be interrupted at any point and run again: a progress file beside the CSV
records how many records are committed, and the next run continues after them. Even
without it nothing is applied twice: events are keyed by (source, external id), members by
their reference.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jifen.db.uow import Database, UnitOfWork
from jifen.errors import (
    DuplicateReference,
    IdempotencyConflict,
    InvalidInput,
    JifenError,
    UnknownMember,
)
from jifen.events import service as events_service
from jifen.events.schemas import EventIn
from jifen.imports.core import (
    ERROR_COLUMNS,
    Kind,
    Record,
    Row,
    RowError,
    check_header,
    event_record,
    member_record,
    order_records,
)
from jifen.members import service as members_service
from jifen.tiers import service as tiers_service

BATCH = 500
_SOURCE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
"""What a source may be named (as an event's ``source``)."""


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


@dataclass(frozen=True)
class _Rejected:
    """A row that could not even become a request; counted as a record, so that a resumed
    import skips it too (and does not write it to the error file twice)."""

    lines: tuple[int, ...]
    error: RowError
    rows: tuple[Row, ...]


@dataclass
class _Outcome:
    accepted: int = 0
    replayed: int = 0
    points: int = 0
    refused: list[tuple[Record | _Rejected, str, str, str]] = field(default_factory=list)
    """(record, column, code, reason)."""


Progress = Callable[[Report], None]


def progress_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress.json")


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
) -> Report:
    """Import ``path``; continue after the records an earlier, interrupted run committed
    (unless ``restart``). The reasons in the error file are in ``language``.

    A file that cannot be read to the end (not UTF-8, a malformed line) stops the import
    with :class:`InvalidInput` naming the line; the batches before it stay committed, and
    the next run continues after them."""
    started = time.monotonic()
    if not _SOURCE.fullmatch(source):
        raise InvalidInput(
            field="source",
            problem=f"{source!r} is not a source name: lower-case letters, digits, '.', '_' "
            "and '-', starting with a letter or digit, at most 64 (for example pos or crm)",
            problem_zh=f"{source!r} 不是有效的来源名:只能用小写字母、数字及 . _ -,"
            "以字母或数字开头,至多 64 个字符(例如 pos 或 crm)",
        )
    errors_path = errors_path or errors_path_for(path)
    checkpoint = progress_path(path)
    _check_writable(checkpoint, errors_path)
    stat = path.stat()
    fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "kind": kind,
                   "program_id": program_id}  # fmt: skip
    done = 0
    if checkpoint.exists() and not restart:
        saved = json.loads(checkpoint.read_text())
        if {k: saved.get(k) for k in fingerprint} == fingerprint:
            done = int(saved["records"])
    report = Report(kind=kind, path=str(path), records=done, resumed_from=done,
                    errors_path=str(errors_path), bytes_total=stat.st_size)  # fmt: skip
    if done == 0:
        errors_path.unlink(missing_ok=True)  # an earlier run's, which this run replaces

    with path.open("rb") as raw, _ErrorFile(errors_path, append=done > 0) as errors:
        reader = csv.reader(_decoded(raw))
        try:
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise InvalidInput(
                    field="file", problem=f"{path} is empty", problem_zh=f"{path} 是空文件"
                ) from None
            try:
                check_header(kind, header)
            except RowError as exc:
                raise InvalidInput(
                    field=exc.column, problem=exc.reason, problem_zh=exc.reason_zh
                ) from exc
            errors.header(header)
            records = _records(kind, reader, header, source)
            pending: list[Record | _Rejected] = []
            for index, record in enumerate(records):
                if index < done:
                    continue  # committed by an earlier run
                pending.append(record)
                if len(pending) >= batch:
                    _commit(db, program_id, kind, pending, report, errors, language)
                    pending = []
                    report.bytes_read = raw.tell()
                    _save(checkpoint, fingerprint, report)
                    if progress:
                        progress(report)
        except (_Unreadable, csv.Error) as exc:
            raise _stopped(exc, reader.line_num, report.records) from None
        if pending:
            _commit(db, program_id, kind, pending, report, errors, language)
        report.bytes_read = stat.st_size
        _save(checkpoint, fingerprint, report)
    checkpoint.unlink(missing_ok=True)  # finished: a new run starts from the top
    report.seconds = time.monotonic() - started
    if progress:
        progress(report)
    return report


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

    def __init__(self, line: int, byte: int, position: int) -> None:
        super().__init__(f"line {line} is not UTF-8 text")
        self.line, self.byte, self.position = line, byte, position


def _decoded(raw: Iterator[bytes]) -> Iterator[str]:
    """The file's lines as text, each decoded alone so that a line that is not UTF-8 is
    named by its number (a newline byte never occurs inside a UTF-8 or GBK character)."""
    for number, chunk in enumerate(raw, start=1):
        try:
            yield chunk.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _Unreadable(number, chunk[exc.start], exc.start + 1) from None


def _stopped(exc: Exception, line: int, committed: int) -> InvalidInput:
    """Why the file could not be read on, and what stands."""
    if isinstance(exc, _Unreadable):
        en = (
            f"line {exc.line} is not UTF-8 text (byte {exc.byte:#04x} at character "
            f"{exc.position}): save the file as UTF-8 (in Excel: CSV UTF-8) and run the "
            f"import again"
        )
        zh = (
            f"第 {exc.line} 行不是 UTF-8 文本(第 {exc.position} 个字节 {exc.byte:#04x}):"
            f"请将文件另存为 UTF-8 编码(Excel 中选“CSV UTF-8”)后重新导入"
        )
    else:
        en = f"line {line + 1} cannot be read as CSV ({exc}): correct it and run the import again"
        zh = f"第 {line + 1} 行无法按 CSV 读取({exc}):请修改后重新导入"
    if committed:
        en += (
            f"; the {committed:,} records before it are imported, and the next run continues "
            f"after them"
        )
        zh += f";之前的 {committed:,} 条已导入,下次运行将从其后继续"
    return InvalidInput(field="file", problem=en, problem_zh=zh)


def _records(
    kind: Kind, reader: Iterator[list[str]], header: list[str], source: str
) -> Iterator[Record | _Rejected]:
    """Records from the rows, and the rows that cannot make one."""

    def rows() -> Iterator[tuple[int, dict[str, str] | _Rejected]]:
        for line, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                error = RowError(
                    "row",
                    f"has {len(values)} fields, the header {len(header)}",
                    f"有 {len(values)} 个字段,表头有 {len(header)} 个",
                )
                yield line, _Rejected((line,), error, (values,))
                continue
            yield (
                line,
                {
                    h: v.strip()
                    for h, v in zip(header, values, strict=True)
                    if h not in ERROR_COLUMNS
                },
            )

    if kind == "orders":
        misshapen: list[_Rejected] = []

        def well_formed() -> Iterator[tuple[int, dict[str, str]]]:
            for line, row in rows():
                if isinstance(row, _Rejected):
                    misshapen.append(row)
                else:
                    yield line, row

        for item in order_records(well_formed(), source):
            yield from misshapen
            misshapen.clear()
            if isinstance(item, Record):
                yield item
            else:
                lines, rows_read, error = item
                yield _Rejected(lines, error, rows_read)
        yield from misshapen
        return
    for line, row in rows():
        if isinstance(row, _Rejected):
            yield row
            continue
        try:
            yield event_record(line, row, source) if kind == "events" else member_record(line, row)
        except RowError as exc:
            yield _Rejected((line,), exc, (row,))


def _commit(
    db: Database, program_id: int, kind: Kind, items: list[Record | _Rejected], report: Report,
    errors: _ErrorFile, language: str,
) -> None:  # fmt: skip
    records = [item for item in items if isinstance(item, Record)]

    def work(uow: UnitOfWork) -> _Outcome:
        outcome = _Outcome()  # built afresh if the transaction is retried
        if kind != "members":  # events, and orders (each an order.paid event)
            _ingest(uow, program_id, kind, records, outcome, language)
            return outcome
        for record in records:
            try:
                with uow.savepoint():
                    _register(uow, program_id, record, outcome)
            except JifenError as exc:
                _refuse(outcome, record, exc, language)
        return outcome

    outcome = db.run(work) if records else _Outcome()
    for item in items:
        if isinstance(item, _Rejected):
            reason = item.error.said(language)
            outcome.refused.append((item, item.error.column, "invalid_input", reason))
    report.records += len(items)
    report.accepted += outcome.accepted
    report.replayed += outcome.replayed
    report.points += outcome.points
    report.refused += len(outcome.refused)
    for record, column, code, reason in sorted(outcome.refused, key=lambda r: r[0].lines):
        errors.write(record.lines, record.rows, column, code, reason)


def _refuse(outcome: _Outcome, record: Record, exc: JifenError, language: str) -> None:
    column = str(exc.params.get("field", ""))
    outcome.refused.append((record, column, exc.code, exc.message(language)))


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
    language: str,
) -> None:  # fmt: skip
    """A batch of event records, ingested together (see :func:`events_service.ingest_many`)."""
    requests = [record.request for record in records if isinstance(record.request, EventIn)]
    results = events_service.ingest_many(uow, program_id=program_id, events=requests)
    for record, request, result in zip(records, requests, results, strict=True):
        if isinstance(result, IdempotencyConflict):
            reason = _changed(kind, request, language)
            outcome.refused.append((record, "", result.code, reason))
        elif isinstance(result, JifenError):
            _refuse(outcome, record, result, language)
        elif isinstance(result, Exception):
            raise result
        elif result.replayed:
            outcome.replayed += 1
        else:
            outcome.accepted += 1
            outcome.points += result.points


def _register(uow: UnitOfWork, program_id: int, record: Record, outcome: _Outcome) -> None:
    assert not isinstance(record.request, EventIn)
    member, tier = record.request
    try:
        profile = members_service.register(uow, program_id=program_id, body=member)
    except DuplicateReference as duplicate:
        try:  # a member imported before (its phone, if any, is its own): nothing to do
            members_service.find_member(
                uow, program_id=program_id, external_ref=member.external_ref
            )
        except UnknownMember:
            raise duplicate from None  # a new member with another member's phone: refused
        outcome.replayed += 1
        return
    if tier is not None:
        tiers_service.set_member_tier(uow, program_id=program_id, member_id=profile.id,
                                      tier=tier, reason="import", set_by="import")  # fmt: skip
    outcome.accepted += 1


def _save(checkpoint: Path, fingerprint: Mapping[str, Any], report: Report) -> None:
    """Write the progress file atomically (a crash leaves the old one or the new one)."""
    temporary = checkpoint.with_suffix(".tmp")
    temporary.write_text(json.dumps({**fingerprint, "records": report.records,
                                     "report": asdict(report)}))  # fmt: skip
    os.replace(temporary, checkpoint)


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

    def write(self, lines: tuple[int, ...], rows: tuple[Row, ...], column: str, code: str,
              reason: str) -> None:  # fmt: skip
        if self.writer is None:
            exists = self.append and self.path.exists()
            self.handle = self.path.open("a" if exists else "w", encoding="utf-8", newline="")
            self.writer = csv.writer(self.handle)
            if not exists:
                self.writer.writerow([*self.columns, *ERROR_COLUMNS])
        for line, row in zip(lines, rows, strict=True):
            self.writer.writerow([*self._values(row), line, column, code, reason])
        self.handle.flush()  # type: ignore[union-attr]
        self.count += 1

    def _values(self, row: Row) -> list[str]:
        width = len(self.columns)
        if isinstance(row, Mapping):
            return [row.get(c, "") for c in self.columns]
        values = list(row)  # a row whose fields do not match the header: as they came
        if len(values) > width:
            values[width - 1 :] = [",".join(values[width - 1 :])]
        return values + [""] * (width - len(values))
