"""Tables of identity and access: staff users, roles and their grants, API keys, sessions,
member passwords and one-time codes; failed sign-ins under logins that match no account.

Secrets are never stored: passwords as argon2id hashes, API key secrets, session tokens and
one-time codes as keyed SHA-256 digests (they are long random strings, or short-lived and
attempt-limited), TOTP seeds encrypted with the installation's key.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
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

staff_users = Table(
    "staff_users",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False),
    Column("display_name", String(100), nullable=False, server_default=""),
    Column("password_hash", String(200), nullable=False, comment="argon2id, PHC string"),
    Column("totp_secret_enc", Text, nullable=True, comment="encrypted TOTP seed; NULL: none"),
    Column(
        "totp_last_step",
        Integer,
        nullable=False,
        server_default="0",
        comment="the last 30-second TOTP step accepted: a code is never accepted twice",
    ),
    Column("failed_sign_ins", Integer, nullable=False, server_default="0"),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("last_failed_at", UTCDateTime(), nullable=True),
    Column("active", Boolean, nullable=False, server_default="1"),
    Column("created_at", UTCDateTime(), nullable=False),
    Column(
        "home_program_id", BigId, ForeignKey("programs.id"), nullable=True,
        comment="the programme of the scope it was created in (NULL: every programme)",
    ),
    Column(
        "home_merchant", String(64), nullable=True,
        comment="the merchant of the scope it was created in (NULL: every merchant)",
    ),
    Column(
        "home_store", String(64), nullable=True,
        comment="the store of the scope it was created in (NULL: every store)",
    ),
    UniqueConstraint("username"),
)  # fmt: skip

roles = Table(
    "roles",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("code", String(64), nullable=False),
    Column("name", String(100), nullable=False),
    Column(
        "program_id",
        BigId,
        ForeignKey("programs.id"),
        nullable=True,
        comment="NULL for built-in roles; custom roles belong to the programme that made them",
    ),
    Column("builtin", Boolean, nullable=False, server_default="0"),
    Column("permissions", JSON, nullable=False, comment='list of "resource.action" strings'),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("program_id", "code"),
)

role_grants = Table(
    "role_grants",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("staff_id", BigId, ForeignKey("staff_users.id"), nullable=False, index=True),
    Column("role_id", BigId, ForeignKey("roles.id"), nullable=False),
    Column(
        "program_id",
        BigId,
        ForeignKey("programs.id"),
        nullable=True,
        comment="NULL: every programme",
    ),
    Column("merchant", String(64), nullable=True, comment="NULL: every merchant"),
    Column("store", String(64), nullable=True, comment="NULL: every store of the merchant"),
    Column("created_at", UTCDateTime(), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("prefix", String(16), nullable=False, comment="shown in lists and logs"),
    Column("secret_hash", String(64), nullable=False, comment="keyed SHA-256 of the secret"),
    Column("name", String(100), nullable=False),
    Column("program_id", BigId, ForeignKey("programs.id"), nullable=False),
    Column("merchant", String(64), nullable=True),
    Column("store", String(64), nullable=True),
    Column("permissions", JSON, nullable=False),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("created_by", String(100), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("prefix"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("token_hash", String(64), nullable=False),
    Column("subject", String(16), nullable=False, comment="staff or member"),
    Column("subject_id", BigId, nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column(
        "totp_verified", Boolean, nullable=False, server_default="0",
        comment="a staff session opened with a TOTP code: only such a session writes",
    ),
    UniqueConstraint("token_hash"),
)  # fmt: skip

member_credentials = Table(
    "member_credentials",
    metadata,
    Column("member_id", BigId, ForeignKey("members.id"), primary_key=True, autoincrement=False),
    Column("password_hash", String(200), nullable=True),
    Column("failed_sign_ins", Integer, nullable=False, server_default="0"),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("last_failed_at", UTCDateTime(), nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
)

sign_in_misses = Table(
    "sign_in_misses",
    metadata,
    Column(
        "login_hash", String(64), primary_key=True,
        comment="keyed digest of who was asked for: staff, or a programme's member, and "
        "the login",
    ),
    Column("failed_sign_ins", Integer, nullable=False, server_default="0"),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("last_failed_at", UTCDateTime(), nullable=True),
    Index("ix_sign_in_misses_last_failed_at", "last_failed_at"),
    comment="failed sign-ins under logins that match no account, slowed and locked as an "
    "account's are: an answer never tells whether a login exists",
)  # fmt: skip

one_time_codes = Table(
    "one_time_codes",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("member_id", BigId, ForeignKey("members.id"), nullable=False),
    Column("code_hash", String(64), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("used_at", UTCDateTime(), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_one_time_codes_member_created", "member_id", "created_at"),
)
