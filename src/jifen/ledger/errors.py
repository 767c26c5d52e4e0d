"""Errors of the points ledger, and the root of every jifen error.

The root lives here, in the pure core, so that the ledger can raise typed errors without
importing anything else from jifen; ``jifen.errors`` re-exports it and adds the rest.
Each error has a stable ``code`` (what the API and the CLI key on) and a message in
English and Chinese that says what was wrong and how to fix it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class JifenError(Exception):
    """Base of every error jifen raises on purpose."""

    code: ClassVar[str] = "jifen_error"
    en: ClassVar[str] = "jifen could not do that."
    zh: ClassVar[str] = "jifen 无法完成该操作。"

    def __init__(self, **params: Any) -> None:
        self.params = params
        super().__init__(self.message("en"))

    def message(self, language: str = "en") -> str:
        """The message in ``language`` ("en" or "zh"), with its parameters filled in."""
        template = self.zh if language.lower().startswith("zh") else self.en
        return template.format(**self.params)


class InvalidInput(JifenError):
    """The request itself is malformed; nothing was looked up or changed. ``problem_zh``
    says it in Chinese (without it the Chinese message repeats ``problem``)."""

    code = "invalid_input"
    en = "{field}: {problem}"
    zh = "{field}:{problem_zh}"

    def __init__(self, **params: Any) -> None:
        if "problem" in params:
            params.setdefault("problem_zh", params["problem"])
        super().__init__(**params)


class NonPositiveAmount(InvalidInput):
    code = "non_positive_amount"
    en = "{field} must be a whole number of points greater than 0; got {value}."
    zh = "{field} 必须是大于 0 的整数积分,收到的是 {value}。"


class InvalidDates(InvalidInput):
    code = "invalid_dates"
    en = "{problem} Give expires_at after available_at, and both after the time of posting."
    zh = "{problem_zh} 请让到期时间晚于可用时间,且都晚于记账时间。"


class MissingReason(InvalidInput):
    code = "missing_reason"
    en = "A manual {kind} needs a reason and the actor who made it; give both."
    zh = "手工{kind}必须写明原因和操作人。"


class SameAccount(InvalidInput):
    code = "same_account"
    en = "A transfer needs two different members; member {member_id} was given as both."
    zh = "转赠需要两个不同的会员;会员 {member_id} 同时作为转出方和接收方。"


class NotFound(JifenError):
    code = "not_found"


class UnknownMember(NotFound):
    code = "unknown_member"
    en = "There is no member {member_id}. Check the id, or register the member first."
    zh = "会员 {member_id} 不存在。请检查编号,或先注册该会员。"


class UnknownPosting(NotFound):
    code = "unknown_posting"
    en = "There is no {expected} posting {posting_id}. Check the id in the member's history."
    zh = "不存在编号为 {posting_id} 的{expected_zh}记录。请在会员流水中核对编号。"
    en_other_kind: ClassVar[str] = (
        "Posting {posting_id} is a{n} {found} posting, not a{n_expected} {expected} one. "
        "Check the id in the member's history."
    )
    zh_other_kind: ClassVar[str] = (
        "记录 {posting_id} 是{found_zh}记录,不是{expected_zh}记录。请在会员流水中核对编号。"
    )

    def message(self, language: str = "en") -> str:
        """Where the posting exists but is of another kind (``found``), say what it is:
        "there is no such posting" would be contradicted by the member's history."""
        found = self.params.get("found")
        if found is None:
            return super().message(language)
        if language.lower().startswith("zh"):
            return self.zh_other_kind.format(**{"found_zh": found, **self.params})
        article = {"n": _an(found), "n_expected": _an(self.params["expected"])}
        return self.en_other_kind.format(**article, **self.params)


def _an(word: str) -> str:
    """The "n" of "an" before ``word`` ("an earn", "a spend")."""
    return "n" if word[:1].lower() in "aeiou" else ""


class UnknownProgram(NotFound):
    code = "unknown_program"
    en = "There is no programme {program}. Create it first, or check its code."
    zh = "积分计划 {program} 不存在。请先创建,或检查其代码。"


class Refused(JifenError):
    """The request is well-formed but the ledger's rules forbid it right now."""

    code = "refused"


class InsufficientPoints(Refused):
    code = "insufficient_points"
    # The account id is in the problem's parameters; the words name no id, since the caller
    # knows its member by another (the member id or reference), not by its ledger account.
    en = (
        "The member has {available} points available, but {requested} are needed. Use at "
        "most {available}; pending points become available later."
    )
    zh = "该会员可用积分为 {available},本次需要 {requested}。最多可用 {available}。"


class ExceedsOriginal(Refused):
    code = "exceeds_original"
    en = (
        "{operation} of {requested} points is more than the {remaining} points of posting "
        "{posting_id} still open to it; give at most {remaining}."
    )
    zh = (
        "{operation_zh} {requested} 分超过了记录 {posting_id} 尚可{operation_zh}的 {remaining} 分。"
    )
    en_none_open: ClassVar[str] = (
        "{operation} is not possible: posting {posting_id} has no points left open to it "
        "(all of them were given back or taken back already). Check the member's history."
    )
    zh_none_open: ClassVar[str] = (
        "无法{operation_zh}:记录 {posting_id} 已没有可{operation_zh}的积分(已全部处理过)。"
        "请在会员流水中核对。"
    )

    def message(self, language: str = "en") -> str:
        """Where nothing of the posting is open any more, say so: "more than the 0 points
        still open" would read as if a smaller amount could pass."""
        if self.params.get("remaining") == 0:
            zh = language.lower().startswith("zh")
            template = self.zh_none_open if zh else self.en_none_open
            return template.format(**self.params)
        return super().message(language)


class IdempotencyConflict(Refused):
    code = "idempotency_conflict"
    en = (
        "The idempotency key {key!r} was already used for a different request. Use a new "
        "key for a new request, or resend exactly the same request to get its first result."
    )
    zh = "幂等键 {key!r} 已用于另一个不同的请求。新请求请使用新的键;重发原请求可取回首次结果。"


class DuplicateReference(Refused):
    code = "duplicate_reference"
    en = "{what} {value!r} already exists in this programme; choose another."
    zh = "{what_zh} {value!r} 在本计划中已存在,请换一个。"


class LedgerCorrupt(JifenError):
    """Stored history contradicts itself; run ``jifen ledger verify`` and ``reconcile``."""

    code = "ledger_corrupt"
    en = "The stored ledger is inconsistent: {problem}. Run `jifen ledger verify` and `reconcile`."
    zh = "账本数据不一致:{problem}。请运行 `jifen ledger verify` 和 `reconcile`。"
