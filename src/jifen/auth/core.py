"""Who may do what: the permission table, the built-in roles and the decision itself.

Pure: no database, no HTTP. A permission is ``"resource.action"``. A principal holds grants,
each a set of permissions scoped to a programme (or every programme) and optionally a
merchant and a store; a request is allowed when one grant covers its permission, its
programme and its merchant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

PERMISSIONS: dict[str, str] = {
    "programs.read": "see programmes and their settings",
    "programs.write": "create programmes",
    "programs.settings": "request a change of programme policy (approved by a second person)",
    "members.read": "see members and their profiles",
    "members.write": "register members, change profiles, bind real names, family groups",
    "members.state": "freeze, ban, close or reactivate a member",
    "members.pii": "see decrypted phone and ID numbers, export a member's personal data",
    "members.erase": "erase the personal data of a closed member's account",
    "members.family": "add members to a family group (a member cannot do it by itself)",
    "points.read": "see balances, lots and history",
    "points.earn": "credit points",
    "points.spend": "debit points",
    "points.refund": "refund a spend",
    "points.reverse": "claw back an earning",
    "points.adjust": "manual adjustments (large ones need approval)",
    "points.transfer": "move points between members",
    "points.freeze": "freeze and unfreeze points",
    "points.clear": "request clearing a member's points (needs approval)",
    "staff.read": "see staff users",
    "staff.write": "create staff users, grant roles, unlock accounts",
    "roles.read": "see roles",
    "roles.write": "define custom roles",
    "api_keys.read": "see API keys",
    "api_keys.write": "issue and revoke API keys",
    "approvals.read": "see approval requests",
    "approvals.decide": "approve or reject another person's request",
    "approvals.withdraw": "withdraw one's own pending request",
    "audit.read": "read and export the audit log",
    "events.read": "see events and what they earned",
    "events.write": "send events (orders, check-ins, reviews…) that earn through the rules",
    "awards.decide": "approve or reject awards held for review (another person's)",
    "rules.read": "see earning rules and the earning caps",
    "rules.write": "draft, submit, dry-run, pause, resume and retire earning rules; request caps",
    "tiers.read": "see the tiers and members' tiers",
    "tiers.write": "define tiers and set a member's tier",
    "rewards.read": "see the rewards catalogue, prices and stock alerts",
    "rewards.write": "add, change, pause and restock rewards",
    "rewards.redeem": "redeem rewards for a member, cancel its redemptions (held ones are "
    "confirmed by the member itself)",
    "orders.read": "see redemption orders and vouchers",
    "orders.fulfil": "confirm, ship, deliver, cancel and return redemption orders",
    "orders.pay": "confirm that the cash part of a redemption awaiting payment is paid (a "
    "till or the payment system)",
    "vouchers.redeem": "accept a member's voucher or coupon at a till",
    "inbox.read": "see a member's in-app messages and how many are unread",
    "inbox.write": "mark a member's in-app messages read",
    "notifications.read": "see the notification outbox: every message and its delivery state",
    "webhooks.read": "see webhook subscriptions and their delivery log",
    "webhooks.write": "create, change, delete webhook subscriptions, rotate secrets, redeliver",
    "webhooks.allow_private": "let a webhook reach a private or loopback address",
}

READ_ONLY_PERMISSIONS = frozenset(p for p in PERMISSIONS if p.endswith(".read"))

_LEDGER_WRITES = [
    "points.earn",
    "points.spend",
    "points.refund",
    "points.reverse",
    "points.adjust",
    "points.transfer",
    "points.freeze",
    "points.clear",
]

BUILTIN_ROLES: dict[str, tuple[str, str, frozenset[str]]] = {
    # code: (English name, Chinese name, permissions)
    "super_admin": ("Super administrator", "超级管理员", frozenset(PERMISSIONS)),
    "operator": (
        "Operator",
        "运营",
        frozenset(
            [
                "programs.read",
                "programs.settings",
                "members.read",
                "members.write",
                "members.state",
                "members.family",
                "points.read",
                *_LEDGER_WRITES,
                "roles.read",
                "roles.write",
                "api_keys.read",
                "api_keys.write",
                "staff.read",
                "approvals.read",
                "approvals.withdraw",
                "events.read",
                "events.write",
                "rules.read",
                "rules.write",
                "tiers.read",
                "tiers.write",
                "rewards.read",
                "rewards.write",
                "rewards.redeem",
                "orders.read",
                "orders.fulfil",
                "orders.pay",
                "inbox.read",
                "inbox.write",
                "notifications.read",
                "webhooks.read",
                "webhooks.write",
            ]
        ),
    ),
    "reviewer": (
        "Reviewer",
        "审核员",
        frozenset(
            [
                "programs.read",
                "members.read",
                "points.read",
                "approvals.read",
                "approvals.decide",
                "awards.decide",
                "events.read",
                "rules.read",
                "tiers.read",
                "rewards.read",
                "orders.read",
            ]
        ),
    ),
    "risk_officer": (
        "Risk officer",
        "风控专员",
        frozenset(
            [
                "programs.read",
                "members.read",
                "members.state",
                "members.pii",
                "members.erase",
                "points.read",
                "points.freeze",
                "approvals.read",
                "approvals.decide",
                "events.read",
                "rules.read",
                "tiers.read",
            ]
        ),
    ),
    "finance": (
        "Finance",
        "财务",
        frozenset(
            [
                "programs.read",
                "members.read",
                "points.read",
                "approvals.read",
                "events.read",
                "rules.read",
                "tiers.read",
                "rewards.read",
                "orders.read",
            ]
        ),
    ),
    "auditor": ("Auditor", "审计员", frozenset(["programs.read", "audit.read"])),
    "cashier": (
        "Cashier",
        "收银员",
        frozenset(
            [
                "programs.read",
                "members.read",
                "points.read",
                "points.earn",
                "points.spend",
                "points.refund",
                "events.read",
                "events.write",
                "tiers.read",
                "rewards.read",
                "rewards.redeem",
                "orders.read",
                "orders.pay",
                "vouchers.redeem",
            ]
        ),
    ),
}

MEMBER_PERMISSIONS = frozenset(
    ["members.read", "members.write", "points.read", "points.transfer", "tiers.read",
     "rewards.read", "rewards.redeem", "orders.read", "inbox.read", "inbox.write"]
)  # fmt: skip
"""What a signed-in member may do, and only to itself."""

API_KEY_PERMISSIONS = frozenset(
    ["members.read", "members.write", "members.family", "points.read", "points.earn",
     "points.spend", "points.refund", "points.reverse", "points.transfer", "points.freeze",
     "events.read", "events.write", "rules.read", "tiers.read", "tiers.write",
     "rewards.read", "rewards.redeem", "orders.read", "orders.pay", "vouchers.redeem",
     "inbox.read", "inbox.write"]
)  # fmt: skip
"""What an API key may be given: the integration surface, never staff administration (a
payment system's key is given ``orders.pay``)."""

DEFAULT_API_KEY_PERMISSIONS = frozenset(
    ["members.read", "members.write", "points.read", "points.earn", "points.spend",
     "points.refund", "points.reverse", "events.read", "events.write", "rewards.read",
     "rewards.redeem", "orders.read"]
)  # fmt: skip


def is_write(permission: str) -> bool:
    return permission not in READ_ONLY_PERMISSIONS


@dataclass(frozen=True)
class Grant:
    """Permissions in a scope: a programme (None: all), a merchant and a store (None: all)."""

    permissions: frozenset[str]
    program_id: int | None = None
    merchant: str | None = None
    store: str | None = None
    role: str = ""

    @property
    def unscoped(self) -> bool:
        """Installation-wide: every programme, merchant and store."""
        return self.program_id is None and self.merchant is None and self.store is None

    def contains(self, program_id: int | None, merchant: str | None, store: str | None) -> bool:
        """Whether a scope lies within this grant's: a grant of one programme (merchant,
        store) contains that one only, never the wider scope of every programme (merchant,
        store)."""
        return (
            self.program_id in (None, program_id)
            and self.merchant in (None, merchant)
            and self.store in (None, store)
        )


@dataclass(frozen=True)
class Principal:
    """Who is asking: a staff user, a member or an API key, with what it may do."""

    kind: str  # "staff", "member", "key"
    id: int
    name: str
    """For the audit log and ledger ``actor``: ``staff:alice``, ``member:42``, ``key:jf_ab12``."""
    grants: tuple[Grant, ...] = ()
    program_id: int | None = None
    """A member's or an API key's own programme."""
    member_id: int | None = None
    api_key_id: int | None = None
    session_id: int | None = None
    roles: tuple[str, ...] = field(default=())
    totp_verified: bool = False
    """A staff session opened with a TOTP code: only such a session writes (roles that can
    write may have been granted after a sign-in that needed no code)."""
    expires_at: datetime | None = None
    """When an API key stops working (None: never, or not a key)."""

    @property
    def scope(self) -> str:
        """Namespace of this principal's idempotency keys."""
        return f"{self.kind}:{self.id}"

    def allows(
        self, permission: str, *, program_id: int | None, merchant: str | None = None
    ) -> Grant | None:
        """The grant that allows ``permission`` in that programme and merchant, if any."""
        for grant in self.grants:
            if permission not in grant.permissions:
                continue
            # A route outside any programme (lists, staff, audit) is open to every grant of
            # the permission; its handler shows only the programmes the grants cover.
            if program_id is not None and grant.program_id not in (None, program_id):
                continue
            if grant.merchant is not None and merchant is not None and grant.merchant != merchant:
                continue
            return grant
        return None

    def covers(
        self,
        permission: str,
        *,
        program_id: int | None,
        merchant: str | None = None,
        store: str | None = None,
    ) -> bool:
        """Whether one grant holds ``permission`` in a scope that contains the one given:
        what its holder may hand out, and whose staff it may manage."""
        return any(
            permission in grant.permissions and grant.contains(program_id, merchant, store)
            for grant in self.grants
        )

    def everywhere(self, permission: str) -> bool:
        """Whether ``permission`` is held installation-wide (by an unscoped grant)."""
        return any(permission in grant.permissions and grant.unscoped for grant in self.grants)

    def scopes(self, permission: str) -> tuple[Grant, ...] | None:
        """The grants holding ``permission``; None when one of them is unscoped."""
        if self.everywhere(permission):
            return None
        return tuple(grant for grant in self.grants if permission in grant.permissions)

    def programs(self, permission: str) -> set[int] | None:
        """Programmes where ``permission`` is held; None means every programme."""
        found: set[int] = set()
        for grant in self.grants:
            if permission in grant.permissions:
                if grant.program_id is None:
                    return None
                found.add(grant.program_id)
        return found
