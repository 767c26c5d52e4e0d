"""Rule conditions in CEL (Common Expression Language), through ``cel-expr-python``:
Google's C++ CEL engine. It was chosen over the other CEL packages measured here because it
type-checks an expression when it is saved (a rule that cannot work is refused before it is
approved), has the standard time-zone functions (``now.getMonth("Asia/Shanghai")``), bounds
the work one evaluation may do, and evaluates in a few microseconds.

An expression sees three variables: ``event`` (the payload, plus ``type``, ``time`` and, for
orders, ``amount_fen``), ``member`` (``id``, ``tier``, ``tags``, ``region``,
``registered_at``, ``birthday``, ``counts``) and ``now`` (the event's time, a timestamp).
Times inside ``event`` and ``member`` are RFC 3339 strings: ``timestamp(member.registered_at)
< now - duration("720h")``. Compiled expressions are cached by their text.

The tiers a condition compares the member's tier with (``member.tier == "金卡"``) are read
from the syntax tree the engine checked: the library exposes it only serialised (a
``cel.expr.CheckedExpr`` message, :meth:`Expression.serialize`), so the few fields needed
are read from the protobuf wire format here (:func:`tiers_compared`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cel_expr_python import cel

from jifen.errors import InvalidInput
from jifen.rules.core import Condition, ConditionFailed

_TYPE = cel.Type
_ENV = cel.NewEnv(variables={"event": _TYPE.DYN, "member": _TYPE.DYN, "now": _TYPE.TIMESTAMP})
log = logging.getLogger("jifen.rules")
_STATUS = re.compile(r"^[A-Z_]+: |\s*\[[A-Z_]+\]\s*$")


def _readable(message: str) -> str:
    """The engine's message without its status words, on one line where it allows."""
    return _STATUS.sub("", message.strip()).strip()


def compile_condition(source: str) -> Condition:
    """``source`` compiled once (cached): a callable of the activation. InvalidInput, with
    the line, column and reason, when it does not compile or cannot give true or false."""
    return _compile(source)


@lru_cache(maxsize=4096)
def _checked(source: str) -> cel.Expression:
    try:
        return _ENV.compile(source)
    except RuntimeError as exc:
        raise InvalidInput(
            field="condition",
            problem=_readable(str(exc)),
            problem_zh=f"条件表达式无法编译:{_readable(str(exc))}",
        ) from exc


@lru_cache(maxsize=4096)
def _compile(source: str) -> Condition:
    program = _checked(source)
    returns = program.return_type()
    if returns not in (_TYPE.BOOL, _TYPE.DYN):
        raise InvalidInput(
            field="condition",
            problem=f"must be true or false, but gives {returns}",
            problem_zh=f"结果须为 true 或 false,但该表达式的类型为 {returns}",
        )

    def holds(bindings: Mapping[str, Any]) -> bool:
        try:
            value = program.eval(data=bindings)
        except RuntimeError as exc:  # the engine's limits (iterations, nesting)
            raise ConditionFailed(_readable(str(exc))) from exc
        if value.type() == _TYPE.ERROR:
            raise ConditionFailed(_readable(str(value.value())))
        result = value.value()
        if not isinstance(result, bool):
            raise ConditionFailed(f"gave {result!r}, not true or false")
        return result

    return holds


# --------------------------------------------------------------------------- tiers named


