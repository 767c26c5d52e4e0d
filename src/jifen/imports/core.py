"""CSV rows to what the services take, pure: each kind of import names its columns, and a
row that cannot become a valid request gives a :class:`RowError` saying which column and
why. Orders arrive one row per line and become one ``order.paid`` event per order."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Literal, NamedTuple

import pydantic_core
from pydantic import ValidationError

from jifen.errors import field_problem
from jifen.events.schemas import EventIn, OrderPaid
from jifen.members.schemas import MemberCreate

Kind = Literal["events", "orders", "members"]

COLUMNS: dict[Kind, tuple[list[str], list[str]]] = {
    # kind: (required columns, optional columns)
    "events": (
        ["external_id", "type", "occurred_at"],
        ["source", "member_ref", "member_id", "payload"],
    ),
    "orders": (
        ["order_id", "member_ref", "occurred_at", "sku", "amount_fen"],
        ["source", "category", "quantity", "store", "channel", "paid_with_points", "pickup"],
    ),
    "members": (
        ["external_ref"],
        ["name", "email", "birthday", "gender", "region", "tags", "phone", "tier", "language"],
    ),
}
ERROR_COLUMNS = ("error_line", "error_column", "error_code", "error_reason")
"""What the error file adds to each rejected row; ignored when that file, put right, is
imported again."""


class RowError(Exception):
    """A row that cannot be imported; ``column`` and ``reason`` say what to fix
    (``reason_zh``: in Chinese; without it the Chinese repeats ``reason``)."""

    def __init__(
        self, column: str, reason: str, reason_zh: str | None = None, *, at: int | None = None
    ) -> None:
        super().__init__(f"{column}: {reason}")
        self.column = column
        self.reason = reason
        self.reason_zh = reason_zh or reason
        self.at = at
        """Which of the record's rows is at fault (an order's line); None: the record whole."""

    def said(self, language: str) -> str:
        return self.reason_zh if language.lower().startswith("zh") else self.reason


class Place(NamedTuple):
    """Where a row is: its number as a spreadsheet shows it (the header is row 1), which the
    error file gives, and the text line it starts on, which an editor shows (further on
    than the row after a quoted field with line breaks)."""

    row: int
    line: int

    def said(self, language: str) -> str:
        zh = language.lower().startswith("zh")
        if self.line == self.row:
            return f"第 {self.row} 行" if zh else f"row {self.row}"
        if zh:
            return f"第 {self.row} 行(文本第 {self.line} 行)"
        return f"row {self.row} (line {self.line})"


@dataclass(frozen=True)
class Misshapen:
    """A row whose fields do not match the header's columns, kept as it came (for the error
    file) with why; ``order_id`` is what it has where the header has ``order_id``, if
    anything: the order it belongs to."""

    values: tuple[str, ...]
    error: RowError
    order_id: str | None = None


def misshapen(values: Sequence[str], header: Sequence[str], error: RowError) -> Misshapen:
    """``values`` as a :class:`Misshapen` row, with the order id it carries, if any."""
    at = header.index("order_id") if "order_id" in header else len(values)
    order_id = values[at].strip() if at < len(values) else ""
    return Misshapen(tuple(values), error, order_id or None)


Row = Mapping[str, str] | Misshapen
"""A row as read: its values by column, or a row whose fields do not match the header."""


@dataclass(frozen=True)
class Record:
    """One unit of import: where in the CSV it came from and the request it makes."""

    lines: tuple[Place, ...]
    request: EventIn | tuple[MemberCreate, str | None]
    """An event, or a member with its tier (or None)."""
    rows: tuple[Row, ...] = ()
    """The rows it was read from, as they were (for the error file)."""


class BadOrder(NamedTuple):
    """An order that cannot be imported: its places, its rows and why (``at``: which row)."""

    lines: tuple[Place, ...]
    rows: tuple[Row, ...]
    error: RowError
    more: bool = False
    """Further rows of the order refused just before: an order too long to hold whole is
    refused in parts as its rows stream by (an import counts it once)."""


def check_header(kind: Kind, header: list[str]) -> None:
    """Refuse a file whose header lacks a required column, has an unknown one or names one
    twice (which of the two values would count?)."""
    required, optional = COLUMNS[kind]
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c and c not in (*required, *optional, *ERROR_COLUMNS)]
    twice = sorted({c for c in header if c and header.count(c) > 1})
    unnamed = [n for n, c in enumerate(header, 1) if not c]  # blank between named ones
    if missing or unknown or twice or unnamed:
        en, zh = [], []
        if unnamed:
            at = ", ".join(map(str, unnamed))
            en.append(
                f"column {at} has no name (name it, or remove the column)"
                if len(unnamed) == 1
                else f"columns {at} have no name (name them, or remove them)"
            )
            zh.append(f"第 {at} 列没有列名(请为其命名,或删去该列)")
        if twice:
            en.append(f"column(s) named more than once: {', '.join(twice)}")
            zh.append(f"列名重复:{', '.join(twice)}")
        if missing:
            en.append(f"missing column(s) {', '.join(missing)}")
            zh.append(f"缺少列 {', '.join(missing)}")
        if unknown:
            en.append(f"unknown column(s) {', '.join(unknown)}")
            zh.append(f"未知列 {', '.join(unknown)}")
        raise RowError(
            "header",
            "; ".join(en) + f". The columns of a {kind} file are: "
            + ", ".join(required) + " (required), " + ", ".join(optional) + " (optional).",
            ";".join(zh) + f"。{kind} 文件的列为:{', '.join(required)}(必填),"
            + f"{', '.join(optional)}(可选)。",
        )  # fmt: skip


def _validation(
    exc: ValidationError, columns: Callable[[str], tuple[str, int | None]] | None = None
) -> RowError:
    """The first problem pydantic found, named by the CSV column it comes from (``columns``
    maps a field of the request to that column and the row at fault; none: the field)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "row"
    column, at = columns(where) if columns else (where, None)
    if column == "occurred_at" and first["type"].endswith("_parsing"):
        return _not_a_time(str(first["input"]), column)  # with an offset, yet no time
    return RowError(column, *field_problem(first), at=at)


