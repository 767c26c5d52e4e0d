"""CSV rows to what the services take, pure: each kind of import names its columns, and a
row that cannot become a valid request gives a :class:`RowError` saying which column and
why. Orders arrive one row per line and become one ``order.paid`` event per order."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from jifen.errors import field_problem
from jifen.events.schemas import EventIn
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
        ["name", "email", "birthday", "gender", "region", "tags", "phone", "tier"],
    ),
}
ERROR_COLUMNS = ("error_line", "error_column", "error_code", "error_reason")
"""What the error file adds to each rejected row; ignored when that file, put right, is
imported again."""


class RowError(Exception):
    """A row that cannot be imported; ``column`` and ``reason`` say what to fix
    (``reason_zh``: in Chinese; without it the Chinese repeats ``reason``)."""

    def __init__(self, column: str, reason: str, reason_zh: str | None = None) -> None:
        super().__init__(f"{column}: {reason}")
        self.column = column
        self.reason = reason
        self.reason_zh = reason_zh or reason

    def said(self, language: str) -> str:
        return self.reason_zh if language.lower().startswith("zh") else self.reason


Row = Mapping[str, str] | Sequence[str]
"""A row as read: its values by column, or (a row whose fields do not match the header)
its values in order."""


@dataclass(frozen=True)
class Record:
    """One unit of import: the CSV line numbers it came from and the request it makes."""

    lines: tuple[int, ...]
    request: EventIn | tuple[MemberCreate, str | None]
    """An event, or a member with its tier (or None)."""
    rows: tuple[Row, ...] = ()
    """The rows it was read from, as they were (for the error file)."""


BadOrder = tuple[tuple[int, ...], tuple[Row, ...], RowError]
"""An order that cannot be imported: its lines, its rows and why."""


def check_header(kind: Kind, header: list[str]) -> None:
    """Refuse a file whose header lacks a required column, has an unknown one or names one
    twice (which of the two values would count?)."""
    required, optional = COLUMNS[kind]
    missing = [c for c in required if c not in header]
    unknown = [c for c in header if c not in (*required, *optional, *ERROR_COLUMNS)]
    twice = sorted({c for c in header if header.count(c) > 1})
    if missing or unknown or twice:
        en, zh = [], []
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


def _validation(exc: ValidationError, prefix: str = "") -> RowError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "row"
    return RowError(prefix + where, *field_problem(first))


def event_record(line: int, row: Mapping[str, str], default_source: str) -> Record:
    payload: Any = {}
    if row.get("payload"):
        try:
            payload = json.loads(row["payload"])
        except ValueError as exc:
            raise RowError("payload", f"not JSON: {exc}", f"不是 JSON:{exc}") from exc
        if not isinstance(payload, dict):
            raise RowError("payload", "must be a JSON object", "须为 JSON 对象")
    data: dict[str, Any] = {
        "source": row.get("source") or default_source,
        "external_id": row["external_id"],
        "type": row["type"],
        "occurred_at": row["occurred_at"],
        "payload": payload,
    }
    if row.get("member_id"):
        data["member_id"] = row["member_id"]
    if row.get("member_ref"):
        data["member_ref"] = row["member_ref"]
    try:
        return Record((line,), EventIn.model_validate(data), (row,))
    except ValidationError as exc:
        raise _validation(exc) from exc


def _flag(value: str | None, column: str) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "n"):
        return False
    if text in ("1", "true", "yes", "y"):
        return True
    raise RowError(
        column,
        f"{value!r} is not true or false (use 1/0, true/false, yes/no)",
        f"{value!r} 不是真或假(请用 1/0、true/false、yes/no)",
    )


def order_records(
    rows: Iterable[tuple[int, Mapping[str, str]]], default_source: str
) -> Iterator[Record | BadOrder]:
    """Consecutive rows with the same ``order_id`` as one ``order.paid`` event; a bad order
    yields its line numbers, rows and error instead."""
    group: list[tuple[int, Mapping[str, str]]] = []
    for line, row in rows:
        if group and row.get("order_id") != group[0][1].get("order_id"):
            yield _order(group, default_source)
            group = []
        group.append((line, row))
    if group:
        yield _order(group, default_source)


def _order(group: list[tuple[int, Mapping[str, str]]], default_source: str) -> Record | BadOrder:
    lines = tuple(line for line, _ in group)
    rows = tuple(row for _, row in group)
    first = group[0][1]
    try:
        for column in ("member_ref", "occurred_at", "store", "channel", "source", "pickup"):
            values = {
                _flag(row.get(column), column) if column == "pickup" else row.get(column, "")
                for _, row in group
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
                    "quantity": row.get("quantity") or 1,
                    "amount_fen": row["amount_fen"],
                    "paid_with_points": _flag(row.get("paid_with_points"), "paid_with_points"),
                }
                for _, row in group
            ],
        }
        event = EventIn.model_validate(
            {
                "source": first.get("source") or default_source,
                "external_id": f"order:{first['order_id']}",
                "type": "order.paid",
                "occurred_at": first["occurred_at"],
                "member_ref": first["member_ref"],
                "payload": payload,
            }
        )
    except RowError as exc:
        return lines, rows, exc
    except ValidationError as exc:
        return lines, rows, _validation(exc)
    return Record(lines, event, rows)


def member_record(line: int, row: Mapping[str, str]) -> Record:
    data: dict[str, Any] = {k: v for k, v in row.items() if v and k != "tier"}
    if "tags" in data:
        data["tags"] = [t.strip() for t in data["tags"].replace(";", ",").split(",") if t.strip()]
    try:
        member = MemberCreate.model_validate(data)
    except ValidationError as exc:
        raise _validation(exc) from exc
    return Record((line,), (member, row.get("tier") or None), (row,))
