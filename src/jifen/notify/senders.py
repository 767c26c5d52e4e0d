"""What actually sends: small protocols for email, SMS and webhooks, and jifen's own
adapters behind them (SMTP through :mod:`smtplib`, SMS to the ``jifen.sms`` log, webhooks
over HTTP through :mod:`http.client`). ``deliver_due`` takes a :class:`Senders`; tests and
deployments pass their own (a real SMS gateway, for one).

A sender raises on failure: any exception is a failed attempt, retried with backoff, and
:class:`PermanentFailure` one that retrying cannot mend (the message goes dead at once).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Protocol

from jifen.members.core import mask_phone
from jifen.notify import core
from jifen.settings import Settings, SmtpTls, get_settings

sms_log = logging.getLogger("jifen.sms")

MAX_ANSWER_BYTES = 64 * 1024
"""A receiver's answer is read this far and no further: only its status matters."""


class PermanentFailure(Exception):
    """The attempt cannot succeed by being repeated."""


class Redirected(PermanentFailure):
    """A webhook receiver answered with a redirect (3xx). A signed delivery is not sent on
    to another address than the one subscribed: the subscription's URL needs updating."""

    def __init__(self, status: int, location: str | None) -> None:
        self.status, self.location = status, location
        where = f"to {location}" if location else "(without saying where: no Location)"
        super().__init__(
            f"the endpoint redirected {where} (HTTP {status}); signed deliveries do not follow "
            "redirects: update the subscription's URL"
        )


class RecipientRefused(Exception):
    """The mail server refused a recipient for now (4xx): tried again later."""


class EmailSender(Protocol):
    def send(self, message: EmailMessage) -> None:
        """Send ``message`` (To, Subject, Date, Message-ID set; From when the sender has none)."""


class SmsGateway(Protocol):
    def send(self, *, phone: str, text: str, message_id: str) -> None:
        """Send ``text`` to ``phone``; ``message_id`` is the same on every retry."""


class WebhookSender(Protocol):
    def post(
        self, *, url: str, body: bytes, headers: Mapping[str, str], allow_private: bool
    ) -> int:
        """POST ``body`` to ``url`` and answer the receiver's HTTP status."""