@lru_cache(maxsize=4096)
def tiers_compared(source: str) -> tuple[str, ...]:
    """The tier codes ``source`` compares the member's tier with, in the order written: the
    string literal on the other side of ``member.tier ==`` or ``!=`` (either side), each
    string literal of the list in ``member.tier in [...]``, one tested to be ``in
    [member.tier]`` or ``in {member.tier: ...}``, the string keys of a map the member's tier
    is looked up in (``member.tier in {...}``, ``{...}[member.tier]``), and the strings of a
    list or map literal a macro goes over comparing each with the member's tier
    (``["金卡", "钻石"].exists(t, t == member.tier)``, ``all``, ``exists_one``, ``filter``);
    ``member["tier"]`` alike. The empty string is left out: it is what a member with no
    tier has. InvalidInput, as
    :func:`compile_condition`, when it does not compile.

    Reading the tree is a check that helps, not one the rule depends on: a tree it cannot
    read (a form of the library's output it does not know) is logged and taken to name no
    tier, rather than refusing the rule, or every change of the programme's tiers."""
    serialised = _checked(source).serialize()
    try:
        envelope = dict(_fields(serialised))
        if envelope.get(1) != _CHECKED_EXPR:
            raise RuntimeError(f"a {envelope.get(1)!r}, not a CheckedExpr")
        checked = dict(_fields(_bytes(envelope[2])))
        found = list(_compared(_node(_bytes(checked[4])), frozenset()))
    except (RuntimeError, ValueError, LookupError) as exc:  # UnicodeDecodeError: a ValueError
        log.warning(
            "the tiers condition %r compares cannot be read (%s): none checked", source, exc
        )
        return ()
    return tuple(dict.fromkeys(code for code in found if code))


_CHECKED_EXPR = b"type.googleapis.com/cel.expr.CheckedExpr"
_EQUALITY = frozenset({"_==_", "_!=_"})


@dataclass(frozen=True, slots=True)
class _Node:
    """What :func:`tiers_compared` needs of a ``cel.expr.Expr``: its kind (the number of
    its field in ``expr_kind``), a name (an ident's, a select's field, a call's function,
    a comprehension's variable over its range), a string constant's value, its
    sub-expressions (a map's keys among them, and also in ``keys``), and the names a
    comprehension binds over its last ones (``loop_condition``, ``loop_step``,
    ``result``)."""

    kind: int
    name: str = ""
    text: str | None = None
    children: tuple[_Node, ...] = ()
    binds: frozenset[str] = frozenset()
    bound: tuple[_Node, ...] = ()
    keys: tuple[_Node, ...] = ()


_CONST, _IDENT, _SELECT, _CALL, _LIST, _STRUCT, _COMPREHENSION = 3, 4, 5, 6, 7, 8, 9


def _compared(node: _Node, shadowed: frozenset[str]) -> Iterator[str]:
    """The string literals compared with ``member.tier`` anywhere in ``node``."""
    if node.kind == _CALL and len(node.children) == 2:
        left, right = node.children
        if node.name in _EQUALITY:
            for tier, other in ((left, right), (right, left)):
                if _is_member_tier(tier, shadowed) and other.text is not None:
                    yield other.text
        elif node.name == "@in" and right.kind == _LIST:
            if _is_member_tier(left, shadowed):
                yield from (element.text for element in right.children if element.text is not None)
            elif left.text is not None and any(
                _is_member_tier(e, shadowed) for e in right.children
            ):
                yield left.text  # "金卡" in [member.tier]
        elif (
            node.name == "@in"
            and left.text is not None
            and any(_is_member_tier(key, shadowed) for key in right.keys)
        ):
            yield left.text  # "金卡" in {member.tier: true}
        elif (node.name == "@in" and _is_member_tier(left, shadowed)) or (
            node.name == "_[_]" and _is_member_tier(right, shadowed)
        ):  # member.tier in {"金卡": true}, {"金卡": 2}[member.tier]
            keyed = right if node.name == "@in" else left
            yield from (key.text for key in keyed.keys if key.text is not None)
    if node.kind == _COMPREHENSION and node.children and node.name:
        # ["金卡", "钻石"].exists(t, t == member.tier): the range's strings, each compared
        over = node.children[0]
        inside = shadowed | node.binds
        if any(_compares_with_tier(child, node.name, inside) for child in node.bound):
            elements = over.keys if over.kind == _STRUCT else over.children
            if over.kind in (_LIST, _STRUCT):
                yield from (element.text for element in elements if element.text is not None)
    for child in node.children:
        yield from _compared(child, shadowed)
    for child in node.bound:
        yield from _compared(child, shadowed | node.binds)


