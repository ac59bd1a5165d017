"""Send a test message through a gateway the way its clients do: STARTTLS, implicit TLS or plain."""

from __future__ import annotations

import smtplib
import socket
import ssl
import uuid
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, localtime, make_msgid


@dataclass
class Submission:
    host: str  # address to connect to
    port: int = 587
    tls: str = "starttls"  # starttls | implicit | none
    server_name: str | None = None  # name the certificate must carry (default: host)
    cafile: str | None = None  # CA to verify against (default: the system's)
    login: str | None = None
    password: str | None = None
    helo: str = "smtpgw-client.test"
    timeout: float = 30.0


class ImplicitTLS(smtplib.SMTP_SSL):
    """SMTP with TLS from the first byte (port 465) that acknowledges at once what the server sent
    last in the handshake.

    After the handshake the server sends its last handshake records (TLS 1.3 session tickets; TLS
    1.2 its Finished) and then the banner. Postfix leaves Nagle's algorithm on, so the banner
    waits in the server's kernel until that last flight is acknowledged, and the client, which has
    nothing to send until the banner comes, delays its acknowledgement (about 40 ms on Linux).
    With STARTTLS the client's EHLO carries the acknowledgement, so 587 never waits. Postfix has
    no setting that changes this (no TCP_NODELAY; turning off session tickets leaves it as it is),
    so the client asks its kernel to acknowledge at once (TCP_QUICKACK, Linux; elsewhere a no-op).
    """

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        quickack = getattr(socket, "TCP_QUICKACK", None)
        if quickack is not None:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        return sock


def tls_context(cafile: str | None, minimum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if minimum is not None:
        ctx.minimum_version = minimum
    return ctx


def connect(sub: Submission, context: ssl.SSLContext | None = None) -> smtplib.SMTP:
    """An SMTP session, through TLS as `sub.tls` says, logged in when a login is given."""
    context = context or tls_context(sub.cafile)
    name = sub.server_name or sub.host
    if sub.tls == "implicit":
        smtp: smtplib.SMTP = ImplicitTLS(
            timeout=sub.timeout, context=context, local_hostname=sub.helo
        )
        smtp._host = name  # the name the certificate is checked against
        smtp.connect(sub.host, sub.port)
    else:
        smtp = smtplib.SMTP(timeout=sub.timeout, local_hostname=sub.helo)
        smtp.connect(sub.host, sub.port)
        smtp._host = name
        if sub.tls == "starttls":
            smtp.starttls(context=context)
    smtp.ehlo()
    if sub.login:
        smtp.login(sub.login, sub.password or "")
    return smtp


def message(sender: str, recipient: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = format_datetime(localtime())
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "smtpgw.test")
    msg.set_content(body)
    return msg


def send(sub: Submission, sender: str, recipient: str, subject: str | None = None) -> str:
    """Send one message; returns its token (in the subject and body) to find it on arrival."""
    token = uuid.uuid4().hex
    subject = f"{subject or 'smtpgw test'} {token}"
    body = f"Sent by smtpgw through {sub.host}:{sub.port}.\ntoken: {token}\n"
    with connect(sub) as smtp:
        smtp.send_message(message(sender, recipient, subject, body), sender, [recipient])
    return token