_ORDER_COLUMNS = {"external_id": "order_id", "payload.order_id": "order_id",
                  "payload.store": "store", "payload.channel": "channel",
                  "payload.pickup": "pickup"}  # fmt: skip
_ORDER_LINE = re.compile(r"payload\.lines\.(\d+)\.(\w+)")


def order_column(field: str) -> tuple[str, int | None]:
    """The CSV column a field of an ``order.paid`` event comes from, and for a line's field
    (``payload.lines.1.amount_fen``) which of the order's rows: what the user corrects."""
    line = _ORDER_LINE.match(field)
    if line:
        return line[2], int(line[1])
    return _ORDER_COLUMNS.get(field, field), None


LOCAL_FORMS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M",
               "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M",
               "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M")  # fmt: skip
"""Times without an offset that an import reads in the programme's time zone: ISO 8601 and
what spreadsheets and tills write (``%m`` and ``%d`` take ``3`` as well as ``03``)."""
_WITH_OFFSET = re.compile(r"\d[T ]\d\d:\d\d.*(Z|[+-]\d\d(:?\d\d)?)$", re.IGNORECASE)


def instant(text: str, zone: tzinfo, column: str = "occurred_at") -> str | datetime:
    """A time as the request takes it: with its UTC offset, as written (the API reads it);
    without one, in ``zone``, the programme's own (what a till or spreadsheet exports)."""
    text = text.strip()
    if _WITH_OFFSET.search(text):
        return text
    for form in LOCAL_FORMS:
        try:
            return datetime.strptime(text, form).replace(tzinfo=zone)
        except ValueError:
            continue
    raise _not_a_time(text, column)


def _not_a_time(text: str, column: str) -> RowError:
    return RowError(
        column,
        f"{text!r} is not a time: write it with its UTC offset (2026-03-01T10:00:00+08:00) "
        "or in the programme's time zone as 2026-03-01 10:00, 2026-03-01 10:00:00, "
        "2026/3/1 10:00 or 2026/03/01 10:00:00",
        f"{text!r} 不是时间:请写带 UTC 偏移的时间(2026-03-01T10:00:00+08:00),或按计划时区"
        "写作 2026-03-01 10:00、2026-03-01 10:00:00、2026/3/1 10:00 或 2026/03/01 10:00:00",
    )


