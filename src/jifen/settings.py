"""All configuration, read once from the environment (prefix ``JIFEN_``) or a ``.env`` file."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jifen.errors import Refusal

SmtpTls = Literal["none", "starttls", "implicit"]
"""How a connection to the SMTP server is secured."""


def system_language() -> str:
    """``zh`` when the locale the process runs in is Chinese (``zh_CN.UTF-8``), else ``en``."""
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(name, "")
        if value:  # the first one set decides, as for any program
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "jifen"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JIFEN_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    """Where the embedded SQLite database and other local files live."""

    database_url: str = ""
    """SQLAlchemy URL; empty means ``sqlite:///<data_dir>/jifen.db``. A plain
    ``postgresql://`` URL is driven by psycopg 3."""

    language: str = Field(default_factory=lambda: system_language())
    """Language of CLI messages and ``--help``: ``en`` or ``zh``; default: the system's locale
    (``LC_ALL``, ``LC_MESSAGES``, ``LANG``), Chinese for a ``zh`` one."""

    secret_key: str = ""
    """Key for keyed hashes (phone and ID lookups, API key and token digests) and for the
    encryption of personal data and TOTP seeds. Empty: a random key is created once in
    ``<data_dir>/secret.key`` (mode 0600). Losing it makes encrypted fields unreadable."""

    previous_secret_keys: str = ""
    """Keys ``secret_key`` replaced, newest first, comma-separated: what was encrypted or
    hashed under them is still read and recognised (a phone looked up, an API key or a
    session checked, a request or event sent again known) while ``jifen keys rekey`` moves
    the stored personal data and secrets to the current key. API keys, sessions and
    one-time codes are kept only as hashes, and events and the API's stored answers only
    as fingerprints of what was sent, which nothing can move: they are recognised under an
    old key as long as it is listed here (an event or request sent again is a replay)."""

    redis_url: str = ""
    """When set (``redis://127.0.0.1:6379/0``), rate limits are shared through Redis by
    every API process; otherwise each process counts on its own."""

    rate_limit_ip: str = "1200/minute"
    """Requests per client address (``limits`` notation: ``100/second``, ``1200/minute``)."""

    rate_limit_key: str = "6000/minute"
    """Requests per API key."""

    rate_limit_member: str = "120/minute"
    """Requests per signed-in member."""

    rate_limit_identity: str = "5/day"
    """Real-name bindings a member may try of its own: a binding refused because another
    member holds the number says so, and this keeps a member from trying number after
    number to learn whose they are. Staff binding for a member are not counted."""

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """The largest request body the API reads (16 MiB: a batch of 1,000 orders with many
    lines each); a larger one is refused with 413 before it is read."""

    rate_limit_namespace: str = "jifen"
    """Prefix of the counters, so that installations sharing one Redis count apart."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server(s) with JetStream for the event stream that ``jifen worker`` ingests;
    several comma-separated for a cluster."""

    nats_stream: str = "JIFEN_EVENTS"
    """The JetStream stream of events; made on first use when missing (an existing one keeps
    its configuration: replicas, limits)."""

    nats_subject_prefix: str = "jifen.events"
    """Events of a programme are published to ``<prefix>.<programme code>``; refused ones are
    recorded on ``<prefix>.dead.<programme code>``."""

    nats_durable: str = "jifen-worker"
    """The durable consumer all workers share: each message goes to one of them, so running
    more workers splits the stream. Another installation reading the same stream needs a name
    of its own (each durable consumer sees every event)."""

    smtp_host: str = ""
    """SMTP server for email notifications; empty: emails wait in the outbox (nothing is
    lost) until one is configured."""

    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_from: str = "jifen <noreply@localhost>"
    """The From header of notification emails."""

    smtp_starttls: bool = True
    """Upgrade the SMTP connection with STARTTLS before signing in (when ``smtp_tls`` is
    not given and the port is not 465)."""

    smtp_tls: Literal["", "none", "starttls", "implicit"] = ""
    """How the SMTP connection is secured: ``implicit`` (SMTPS: TLS from the first byte,
    as on port 465), ``starttls`` (a plain connection upgraded before signing in, as on
    port 587) or ``none``. Empty: ``implicit`` on port 465, otherwise as ``smtp_starttls``
    says."""

    smtp_ca_file: str = ""
    """A PEM file of the authorities the SMTP server's certificate is checked against
    (a private mail server's); empty: the system's trusted authorities."""

    webhook_timeout_seconds: float = 5.0
    """How long a webhook receiver has to connect and answer before the attempt fails."""

    delivery_concurrency: int = Field(4, ge=1, le=64)
    """How many outbox messages the sender sends at once (a slow receiver holds up one)."""

    @field_validator("smtp_ca_file")
    @classmethod
    def _readable_ca_file(cls, value: str) -> str:
        if value and not os.access(value, os.R_OK):
            raise Refusal(
                f"{value} is not a file jifen can read (a PEM file of authorities)",
                f"无法读取文件 {value}(应为 PEM 格式的证书颁发机构文件)",
            )
        return value

    def resolved_smtp_tls(self) -> SmtpTls:
        """``smtp_tls``, or what it is taken to be when not given."""
        if self.smtp_tls == "":
            if self.smtp_port == 465:
                return "implicit"
            return "starttls" if self.smtp_starttls else "none"
        return self.smtp_tls

    def resolved_database_url(self) -> str:
        return normalise_database_url(self.database_url) or (
            f"sqlite:///{self.data_dir / 'jifen.db'}"
        )


def secret_key(settings: Settings) -> bytes:
    """The installation's secret, from ``JIFEN_SECRET_KEY`` or its key file (made once)."""
    if settings.secret_key:
        return settings.secret_key.encode()
    path = settings.data_dir / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes starting at once cannot both write a different key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(48))
    return path.read_text().strip().encode()


def previous_secret_keys(settings: Settings) -> list[bytes]:
    """The keys the installation's secret replaced (``JIFEN_PREVIOUS_SECRET_KEYS``), newest
    first."""
    keys = (key.strip() for key in settings.previous_secret_keys.split(","))
    return [key.encode() for key in keys if key]


def normalise_database_url(url: str) -> str:
    """Make a plain ``postgresql://`` or ``postgres://`` URL use the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
