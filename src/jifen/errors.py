"""Every error jifen raises on purpose, in one place.

    JifenError                      code, English and Chinese message
    ├── InvalidInput                the request is malformed; nothing was looked up
    │   ├── NonPositiveAmount
    │   ├── InvalidDates
    │   ├── MissingReason
    │   └── SameAccount
    ├── NotFound
    │   ├── UnknownMember
    │   ├── UnknownPosting
    │   ├── UnknownProgram
    │   ├── UnknownApproval
    │   ├── UnknownStaff
    │   ├── UnknownRole
    │   └── UnknownApiKey
    ├── Refused                     well-formed, but the rules forbid it now
    │   ├── InsufficientPoints
    │   ├── ExceedsOriginal         refund / reversal / unfreeze larger than what is open
    │   ├── IdempotencyConflict     a key reused for a different request
    │   ├── DuplicateReference
    │   └── StateConflict           the target's state does not allow it (member, approval)
    ├── LedgerCorrupt               stored history contradicts itself
    ├── Unauthenticated             no valid credentials (HTTP 401)
    │   └── SignInLocked            too many failed sign-ins: slowed, then locked (429)
    ├── Forbidden                   authenticated, but not allowed (HTTP 403)
    │   ├── ScopeTooNarrow          held in a merchant's or programme's scope only
    │   └── TotpRequired            a session opened without TOTP does not write
    ├── AnswerErased                a write's stored answer went with a member's data (410)
    ├── RateLimited                 too many requests (HTTP 429, Retry-After)
    └── AuditCorrupt                the audit log's chain is broken

The root and the ledger's own errors live in :mod:`jifen.ledger.errors` so that the pure
core needs nothing else from jifen; this module is where everyone else imports them from.
"""

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from jifen.ledger.errors import (
    DuplicateReference,
    ExceedsOriginal,
    IdempotencyConflict,
    InsufficientPoints,
    InvalidDates,
    InvalidInput,
    JifenError,
    LedgerCorrupt,
    MissingReason,
    NonPositiveAmount,
    NotFound,
    Refused,
    SameAccount,
    UnknownMember,
    UnknownPosting,
    UnknownProgram,
)


class Unauthenticated(JifenError):
    """No credentials, or credentials that are wrong, expired or revoked."""

    code = "unauthenticated"
    en = "{problem} Sign in again, or send a valid API key."
    zh = "{problem_zh} 请重新登录,或提供有效的 API 密钥。"


class SignInLocked(Unauthenticated):
    code = "sign_in_locked"
    en = (
        "Too many failed sign-ins for this account; try again in {retry_after} seconds, or ask "
        "an administrator to unlock it."
    )
    zh = "该账户登录失败次数过多,请在 {retry_after} 秒后重试,或联系管理员解锁。"


class Forbidden(JifenError):
    code = "forbidden"
    en = "{problem} Ask an administrator for a role that grants it."
    zh = "{problem_zh} 如需此权限,请联系管理员分配相应角色。"


class RateLimited(JifenError):
    code = "rate_limited"
    en = "Too many requests {scope}; wait {retry_after} seconds and try again."
    zh = "请求过于频繁({scope_zh}),请等待 {retry_after} 秒后重试。"


class StateConflict(Refused):
    """The target is in a state that does not allow the request."""

    code = "state_conflict"
    en = "{problem}"
    zh = "{problem_zh}"


def not_active(member_id: int, state: str) -> StateConflict:
    """A member that is not active neither earns nor spends: what refuses it, said once for
    the members domain (which checks the member) and the points one (which checks the state
    its account carries, under the account's lock)."""
    if state == "closed":
        return StateConflict(
            problem=f"Member {member_id} is closed: a closed account cannot earn or spend, "
            "and stays closed.",
            problem_zh=f"会员 {member_id} 已注销:已注销的账户不能获取或使用积分,也不能恢复。",
        )
    return StateConflict(
        problem=f"Member {member_id} is {state}: it cannot earn or spend until staff make it "
        "active again.",
        problem_zh=f"会员 {member_id} 当前状态为 {state},恢复正常状态前不能获取或使用积分。",
    )


class UnknownApproval(NotFound):
    code = "unknown_approval"
    en = "There is no approval request {approval_id} in this programme. Check the id."
    zh = "本计划中不存在编号为 {approval_id} 的审批申请。请检查编号。"


class UnknownStaff(NotFound):
    code = "unknown_staff"
    en = "There is no staff user {staff_id}. Check the id."
    zh = "不存在编号为 {staff_id} 的员工。请检查编号。"


