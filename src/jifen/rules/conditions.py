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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from cel_expr_python import cel

from jifen.errors import InvalidInput
from jifen.rules.core import Condition, ConditionFailed

_TYPE = cel.Type
_ENV = cel.NewEnv(variables={"event": _TYPE.DYN, "member": _TYPE.DYN, "now": _TYPE.TIMESTAMP})
_STATUS = re.compile(r"^[A-Z_]+: |\s*\[[A-Z_]+\]\s*$")


def _readable(message: str) -> str:
    """The engine's message without its status words, on one line where it allows."""
    return _STATUS.sub("", message.strip()).strip()


def compile_condition(source: str) -> Condition:
    """``source`` compiled once (cached): a callable of the activation. InvalidInput, with
    the line, column and reason, when it does not compile or cannot give true or false."""
    return _compile(source)


@lru_cache(maxsize=4096)
def _compile(source: str) -> Condition:
    try:
        program = _ENV.compile(source)
    except RuntimeError as exc:
        raise InvalidInput(
            field="condition",
            problem=_readable(str(exc)),
            problem_zh=f"条件表达式无法编译:{_readable(str(exc))}",
        ) from exc
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
