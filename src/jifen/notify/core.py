"""Pure logic of notifications: the retry schedule, webhook signatures, which addresses a
webhook may reach, and the message templates. No database, no clock, no network: times
and resolved addresses are passed in.

A webhook delivery carries ``Jifen-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>]``, each
``v1`` being HMAC-SHA256 under one of the subscription's secrets of ``f"{t}.{body}"``. While
a secret is being rotated both the new and the previous secret sign, so a receiver that
knows either accepts; :func:`verify` is what a receiver (and the tests) run.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

from jifen.errors import Refusal

# --------------------------------------------------------------------------- retries

RETRY_DELAYS: tuple[timedelta, ...] = (
    timedelta(seconds=30),
    timedelta(minutes=2),
    timedelta(minutes=10),
    timedelta(hours=1),
    timedelta(hours=6),
    timedelta(hours=12),
    timedelta(hours=24),
)
"""The wait after the 1st, 2nd, … failed attempt; the last one repeats (the cap)."""

MAX_ATTEMPTS = 8
"""Attempts before a message is given up ("dead"): about 44 hours after the first."""

LEASE = timedelta(minutes=5)
"""How long a claimed message belongs to its sender: one that has neither succeeded nor
failed by then (it crashed) is taken by the next sender. Longer than any send can take."""


def retry_delay(attempts: int, *, max_attempts: int = MAX_ATTEMPTS) -> timedelta | None:
    """The wait before the next attempt after ``attempts`` failed ones; None: give up."""
    if attempts < 1:
        raise ValueError("retry_delay is asked after at least one attempt")
    if attempts >= max_attempts:
        return None
    return RETRY_DELAYS[min(attempts, len(RETRY_DELAYS)) - 1]


# --------------------------------------------------------------------------- signatures

SIGNATURE_HEADER = "Jifen-Signature"
DELIVERY_HEADER = "Jifen-Delivery"
EVENT_HEADER = "Jifen-Event"
DEFAULT_TOLERANCE = timedelta(minutes=5)
"""How far a signature's timestamp may be from the receiver's clock: replays of an old
request are refused."""


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 under ``secret`` of ``f"{timestamp}.{body}"``, as hex."""
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(body: bytes, secrets: Sequence[str], timestamp: int) -> str:
    """The ``Jifen-Signature`` header value: one ``v1`` per secret (current first)."""
    if not secrets:
        raise ValueError("a delivery is signed with at least one secret")
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in secrets)])


def verify(
    header: str,
    body: bytes,
    secrets: Iterable[str],
    now: datetime,
    tolerance: timedelta = DEFAULT_TOLERANCE,
) -> bool:
    """Whether ``header`` signs ``body`` with one of ``secrets`` at a time within
    ``tolerance`` of ``now``. Comparisons take constant time."""
    timestamp: int | None = None
    given: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if (
                timestamp is not None
                or not (value.isascii() and value.isdigit())
                or len(value) > 12
            ):
                return False
            timestamp = int(value)
        elif name == "v1":
            given.append(value)
    if timestamp is None or not given:
        return False
    if abs(now.timestamp() - timestamp) > tolerance.total_seconds():
        return False
    expected = [signature(secret, timestamp, body) for secret in secrets]
    return any(hmac.compare_digest(e, g) for e in expected for g in given)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Where a webhook goes, taken apart."""

    scheme: str
    host: str
    port: int
    path: str
    """Path and query, as the request line carries them (ASCII, percent-encoded)."""


def parse_target(url: str) -> Target:
    """``url`` taken apart; ValueError saying why when it cannot be a webhook target."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "http://[::1/": an IPv6 address never closed
        raise Refusal(
            "the address cannot be read: close the [ ] around an IPv6 address",
            "无法解析该地址:IPv6 地址须用 [ ] 完整括起",
        ) from exc
    if parts.scheme not in ("http", "https"):
        raise Refusal("give an http:// or https:// address", "请给出 http:// 或 https:// 地址")
    if parts.username is not None or parts.password is not None:
        raise Refusal(
            "leave user names and passwords out of the address", "地址中不能含用户名和密码"
        )
    if not parts.hostname:
        raise Refusal("the address has no host", "地址中没有主机名")
    wrong_port = Refusal(
        "the port is not a number between 1 and 65535", "端口须为 1 到 65535 之间的数字"
    )
    try:
        given = parts.port
    except ValueError as exc:
        raise wrong_port from exc
    if given == 0:  # no port at all, which "or" below would have read as the default
        raise wrong_port
    port = given or (443 if parts.scheme == "https" else 80)
    if parts.fragment:
        raise Refusal("leave the #fragment out of the address", "地址中不能含 #片段")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # The request line is ASCII: other characters (a Chinese path) go percent-encoded as
    # UTF-8, and what the address encoded already stays as it is.
    path = quote(path, safe="!#$%&'()*+,/:;=?@[]~")
    return Target(scheme=parts.scheme, host=parts.hostname, port=port, path=path)


