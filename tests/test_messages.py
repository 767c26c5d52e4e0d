"""Every message a user can meet is written in English and in Chinese: each InvalidInput
(and its kinds) that says a ``problem`` says it in Chinese too, and a request's validators
refuse values with :class:`Refusal` (which carries the Chinese), not a bare ValueError."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import jifen.errors
from jifen.errors import InvalidInput

SOURCE = Path(jifen.errors.__file__).parent


def _invalid_input_kinds() -> set[str]:
    return {
        name
        for name, value in inspect.getmembers(jifen.errors, inspect.isclass)
        if issubclass(value, InvalidInput)
    }


def _called(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def test_every_problem_is_also_said_in_chinese() -> None:
    kinds = _invalid_input_kinds()
    assert {"InvalidInput", "WebhookTargetRefused"} <= kinds
    untranslated = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _called(node) in kinds:
                keywords = {k.arg for k in node.keywords}
                if "problem" in keywords and "problem_zh" not in keywords:
                    untranslated.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert untranslated == []


def test_request_validators_refuse_in_both_languages() -> None:
    bare = []
    for path in sorted(SOURCE.glob("*/schemas.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and _called(node.exc) == "ValueError"
            ):
                bare.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert bare == []