def _compares_with_tier(node: _Node, name: str, shadowed: frozenset[str]) -> bool:
    """Whether ``node`` holds ``name == member.tier`` (or ``!=``, either way round), where
    ``name`` is the variable of the comprehension being read."""
    if node.kind == _CALL and node.name in _EQUALITY and len(node.children) == 2:
        for tier, other in (node.children, node.children[::-1]):
            if _is_member_tier(tier, shadowed) and (other.kind, other.name) == (_IDENT, name):
                return True
    if node.kind == _COMPREHENSION and name in node.binds:
        return False  # a nested comprehension's own variable of that name
    return any(_compares_with_tier(child, name, shadowed) for child in node.children + node.bound)


def _is_member_tier(node: _Node, shadowed: frozenset[str]) -> bool:
    """Whether ``node`` reads the member's tier: ``member.tier`` or ``member["tier"]``."""
    if node.kind == _SELECT:  # a test of presence (has) has no operand among the children
        field: str | None = node.name
    elif node.kind == _CALL and node.name == "_[_]" and len(node.children) == 2:
        field = node.children[1].text
    else:
        return False
    operand = node.children[0] if node.children else None
    return (
        field == "tier"
        and operand is not None
        and (operand.kind, operand.name) == (_IDENT, "member")
        and "member" not in shadowed
    )


def _node(data: bytes) -> _Node:
    """A ``cel.expr.Expr`` in wire format, read as far as :func:`tiers_compared` needs."""
    for number, value in _fields(data):
        if number == 2:  # the node's id
            continue
        body = dict.fromkeys(range(1, 10), b"")
        parts = list(_fields(_bytes(value)))
        body.update({n: v for n, v in parts if isinstance(v, bytes)})
        if number == _CONST:
            text = body[6].decode() if any(n == 6 for n, _ in parts) else None
            return _Node(number, text=text)
        if number == _IDENT:
            return _Node(number, name=body[1].decode())
        if number == _SELECT:
            presence = any(n == 3 and v for n, v in parts)
            operand = () if presence else (_node(body[1]),)
            return _Node(number, name=body[2].decode(), children=operand)
        if number == _CALL:
            target = tuple(_node(_bytes(v)) for n, v in parts if n == 1)
            args = tuple(_node(_bytes(v)) for n, v in parts if n == 3)
            return _Node(number, name=body[2].decode(), children=target + args)
        if number == _LIST:
            return _Node(number, children=tuple(_node(_bytes(v)) for n, v in parts if n == 1))
        if number == _STRUCT:  # a map or message: its keys and values
            entries = [dict(_fields(_bytes(v))) for n, v in parts if n == 2]
            inside = [_node(_bytes(e[k])) for e in entries for k in (3, 4) if k in e]
            keys = tuple(_node(_bytes(e[3])) for e in entries if 3 in e)
            return _Node(number, children=tuple(inside), keys=keys)
        if (
            number == _COMPREHENSION
        ):  # a comprehension: its range and first value, then what it binds
            names = frozenset(body[k].decode() for k in (1, 3, 8)) - {""}
            return _Node(
                number,
                name=body[1].decode(),
                children=tuple(_node(body[k]) for k in (2, 4) if body[k]),
                binds=names,
                bound=tuple(_node(body[k]) for k in (5, 6, 7) if body[k]),
            )
    return _Node(0)


def _bytes(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise RuntimeError("a CheckedExpr field is not where cel.expr puts it")
    return value


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """The fields of a protobuf message in wire format, in order: each field's number and
    its value (a varint's number; the bytes of any other)."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, at = _varint(data, at)
        elif wire in (1, 2, 5):
            size, at = (8, at) if wire == 1 else (4, at) if wire == 5 else _varint(data, at)
            value, at = data[at : at + size], at + size
        else:
            raise RuntimeError(f"protobuf wire type {wire} is not used by cel.expr")
        yield number, value


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at
