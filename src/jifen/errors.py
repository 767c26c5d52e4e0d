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
    ├── RateLimited                 too many requests (HTTP 429, Retry-After)
    └── AuditCorrupt                the audit log's chain is broken

The root and the ledger's own errors live in :mod:`jifen.ledger.errors` so that the pure
core needs nothing else from jifen; this module is where everyone else imports them from.
"""

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


class AuditCorrupt(JifenError):
    code = "audit_corrupt"
    en = "The audit log is inconsistent: {problem}. Run `jifen audit verify`."
    zh = "审计日志不一致:{problem}。请运行 `jifen audit verify`。"


STATUS: dict[type[JifenError], int] = {}
"""Filled below: the HTTP status for each kind of error (the most specific class wins)."""

__all__ = [
    "STATUS",
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
    "Refused",
    "SameAccount",
    "SignInLocked",
    "StateConflict",
    "Unauthenticated",
    "UnknownApiKey",
    "UnknownApproval",
    "UnknownEvent",
    "UnknownMember",
    "UnknownPosting",
    "UnknownProgram",
    "UnknownRole",
    "UnknownRule",
    "UnknownStaff",
    "UnknownTier",
    "http_status",
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


class UnknownRule(NotFound):
    code = "unknown_rule"
    en = "This programme has no rule version {version_id}. List them with GET …/rules."
    zh = "本计划中不存在规则版本 {version_id}。可通过 GET …/rules 查看。"


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


class VoucherNotUsable(Refused):
    code = "voucher_not_usable"
    en = "Voucher {code!r} cannot be used: {problem}"
    zh = "券码 {code!r} 无法使用:{problem_zh}"


__all__ += [
    "LimitReached",
    "NotOnSale",
    "OutOfStock",
    "PriceChanged",
    "TierNotAllowed",
    "UnknownOrder",
    "UnknownReward",
    "UnknownVoucher",
    "VoucherNotUsable",
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


__all__ += ["UnknownDelivery", "UnknownInboxMessage", "UnknownWebhook", "WebhookTargetRefused"]
