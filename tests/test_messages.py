"""Every message a user can meet is written in English and in Chinese: each InvalidInput
(and its kinds) that says a ``problem`` says it in Chinese too, a request's validators
refuse values with :class:`Refusal` (which carries the Chinese), not a bare ValueError, and
every ``--help`` text of the CLI is given in both languages."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import jifen.errors
from jifen.errors import InvalidInput

SOURCE = Path(jifen.errors.__file__).parent
CHINESE = re.compile(r"[\u4e00-\u9fff]")


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


def _where(node: ast.AST) -> str:
    return f"cli.py:{getattr(node, 'lineno', '?')}"


def test_every_help_text_of_the_cli_is_given_in_both_languages() -> None:
    tree = ast.parse((SOURCE / "cli.py").read_text(encoding="utf-8"))
    helps, untranslated = 0, []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        # every help= (of typer.Typer, a command, an option or an argument) goes through
        # _h(english, chinese): a bare string would show one language whatever is asked
        for keyword in node.keywords:
            if keyword.arg == "help":
                helps += 1
                value = keyword.value
                if not (isinstance(value, ast.Call) and _called(value) == "_h"):
                    untranslated.append(f"{_where(value)}: help={ast.unparse(value)[:60]}")
        # a command or a group without help= would show its docstring, in English only
        if _called(node) in ("command", "Typer") and not any(
            k.arg == "help" for k in node.keywords
        ):
            untranslated.append(f"{_where(node)}: {ast.unparse(node.func)}() without help=")
        # a group's help is laid out for its language (Rich's tables cut Chinese short)
        if _called(node) == "Typer" and not any(
            k.arg == "rich_markup_mode" and ast.unparse(k.value) == "_HELP_LAYOUT"
            for k in node.keywords
        ):
            untranslated.append(f"{_where(node)}: Typer() without rich_markup_mode=_HELP_LAYOUT")
        # and the second text of _h is Chinese
        if _called(node) == "_h" and (
            len(node.args) != 2 or not CHINESE.search(ast.unparse(node.args[1]))
        ):
            untranslated.append(f"{_where(node)}: _h() without a Chinese text")
    assert helps > 40  # the walk found the CLI's help texts
    assert untranslated == []
