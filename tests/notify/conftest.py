"""Real receivers started by the tests: an SMTP server (aiosmtpd, plain or over TLS) and
an HTTP webhook receiver that checks every signature, both on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller

from jifen.clock import Clock
from jifen.notify import core


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Collect:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.recipients: list[list[str]] = []
        self.unknown: set[str] = set()
        """Addresses this server has no mailbox for: refused with 550."""
        self.busy: set[str] = set()
        """Addresses whose mailbox cannot take mail now: refused with 450."""

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.unknown:
            return "550 5.1.1 No such user here"
        if address in self.busy:
            return "450 4.2.1 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 Message accepted for delivery"


@dataclass
class SmtpServer:
    host: str
    port: int
    inbox: _Collect


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server on loopback, keeping what it receives."""
    handler = _Collect()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield SmtpServer(controller.hostname, controller.port, handler)
    finally:
        controller.stop()


@dataclass
class SmtpsServer(SmtpServer):
    ca_file: str
    """A PEM file of the authority its certificate is signed by."""


@pytest.fixture
def smtps_server(tmp_path: Path) -> Iterator[SmtpsServer]:
    """A real SMTP server on loopback speaking TLS from the first byte (SMTPS, implicit
    TLS), with a certificate for 127.0.0.1 from a throwaway authority."""
    authority = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(tls)
    ca_file = tmp_path / "smtp-ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    handler = _Collect()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), ssl_context=tls)
    controller.start()
    try:
        yield SmtpsServer(controller.hostname, controller.port, handler, str(ca_file))
    finally:
        controller.stop()


@dataclass
class Receiver:
    """A webhook receiver: checks each request's signature against ``secrets`` at the
    clock's time, answers 500 to the first ``fail_first`` good ones, then 200 (or
    ``answer``), and accepts each ``Jifen-Delivery`` id once (a duplicate is answered 200
    and dropped)."""

    clock: Clock
    secrets: list[str] = field(default_factory=list)
    fail_first: int = 0
    answer: int | None = None
    """Answered to every good request instead of 200 (410, a redirect…)."""
    location: str | None = None
    """The Location sent with ``answer``."""
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    """The request line's path (and query) of each request, as it came."""
    accepted: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            self.requests.append({"headers": headers, "body": body})
            signed = core.verify(
                headers.get(core.SIGNATURE_HEADER, ""), body, self.secrets, self.clock.now()
            )
            if not signed:
                self.bad_signatures += 1
                return 401
            if self.fail_first > 0:
                self.fail_first -= 1
                return 500
            if self.answer is not None:
                return self.answer
            delivery = headers[core.DELIVERY_HEADER]
            if all(seen["delivery"] != delivery for seen in self.accepted):
                self.accepted.append({"delivery": delivery, "headers": headers, "body": body})
            return 200


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    servers: list[ThreadingHTTPServer] = []

    def start(clock: Clock, tls: ssl.SSLContext | None = None) -> Receiver:
        """A receiver on 127.0.0.1; with ``tls``, over HTTPS as ``localhost``."""
        receiver = Receiver(clock=clock)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.paths.append(self.path)
                status = receiver.handle(dict(self.headers.items()), body)
                self.send_response(status)
                if receiver.location is not None:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        receiver.url = (
            f"https://localhost:{port}/hooks/jifen?src=test"
            if tls is not None
            else f"http://127.0.0.1:{port}/hooks/jifen?src=test"
        )
        return receiver

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