class UnknownRole(NotFound):
    code = "unknown_role"
    en = "This programme has no custom role {role!r}. List roles with GET …/roles."
    zh = "本计划没有自定义角色 {role!r}。可通过 GET …/roles 查看角色。"


class UnknownApiKey(NotFound):
    code = "unknown_api_key"
    en = "This programme has no API key {key_id}. Check the id."
    zh = "本计划中不存在编号为 {key_id} 的 API 密钥。请检查编号。"


class AnswerErased(JifenError):
    """A request repeated under its ``Idempotency-Key`` whose stored answer was erased with
    the personal data of the member it concerned: it was carried out and is not run again."""

    code = "answer_erased"
    en = (
        "The request sent with idempotency key {key!r} was carried out (it answered "
        "{status}), but its answer was erased with the personal data of member {member_id}, "
        "so it cannot be given again. The request is not run again; read the member instead."
    )
    zh = (
        "使用幂等键 {key!r} 发送的请求已执行(当时应答 {status}),但其应答已随会员 {member_id} "
        "的个人信息一并删除,无法再次给出。该请求不会再次执行;请改为查询该会员。"
    )


class AuditCorrupt(JifenError):
    code = "audit_corrupt"
    en = "The audit log is inconsistent: {problem}. Run `jifen audit verify`."
    zh = "审计日志不一致:{problem}。请运行 `jifen audit verify`。"


STATUS: dict[type[JifenError], int] = {}
"""Filled below: the HTTP status for each kind of error (the most specific class wins)."""

__all__ = [
    "STATUS",
    "AnswerErased",
    "AuditCorrupt",
    "DuplicateReference",
    "ExceedsOriginal",
    "Forbidden",
    "IdempotencyConflict",
    "InsufficientPoints",
    "InvalidDates",
    "InvalidInput",
    "JifenError",
    "LedgerCorrupt",
    "MissingReason",
    "NonPositiveAmount",
    "NotFound",
    "OrderNotSeen",
    "RateLimited",
    "Refusal",
    "Refused",
    "SameAccount",
    "SignInLocked",
    "StateConflict",
    "TierNotDefined",
    "Unauthenticated",
    "UnknownApiKey",
    "UnknownApproval",
    "UnknownAward",
    "UnknownEvent",
    "UnknownMember",
    "UnknownPosting",
    "UnknownProgram",
    "UnknownRole",
    "UnknownRule",
    "UnknownStaff",
    "UnknownTier",
    "field_problem",
    "http_status",
    "invalid_field",
]

STATUS.update(
    {
        JifenError: 400,
        InvalidInput: 422,
        NotFound: 404,
        Refused: 409,
        LedgerCorrupt: 500,
        AuditCorrupt: 500,
        Unauthenticated: 401,
        SignInLocked: 429,
        Forbidden: 403,
        RateLimited: 429,
        AnswerErased: 410,
    }
)