def _payload(text: str) -> Any:
    """A cell's JSON, parsed as the NATS path parses a message: nesting deeper than pydantic's
    limit is refused (Python's own parser would fail with a RecursionError)."""
    try:
        return pydantic_core.from_json(text)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise RowError(
                "payload", "is nested too deeply (at most 200 levels)", "嵌套过深(至多 200 层)"
            ) from None
        raise RowError("payload", f"not JSON: {exc}", f"不是 JSON:{exc}") from None


def event_record(place: Place, row: Mapping[str, str], default_source: str, zone: tzinfo) -> Record:
    payload: Any = _payload(row["payload"]) if row.get("payload") else {}
    if not isinstance(payload, dict):
        raise RowError("payload", "must be a JSON object", "须为 JSON 对象")
    data: dict[str, Any] = {
        "source": row.get("source") or default_source,
        "external_id": row["external_id"],
        "type": row["type"],
        "occurred_at": instant(row["occurred_at"], zone),
        "payload": payload,
    }
    if row.get("member_id"):
        data["member_id"] = row["member_id"]
    if row.get("member_ref"):
        data["member_ref"] = row["member_ref"]
    try:
        return Record((place,), EventIn.model_validate(data), (row,))
    except ValidationError as exc:
        raise _validation(exc) from exc


def _flag(value: str | None, column: str, at: int | None = None) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "n"):
        return False
    if text in ("1", "true", "yes", "y"):
        return True
    raise RowError(
        column,
        f"{value!r} is not true or false (use 1/0, true/false, yes/no)",
        f"{value!r} 不是真或假(请用 1/0、true/false、yes/no)",
        at=at,
    )


def _fen(value: str, at: int) -> int:
    """An order line's amount as written, if it is whole fen: digits alone (a sign is left to
    the request's own check). One with a decimal point is most likely yuan, and pydantic
    would take ``100.00`` for 100 fen, a hundredth of what was paid: it is refused, as is one
    with separators (``5,000``), a currency sign or unit (``¥100``, ``100元``) or nothing,
    saying how to write it."""
    if re.fullmatch(r"[+-]?[0-9]+", value):
        return int(value)
    raise RowError(
        "amount_fen",
        f"{value!r} is not a whole number of fen: write the amount in fen (1 yuan = 100 fen) "
        "with digits alone, no decimal point or separators (12.50 yuan is 1250)",
        f"{value!r} 不是以分计的整数:请以分为单位(1 元 = 100 分)只写数字,不带小数点或"
        "分隔符(12.50 元写作 1250)",
        at=at,
    )


def _whole(value: str) -> int | str:
    """A count as written: digits alone are the number; anything else is left as written,
    for the request's own check to refuse it (an event takes whole numbers only)."""
    return int(value) if re.fullmatch(r"[0-9]{1,9}", value) else value


ORDER_LINES = next(
    m.max_length for m in OrderPaid.model_fields["lines"].metadata if hasattr(m, "max_length")
)
"""The most lines an order may have (as the API takes it): the rows an order can be refused
for having more of are not held beyond this many, so that memory stays flat."""


def _order_id(row: Row) -> str | None:
    """The order a row belongs to by its own id; None: a misshapen row carrying none."""
    return row.order_id if isinstance(row, Misshapen) else row.get("order_id")


def _digest(order_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(order_id.encode(), digest_size=8).digest())


def _packed(place: Place) -> int:
    return place.row << 32 | place.line


def _unpacked(packed: int) -> Place:
    return Place(packed >> 32, packed & 0xFFFFFFFF)


def split_orders(rows: Iterable[tuple[Place, Row]]) -> dict[int, list[int]]:
    """The orders whose rows come in more than one run of consecutive rows (grouped as
    :func:`order_records` groups them), by an 8-byte digest of the id, with where each run
    begins (a :class:`Place`, packed): read before importing, so that every part of such an
    order is refused, the first too (applied alone, it could never be completed). Every
    order seen is remembered by its digest alone: a million orders take some 100 MB at
    most, and only while the file is read."""
    began: dict[int, int] = {}
    split: dict[int, list[int]] = {}
    current: str | None = None
    for place, row in rows:
        order_id = _order_id(row)
        if order_id is None or order_id == current:
            continue  # a misshapen row without an id does not end the order around it
        current = order_id
        digest, here = _digest(order_id), _packed(place)
        first = began.setdefault(digest, here)
        if first != here:
            split.setdefault(digest, [first]).append(here)
    return split