class SmtpEmailSender:
    """Email through an SMTP server (``JIFEN_SMTP_*`` settings), over TLS from the first
    byte (``implicit``, SMTPS), upgraded with STARTTLS, or plain (``none``). A recipient
    the server refuses for good (5xx) is a :class:`PermanentFailure`."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sender: str,
        user: str = "",
        password: str = "",
        tls: SmtpTls = "starttls",
        context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host, self.port, self.sender = host, port, sender
        self.user, self.password = user, password
        self.tls, self.timeout = tls, timeout
        self.context = context if context is not None else ssl.create_default_context()
        """How the server's certificate is checked: the system's authorities by default."""

    def _connect(self) -> smtplib.SMTP:
        if self.tls == "implicit":
            return smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=self.context
            )
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        if self.tls == "starttls":
            try:
                smtp.starttls(context=self.context)
            except BaseException:
                smtp.close()
                raise
        return smtp

    def send(self, message: EmailMessage) -> None:
        if "From" not in message:
            message["From"] = self.sender
        with self._connect() as smtp:
            if self.user:
                smtp.login(self.user, self.password)
            try:
                smtp.send_message(message)
            except smtplib.SMTPRecipientsRefused as exc:
                # A recipient refused for good (5xx: no such mailbox) is not there on the
                # next attempt either; a refusal for now (4xx) is tried again. Either way
                # the error kept in the outbox names the address masked, as the outbox does.
                refusals = list(exc.recipients.items())
                said = "; ".join(
                    f"{core.mask_email(to)}: {code} {answer.decode(errors='replace')}"
                    for to, (code, answer) in refusals
                )
                if refusals and all(500 <= code < 600 for _, (code, _) in refusals):
                    raise PermanentFailure(f"the mail server refused {said}") from exc
                raise RecipientRefused(f"the mail server refused {said} for now") from exc


class LogSmsGateway:
    """The built-in gateway: the text goes to the ``jifen.sms`` log, the number masked.
    A real gateway replaces it (``Senders(sms=...)``) and keeps numbers out of its logs."""

    def send(self, *, phone: str, text: str, message_id: str) -> None:
        sms_log.info("SMS %s to %s: %s", message_id, mask_phone(phone), text)


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA); OSError when it resolves to none."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    return addresses


def _connect(addresses: Sequence[str], port: int, timeout: float | None) -> socket.socket:
    """A connection to the first of ``addresses`` that takes one, as a client connecting to
    a name tries each of its addresses in turn."""
    failed: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as exc:
            failed = exc
    raise failed or OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the addresses that were checked, not to whatever the name resolves to a
    moment later (a DNS answer that changes between the check and the connection)."""

    def __init__(self, host: str, port: int, addresses: Sequence[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self._addresses, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(
        self, host: str, port: int, addresses: Sequence[str], timeout: float, tls: ssl.SSLContext
    ) -> None:
        self._tls = tls
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._addresses = addresses

    def connect(self) -> None:
        raw = _connect(self._addresses, self.port, self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


class HttpWebhookSender:
    """POSTs over HTTP(S) with short timeouts, following no redirects (a redirect is
    :class:`Redirected`, which no retry mends). The host name is resolved on every attempt
    and refused when any of its addresses is private, loopback, link-local or reserved
    (unless the subscription allows it); the connection then goes to the addresses that
    were checked, each in turn until one takes it."""

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        deadline: float = 60.0,
        resolver: Resolver = resolve,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = timeout
        """The longest wait for any one step (connecting, each read)."""
        self.deadline = deadline
        """The longest a whole request may take, however the receiver trickles its answer:
        well inside :data:`core.LEASE`, so that no other sender takes the message meanwhile."""
        self.resolver = resolver
        self.tls = tls if tls is not None else ssl.create_default_context()
        """How HTTPS receivers are verified: the system's trusted authorities by default."""

    def post(
        self, *, url: str, body: bytes, headers: Mapping[str, str], allow_private: bool
    ) -> int:
        try:
            target = core.parse_target(url)
        except ValueError as exc:
            raise PermanentFailure(f"{url}: {exc}") from exc
        addresses = self.resolver(target.host, target.port)
        refused = core.refused_addresses(addresses)
        if refused and not allow_private:
            raise PermanentFailure(
                f"{target.host} resolves to {', '.join(refused)}: a private or reserved "
                "address, which this subscription may not reach"
            )
        connection: http.client.HTTPConnection
        if target.scheme == "https":
            connection = _PinnedHTTPSConnection(
                target.host, target.port, addresses, self.timeout, self.tls
            )
        else:
            connection = _PinnedHTTPConnection(target.host, target.port, addresses, self.timeout)
        late = threading.Event()

        def cut() -> None:  # the deadline passed: end the exchange where it stands
            late.set()
            if connection.sock is not None:
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.deadline, cut)
        timer.start()
        try:
            connection.request("POST", target.path, body=body, headers=dict(headers))
            answer = connection.getresponse()
            location = answer.getheader("Location")
            answer.read(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException):
            if not late.is_set():
                raise
        finally:
            timer.cancel()
            connection.close()
        if late.is_set():  # what was read of a cut answer says nothing
            raise TimeoutError(f"the receiver did not answer within {self.deadline:g} s")
        if 300 <= answer.status < 400:
            raise Redirected(answer.status, location)
        return answer.status


@dataclass
class Senders:
    """The senders ``deliver_due`` uses. ``email=None``: no SMTP server is configured, and
    emails wait in the outbox (unclaimed, no attempt spent) until one is."""

    email: EmailSender | None = None
    sms: SmsGateway = field(default_factory=LogSmsGateway)
    webhook: WebhookSender = field(default_factory=HttpWebhookSender)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Senders:
        """jifen's own senders, configured from ``settings`` (default: the environment)."""
        settings = settings or get_settings()
        email = None
        if settings.smtp_host:
            context = ssl.create_default_context(cafile=settings.smtp_ca_file or None)
            email = SmtpEmailSender(
                host=settings.smtp_host, port=settings.smtp_port, sender=settings.smtp_from,
                user=settings.smtp_user, password=settings.smtp_password,
                tls=settings.resolved_smtp_tls(), context=context,
            )  # fmt: skip
        return cls(email=email, webhook=HttpWebhookSender(timeout=settings.webhook_timeout_seconds))