def forbidden_address(address: str) -> bool:
    """Whether ``address`` is private, loopback, link-local, shared, reserved, multicast or
    otherwise not a public internet address (IPv4-mapped and 6to4 (2002::/16) IPv6 judged as
    the IPv4 they carry)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return True  # not an address at all: never connect to it
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ip.sixtofour or ip
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_unspecified
    )


def refused_addresses(addresses: Iterable[str]) -> list[str]:
    """Those of ``addresses`` a webhook may not reach without an operator's permission."""
    return [address for address in addresses if forbidden_address(address)]


# --------------------------------------------------------------------------- templates

LANGUAGES = ("zh", "en")
DEFAULT_LANGUAGE = "zh"
TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str


def language_of(data: Mapping[str, Any]) -> str:
    """The language a message is written in: ``data["language"]`` when it is zh or en,
    else Chinese (members have no stored preference)."""
    wanted = str(data.get("language", "")).lower()[:2]
    return wanted if wanted in LANGUAGES else DEFAULT_LANGUAGE


@lru_cache(maxsize=256)
def _template_text(name: str, language: str) -> str | None:
    file = resources.files("jifen.notify") / "templates" / language / f"{name}.txt"
    return file.read_text(encoding="utf-8") if file.is_file() else None


def render(template: str, language: str, data: Mapping[str, Any]) -> Rendered:
    """The message ``template`` in ``language`` with ``data`` filled in (``${name}``
    placeholders; the subject on one line); :class:`Refusal` naming any placeholder ``data``
    does not give. A template jifen does not ship is rendered plainly: its name as the
    subject and the data as ``key: value`` lines, so that nothing is lost."""
    if not TEMPLATE_NAME.match(template):
        raise ValueError("a template name is lower case letters, digits, '.', '_' or '-'")
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}")
    source = _template_text(template, language)
    values = {key: str(value) for key, value in data.items()}
    if source is None:
        lines = [f"{key}: {value}" for key, value in sorted(values.items()) if key != "language"]
        return Rendered(subject=template, text="\n".join(lines))
    head, _, body = source.partition("\n\n")
    if not head.startswith("Subject: "):
        raise ValueError(f"template {language}/{template} must start with 'Subject: '")
    subject_template = string.Template(head.removeprefix("Subject: ").strip())
    text_template = string.Template(body.strip())
    # A value left out would reach the member as "${points}": refused, naming it.
    needed = dict.fromkeys(subject_template.get_identifiers() + text_template.get_identifiers())
    missing = [name for name in needed if name not in values]
    if missing:
        listed = ", ".join(missing)
        raise Refusal(
            f"template {language}/{template} needs {listed}, which its data does not give",
            f"模板 {language}/{template} 需要的数据 {listed} 未提供",
        )
    subject = subject_template.safe_substitute(values)
    # One line, whatever the data holds: a line break in a subject would start a header
    # of its own (and no mail library sends such an email).
    subject = " ".join(subject.split())
    text = text_template.safe_substitute(values)
    return Rendered(subject=subject[:200], text=text)


def mask_email(address: str) -> str:
    """``alice@example.com`` → ``a****@example.com``."""
    local, at, domain = address.partition("@")
    return (local[:1] + "****" + at + domain) if at else "****"