def order_records(
    rows: Iterable[tuple[Place, Row]], default_source: str, zone: tzinfo,
    split: Mapping[int, list[int]] | None = None,
) -> Iterator[Record | BadOrder]:  # fmt: skip
    """Consecutive rows with the same ``order_id`` as one ``order.paid`` event; a bad order
    yields its places, rows and error instead. A misshapen row belongs to the order whose id
    it carries or, carrying none, to the order around it: that order is refused whole, so
    that its rows, put right, import together. Every part of an order in ``split`` (see
    :func:`split_orders`) is refused: the lines of an order must be on consecutive rows. An
    order running over more than :data:`ORDER_LINES` rows is refused in parts as it streams
    by, holding no more than that many rows at a time."""
    orders = _Orders(default_source, zone, split or {})
    for place, row in rows:
        yield from orders.take(place, row)
    yield from orders.end()


def _alone(place: Place, row: Row) -> BadOrder:
    assert isinstance(row, Misshapen)
    return BadOrder((place,), (row,), row.error)


class _Orders:
    """The order being read: its rows held (at most :data:`ORDER_LINES` of them, and at most
    as many misshapen rows without an id after them), or, once it ran over, the refusal its
    further rows are written with."""

    def __init__(self, default_source: str, zone: tzinfo, split: Mapping[int, list[int]]) -> None:
        self.default_source, self.zone, self.split = default_source, zone, split
        self.order_id: str | None = None
        self.group: list[tuple[Place, Row]] = []
        self.strays: list[tuple[Place, Row]] = []  # misshapen, no id: this order's, if it goes on
        self.lines = 0  # rows with the order's id, however many
        self.over: RowError | None = None  # refused, its rows written as they come

    def take(self, place: Place, row: Row) -> Iterator[BadOrder | Record]:
        order_id = _order_id(row)
        if order_id is None:
            if self.order_id is None:
                yield _alone(place, row)
                return
            self.strays.append((place, row))
        elif order_id == self.order_id:
            self.group += [*self.strays, (place, row)]
            self.strays = []
            self.lines += 1
        else:
            yield from self.end()
            self.order_id, self.group, self.lines, self.over = order_id, [(place, row)], 1, None
        # An order's own lines count; misshapen rows after them are the order's only if it
        # goes on, so they are held up to as many, then taken as the order's: refused with it.
        if len(self.group) > ORDER_LINES or len(self.strays) > ORDER_LINES:
            yield self._spill()

    def end(self) -> Iterator[BadOrder | Record]:
        """The order read whole (a different id follows, or the file ends)."""
        if self.over is not None and self.group:
            yield BadOrder(*_split_up(self.group), self.over, more=True)
        elif self.over is None and self.group:
            yield self._made()
        yield from (_alone(*stray) for stray in self.strays)
        self.order_id, self.group, self.strays, self.over = None, [], [], None

    def _spill(self) -> BadOrder:
        """The rows held, refused: the order runs over more rows than it may have."""
        more = self.over is not None
        if self.over is None:
            self.over = self._parts() or _too_long(self.order_id or "", self.lines)
        held, self.group, self.strays = [*self.group, *self.strays], [], []
        return BadOrder(*_split_up(held), self.over, more=more)

    def _made(self) -> Record | BadOrder:
        parts = self._parts()
        if parts is None:
            return _order(self.group, self.default_source, self.zone)
        return BadOrder(*_split_up(self.group), parts)

    def _parts(self) -> RowError | None:
        """Why the order is refused if its rows come in more than one run, else None."""
        starts = self.split.get(_digest(self.order_id or ""))
        if starts is None:
            return None
        order_id = self.order_id
        places = [_unpacked(start) for start in starts]
        return RowError(
            "order_id",
            f"the lines of order {order_id} must be on consecutive rows: its parts begin on "
            + ", ".join(place.said("en") for place in places),
            f"订单 {order_id} 的各行须相邻:该订单分为几段,分别始于"
            + "、".join(place.said("zh") for place in places),
        )