def http_status(error: JifenError) -> int:
    """The HTTP status of ``error``: that of its nearest class in :data:`STATUS`."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


class UnknownTier(NotFound):
    code = "unknown_tier"
    en = "This programme has no tier {tier!r}; its tiers are {known}."
    zh = "本计划没有等级 {tier!r};已有等级:{known}。"


class TierNotDefined(InvalidInput):
    """A policy, rule, caps or reward names a tier code the programme does not define (a
    typo such as "gold" for 金卡): stored, it would never match a member."""

    code = "tier_not_defined"
    en = (
        "{field}: {tier!r} is not a tier of this programme, so it would apply to no member; "
        "its tiers are {known}. Name one of them, or define the tier first."
    )
    zh = (
        "{field}:{tier!r} 不是本计划的等级,不会适用于任何会员;本计划的等级为:{known_zh}。"
        "请使用其中之一,或先定义该等级。"
    )


class UnknownRule(NotFound):
    code = "unknown_rule"
    en = "This programme has no rule version {version_id}. List them with GET …/rules."
    zh = "本计划中不存在规则版本 {version_id}。可通过 GET …/rules 查看。"


class UnknownAward(NotFound):
    code = "unknown_award"
    en = "This programme has no award {award_id} held for review. List them with GET …/awards/held."
    zh = "本计划中没有待审核的奖励 {award_id}。可通过 GET …/awards/held 查看。"


class UnknownEvent(NotFound):
    code = "unknown_event"
    en = "This programme has no event {event_id}. Check the id."
    zh = "本计划中不存在事件 {event_id}。请检查编号。"


class OrderNotSeen(Refused):
    """A refund of an order jifen has not received (yet): send the order first. The stream
    hands such a refund back until its order arrives."""

    code = "order_not_seen"
    en = "No order.paid event for order {order_id!r} has arrived; send the order first."
    zh = "订单 {order_id!r} 的 order.paid 事件尚未收到;请先发送该订单。"


class UnknownReward(NotFound):
    code = "unknown_reward"
    en = "This programme has no reward {reward!r}. List the catalogue with GET …/rewards."
    zh = "本计划没有礼品 {reward!r}。可通过 GET …/rewards 查看礼品目录。"


class UnknownOrder(NotFound):
    code = "unknown_order"
    en = "This programme has no redemption order {order_id} for that member. Check the id."
    zh = "本计划中不存在该会员编号为 {order_id} 的兑换订单。请检查编号。"


class UnknownVoucher(NotFound):
    code = "unknown_voucher"
    en = "There is no voucher {code!r} in this programme. Check the code the member shows."
    zh = "本计划中不存在券码 {code!r}。请核对会员出示的券码。"


class OutOfStock(Refused):
    code = "out_of_stock"
    en = "Reward {reward!r} has {left} left, {wanted} asked for. Choose fewer or another reward."
    zh = "礼品 {reward!r} 仅剩 {left} 件,本次需要 {wanted} 件。请减少数量或选择其他礼品。"


class NotOnSale(Refused):
    """Outside the sales window, paused or retired."""

    code = "not_on_sale"
    en = "Reward {reward!r} cannot be redeemed now: {problem}"
    zh = "礼品 {reward!r} 当前不可兑换:{problem_zh}"


class TierNotAllowed(Refused):
    code = "tier_not_allowed"
    en = "Reward {reward!r} is for members of {tiers}; this member's tier is {tier}."
    zh = "礼品 {reward!r} 仅限 {tiers} 会员兑换;该会员等级为 {tier}。"


class LimitReached(Refused):
    code = "limit_reached"
    en = "{problem}"
    zh = "{problem_zh}"


class PriceChanged(Refused):
    code = "price_changed"
    en = (
        "Reward {reward!r} now costs this member {points} points, not the {expected} expected. "
        "Show the member the new price and send it again."
    )
    zh = (
        "礼品 {reward!r} 对该会员的价格已变为 {points} 积分,而不是预期的 {expected}。"
        "请告知会员新价格后重新提交。"
    )


class RedemptionPaymentMismatch(Refused):
    """A redemption naming a payment of another amount than the cash part it is due."""

    code = "payment_amount_mismatch"
    en = (
        "{quantity} × reward {reward!r} is due {due_fen} fen in cash; payment {payment_ref!r} "
        "says {paid_fen} fen. Nothing was recorded: take the amount due, or refund this payment."
    )
    zh = (
        "礼品 {reward!r} × {quantity} 应付现金 {due_fen} 分,支付 {payment_ref!r} 为 {paid_fen} 分。"
        "未作任何记录:请按应付金额收款,或退还该笔支付。"
    )


class VoucherNotUsable(Refused):
    code = "voucher_not_usable"
    en = "Voucher {code!r} cannot be used: {problem}"
    zh = "券码 {code!r} 无法使用:{problem_zh}"


class PaymentUsed(Refused):
    code = "payment_used"
    en = (
        "Payment {payment_ref!r} already paid for order {order_id}; a payment pays for one "
        "redemption. Send this redemption's own payment reference."
    )
    zh = (
        "支付流水 {payment_ref!r} 已用于订单 {order_id};一笔支付只能用于一次兑换。"
        "请提供本次兑换自己的支付流水号。"
    )


class PaymentAmountMismatch(Refused):
    """A payment of another amount than the cash part of the order it names."""

    code = "payment_amount_mismatch"
    en = (
        "Order {order_id} is due {due_fen} fen in cash; payment {payment_ref!r} says "
        "{paid_fen} fen. Nothing was recorded: send the payment of the amount due, or refund "
        "this one."
    )
    zh = (
        "订单 {order_id} 应付现金 {due_fen} 分,支付 {payment_ref!r} 为 {paid_fen} 分。"
        "未作任何记录:请按应付金额支付,或退还该笔支付。"
    )


class WrongCaller(Forbidden):
    """Allowed to one kind of caller only, whatever its roles: the member itself confirms
    its cooling-off hold; a till or payment system names a payment."""

    code = "wrong_caller"
    en = "{problem}"
    zh = "{problem_zh}"


__all__ += [
    "LimitReached",
    "NotOnSale",
    "OutOfStock",
    "PaymentAmountMismatch",
    "PaymentUsed",
    "PriceChanged",
    "RedemptionPaymentMismatch",
    "TierNotAllowed",
    "UnknownOrder",
    "UnknownReward",
    "UnknownVoucher",
    "VoucherNotUsable",
    "WrongCaller",
]


class UnknownWebhook(NotFound):
    code = "unknown_webhook"
    en = "This programme has no webhook subscription {webhook_id}. List them with GET …/webhooks."
    zh = "本计划中不存在编号为 {webhook_id} 的 Webhook 订阅。可通过 GET …/webhooks 查看。"


class UnknownDelivery(NotFound):
    code = "unknown_delivery"
    en = "Webhook subscription {webhook_id} has no delivery {delivery_id}. Check its deliveries."
    zh = "Webhook 订阅 {webhook_id} 中不存在投递 {delivery_id}。请查看其投递记录。"


class UnknownInboxMessage(NotFound):
    code = "unknown_inbox_message"
    en = "Member {member_id} has no inbox message {message_id}. Check the id."
    zh = "会员 {member_id} 的站内信中不存在编号为 {message_id} 的消息。请检查编号。"


class WebhookTargetRefused(InvalidInput):
    """A webhook address that cannot be used: not http(s), unresolvable, or private."""

    code = "webhook_target_refused"


class SmsUnavailable(JifenError):
    """The SMS provider failed to take a text message that had to go out now."""

    code = "sms_unavailable"
    en = (
        "The text message was not sent: the SMS service failed to take it. Nothing was "
        "changed; try again in a minute."
    )
    zh = "短信未能发出:短信服务未能接收该短信。未做任何更改,请一分钟后重试。"


STATUS[SmsUnavailable] = 503

__all__ += [
    "SmsUnavailable",
    "UnknownDelivery",
    "UnknownInboxMessage",
    "UnknownWebhook",
    "WebhookTargetRefused",
]


class ScopeTooNarrow(Forbidden):
    """The permission is held, but in a narrower scope than the operation needs: the
    programme's configuration and integrations bind every merchant, so a grant of one
    merchant or store does not reach them; an installation-wide check needs a grant of
    every programme."""

    code = "scope_too_narrow"
    en = "{problem}"
    zh = "{problem_zh}"


class TotpRequired(Forbidden):
    """A staff session opened without a TOTP code (its roles could not write then) writes
    nothing: roles that can write were granted since, and writing needs the second factor."""

    code = "totp_required"
    en = (
        "This session was opened without a TOTP code, and {permission} can change data: "
        "sign in again with your TOTP code."
    )
    zh = "本会话登录时未使用动态验证码,而 {permission} 可以修改数据:请使用动态验证码重新登录。"


__all__ += ["ScopeTooNarrow", "TotpRequired"]


# --------------------------------------------------------------------------- field messages


class Refusal(ValueError):
    """A value refused by a validator, said in English and Chinese: raised where a
    validator would raise ``ValueError``, so that a Chinese reader gets ``zh``."""

    def __init__(self, en: str, zh: str, *, at: str = "") -> None:
        super().__init__(en)
        self.zh = zh
        self.at = at
        """Where within the value checked the refused part is (a dotted path; "" for the
        value itself): a check of a whole body that finds one field wrong names it."""


# Chinese for pydantic's error types, filled from the error's context; English is
# pydantic's own message. A type not listed here is said in Chinese by _UNLISTED_ZH.
_FIELD_ZH = {
    "missing": "必填,请提供该字段。",
    "missing_argument": "必填,请提供该字段。",
    "extra_forbidden": "不接受此字段,请删除它。",
    "unexpected_keyword_argument": "不接受此字段,请删除它。",
    "int_type": "应为整数。",
    "int_parsing": "应为整数。",
    "int_from_float": "应为整数,不能带小数。",
    "int_parsing_size": "数值超出范围。",
    "float_type": "应为数字。",
    "float_parsing": "应为数字。",
    "finite_number": "应为有限的数字。",
    "decimal_type": "应为数字。",
    "decimal_parsing": "应为数字。",
    "decimal_max_digits": "最多 {max_digits} 位数字。",
    "decimal_max_places": "小数最多 {decimal_places} 位。",
    "decimal_whole_digits": "整数部分最多 {whole_digits} 位。",
    "bool_type": "应为 true 或 false。",
    "bool_parsing": "应为 true 或 false。",
    "string_type": "应为字符串。",
    "string_sub_type": "应为字符串。",
    "string_unicode": "应为有效的 Unicode 文本。",
    "string_too_short": "至少 {min_length} 个字符。",
    "string_too_long": "最多 {max_length} 个字符。",
    "string_pattern_mismatch": "格式不符,应匹配 {pattern}。",
    "greater_than": "应大于 {gt}。",
    "greater_than_equal": "应大于或等于 {ge}。",
    "less_than": "应小于 {lt}。",
    "less_than_equal": "应小于或等于 {le}。",
    "multiple_of": "应为 {multiple_of} 的倍数。",
    "literal_error": "应为以下之一:{expected}。",
    "enum": "应为以下之一:{expected}。",
    "list_type": "应为数组。",
    "tuple_type": "应为数组。",
    "set_type": "应为数组。",
    "frozen_set_type": "应为数组。",
    "too_short": "至少需要 {min_length} 项。",
    "too_long": "最多 {max_length} 项。",
    "dict_type": "应为 JSON 对象。",
    "model_type": "应为 JSON 对象。",
    "model_attributes_type": "应为 JSON 对象。",
    "dataclass_type": "应为 JSON 对象。",
    "none_required": "应为 null。",
    **dict.fromkeys(
        (
            "datetime_type",
            "datetime_parsing",
            "datetime_from_date_parsing",
            "datetime_object_invalid",
        ),
        "应为带时区偏移的 RFC 3339 时间,例如 2026-01-31T10:00:00+08:00。",
    ),
    "timezone_aware": "时间须带时区偏移,例如 +08:00。",
    "timezone_naive": "时间不应带时区偏移。",
    "date_type": "应为日期,例如 2026-01-31。",
    "date_parsing": "应为日期,例如 2026-01-31。",
    "date_from_datetime_parsing": "应为日期,例如 2026-01-31。",
    "date_from_datetime_inexact": "应为日期(不含时刻),例如 2026-01-31。",
    "time_type": "应为时刻,例如 10:00:00。",
    "time_parsing": "应为时刻,例如 10:00:00。",
    "json_invalid": "不是有效的 JSON。",
    "json_type": "应为 JSON 文本。",
    "union_tag_invalid": "{discriminator} 的值 {tag} 无效,应为以下之一:{expected_tags}。",
    "union_tag_not_found": "缺少用于区分类型的字段 {discriminator}。",
    "url_type": "应为网址。",
    "url_parsing": "不是有效的网址。",
    "url_scheme": "网址的协议应为以下之一:{expected_schemes}。",
    "uuid_type": "应为 UUID。",
    "uuid_parsing": "不是有效的 UUID。",
    "bytes_type": "应为字节串。",
    "bytes_too_short": "至少 {min_length} 个字节。",
    "bytes_too_long": "最多 {max_length} 个字节。",
}
_UNLISTED_ZH = "取值无效:{message}"


def field_problem(error: ErrorDetails) -> tuple[str, str]:
    """What is wrong with a field, in English and Chinese, from one of pydantic's
    validation errors (``ValidationError.errors()``)."""
    english = error["msg"]
    context = error.get("ctx") or {}
    cause = context.get("error")
    if isinstance(cause, Refusal):  # its own words, without pydantic's "Value error, "
        return str(cause), cause.zh
    template = _FIELD_ZH.get(error["type"])
    if template is None:
        return english, _UNLISTED_ZH.format(message=english)
    # pydantic lists choices in English ("'a', 'b' or 'c'"): list them the Chinese way
    values = {
        name: value.replace(" or ", "、").replace(", ", "、") if name.startswith("expected")
        and isinstance(value, str) else value
        for name, value in context.items()
    }  # fmt: skip
    try:
        return english, template.format(**values)
    except (KeyError, IndexError):  # a context without the expected values
        return english, _UNLISTED_ZH.format(message=english)


def invalid_field(
    exc: ValidationError, *, within: str = "", field: str | None = None, whole: str = "body"
) -> InvalidInput:
    """InvalidInput naming the first field that ``exc`` (pydantic's) found wrong: its path
    under ``within`` (``field`` instead, when given; ``whole`` when the error is about the
    whole value), and what is wrong in both languages."""
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    inside = cause.at if isinstance(cause, Refusal) else ""
    path = ".".join(str(part) for part in (within, *first["loc"], inside) if part != "")
    english, chinese = field_problem(first)
    return InvalidInput(field=field or path or whole, problem=english, problem_zh=chinese)
