"""Tables of the rewards domain: the catalogue with its stock, redemption orders and their
steps, vouchers, lottery prize stock, and restock alerts."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from jifen.db.base import BigId, UTCDateTime, metadata

rewards = Table(
    "rewards",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("code", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("category", String(64), nullable=False, server_default=""),
    Column("state", String(16), nullable=False, server_default="active"),
    Column("points", BigInteger, nullable=False, comment="base points price of one unit"),
    Column("terms", JSON, nullable=False, comment="the RewardDef: texts, window, limits, kind"),
    Column("stock_left", BigInteger, nullable=True, comment="NULL: unlimited"),
    Column("stock_total", BigInteger, nullable=True, comment="units ever stocked"),
    Column("sold", BigInteger, nullable=False, server_default="0"),
    Column("safety_stock", BigInteger, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("program_id", "code"),
    CheckConstraint("stock_left >= 0", name="stock_not_negative"),
    CheckConstraint("sold >= 0", name="sold_not_negative"),
)

reward_orders = Table(
    "reward_orders",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("reward_id", BigId, ForeignKey("rewards.id"), nullable=False),
    Column("idempotency_key", String(240), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("points", BigInteger, nullable=False),
    Column("cash_fen", BigInteger, nullable=False, server_default="0"),
    Column("value_fen", BigInteger, nullable=False, server_default="0"),
    Column("payment_ref", String(200), nullable=True),
    Column("price", JSON, nullable=False, comment="the steps of the quote"),
    Column("outcome", JSON, nullable=False, comment="prize, partner units, receipt, vote"),
    Column("hold_until", UTCDateTime(), nullable=True),
    Column(
        "pay_by",
        UTCDateTime(),
        nullable=True,
        comment="a cash part awaiting payment: the order lapses if not paid by then",
    ),
    Column("spend_posting_id", BigId, ForeignKey("postings.id"), nullable=True),
    Column("hold_posting_id", BigId, ForeignKey("postings.id"), nullable=True),
    Column("refund_posting_id", BigId, ForeignKey("postings.id"), nullable=True),
    Column("merchant", String(64), nullable=True),
    Column("store", String(64), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("program_id", "idempotency_key"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
    CheckConstraint(
        "state <> 'awaiting_payment' OR pay_by IS NOT NULL", name="awaiting_payment_pays_by"
    ),
    Index("ix_reward_orders_member_created", "member_id", "created_at"),
    Index("ix_reward_orders_program_state", "program_id", "state", "id"),
    Index("ix_reward_orders_spend_posting", "spend_posting_id"),
    Index("ix_reward_orders_hold_posting", "hold_posting_id"),
    # A payment pays for one order (NULLs, orders without a cash part, are all distinct).
    Index("uq_reward_orders_program_id_payment_ref", "program_id", "payment_ref", unique=True),
)

order_steps = Table(
    "reward_order_steps",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("order_id", BigId, ForeignKey("reward_orders.id"), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("by", String(120), nullable=False, server_default=""),
    Column("note", Text, nullable=False, server_default=""),
)

vouchers = Table(
    "vouchers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("code", String(32), nullable=False),
    Column("order_id", BigId, ForeignKey("reward_orders.id"), nullable=False, unique=True),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("state", String(16), nullable=False, server_default="issued"),
    Column("valid_until", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime(), nullable=True),
    Column("used_store", String(64), nullable=True),
    Column("used_by", String(120), nullable=True),
    Column("refund_posting_id", BigId, ForeignKey("postings.id"), nullable=True),
    Column(
        "coupon",
        JSON,
        nullable=True,
        comment="a coupon's terms as bought (NULL: issued before they were kept here)",
    ),
    UniqueConstraint("program_id", "code"),
    Index("ix_vouchers_due", "program_id", "state", "valid_until"),
)

prize_stock = Table(
    "prize_stock",
    metadata,
    Column("reward_id", BigId, ForeignKey("rewards.id"), primary_key=True),
    Column(
        "prize_code",
        String(64),
        primary_key=True,
        comment="a prize, or '*' for the lottery's budget (in points)",
    ),
    Column("given", BigInteger, nullable=False, server_default="0"),
    Column("remaining", BigInteger, nullable=True, comment="NULL: no limit"),
    CheckConstraint("remaining >= 0", name="remaining_not_negative"),
)

stock_alerts = Table(
    "stock_alerts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("reward_id", BigId, ForeignKey("rewards.id"), nullable=False),
    Column("stock_left", BigInteger, nullable=False),
    Column("safety_stock", BigInteger, nullable=False),
    Column("raised_at", UTCDateTime(), nullable=False),
    Column("cleared_at", UTCDateTime(), nullable=True, comment="set when restocked above"),
    Index("ix_stock_alerts_open", "program_id", "cleared_at"),
)