def _too_long(order_id: str, lines: int) -> RowError:
    if lines > ORDER_LINES:
        return RowError(
            "order_id",
            f"order {order_id} has more than {ORDER_LINES} lines: an order has at most "
            f"{ORDER_LINES}",
            f"订单 {order_id} 超过 {ORDER_LINES} 行:一个订单至多 {ORDER_LINES} 行",
        )
    return RowError(
        "row",
        f"order {order_id} runs over more than {ORDER_LINES} rows with the rows among them "
        f"that do not match the header: an order has at most {ORDER_LINES} lines",
        f"订单 {order_id} 连同其间与表头不符的行超过 {ORDER_LINES} 行:一个订单至多 "
        f"{ORDER_LINES} 行",
    )


def _split_up(group: list[tuple[Place, Row]]) -> tuple[tuple[Place, ...], tuple[Row, ...]]:
    return tuple(place for place, _ in group), tuple(row for _, row in group)


def _order(group: list[tuple[Place, Row]], default_source: str, zone: tzinfo) -> Record | BadOrder:
    places, rows = _split_up(group)
    well = [row for row in rows if not isinstance(row, Misshapen)]
    try:
        for at, row in enumerate(rows):
            if isinstance(row, Misshapen):
                raise RowError(row.error.column, row.error.reason, row.error.reason_zh, at=at)
        return Record(places, _order_event(well, default_source, zone), rows)
    except RowError as exc:
        return BadOrder(places, rows, exc)
    except ValidationError as exc:
        return BadOrder(places, rows, _validation(exc, order_column))


def _order_event(rows: list[Mapping[str, str]], default_source: str, zone: tzinfo) -> EventIn:
    """The ``order.paid`` event of an order's rows (all well-formed)."""
    first = rows[0]
    for column in ("member_ref", "occurred_at", "store", "channel", "source", "pickup"):
        values = {
            _flag(row.get(column), column, at) if column == "pickup" else row.get(column, "")
            for at, row in enumerate(rows)
        }
        if len(values) > 1:
            raise RowError(
                column,
                f"differs between the lines of order {first['order_id']}",
                f"订单 {first['order_id']} 的各行在此列的值不一致",
            )
    payload = {
        "order_id": first["order_id"],
        "store": first.get("store") or None,
        "channel": first.get("channel") or "store",
        "pickup": _flag(first.get("pickup"), "pickup"),
        "lines": [
            {
                "sku": row["sku"],
                "category": row.get("category") or "default",
                "quantity": _whole(row.get("quantity") or "1"),
                "amount_fen": _fen(row["amount_fen"], at),
                "paid_with_points": _flag(row.get("paid_with_points"), "paid_with_points", at),
            }
            for at, row in enumerate(rows)
        ],
    }
    return EventIn.model_validate(
        {
            "source": first.get("source") or default_source,
            "external_id": f"order:{first['order_id']}",
            "type": "order.paid",
            "occurred_at": instant(first["occurred_at"], zone),
            "member_ref": first["member_ref"],
            "payload": payload,
        }
    )


_TAG_SEPARATORS = re.compile("[,;，；、]")
"""What separates the tags of the ``tags`` column: , or ; and as a Chinese keyboard writes
them (none can be part of a tag)."""


def member_record(place: Place, row: Mapping[str, str]) -> Record:
    data: dict[str, Any] = {k: v for k, v in row.items() if v and k != "tier"}
    if "tags" in data:
        data["tags"] = [t.strip() for t in _TAG_SEPARATORS.split(data["tags"]) if t.strip()]
    try:
        member = MemberCreate.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["loc"][:1] == ("tags",) and len(first["loc"]) > 1:
            raise _bad_tag(str(first["input"]), *field_problem(first)) from exc
        raise _validation(exc) from exc
    return Record((place,), (member, row.get("tier") or None), (row,))


def _bad_tag(tag: str, reason: str, reason_zh: str) -> RowError:
    """A tag of the ``tags`` column that cannot be one, named in that column (the request's
    ``tags.1`` is no column of the file)."""
    return RowError(
        "tags",
        f"tag {tag!r}: {reason}; separate tags with , or ; and write each with letters, "
        "digits, '.', '_' or '-' (at most 32 characters)",
        f"标签 {tag!r}:{reason_zh}标签之间用 , 或 ; 分隔,每个标签只含字母、数字、"
        "'.'、'_' 或 '-'(至多 32 个字符)",
    )
