"""Messages as smtpd stores and hands them on: the headers it adds, mbox framing, bounces.

The formats are smtpd 6.8's and its helpers' (smtp_session.c's Received line, enqueue.c's Date,
header_domain_append_callback()'s qualified From/To/Cc, mda.c's Return-Path and Delivered-To,
mail.local's From_ line and >From quoting, bounce.c's notice), so that what the upstream records
and what lands in a mailbox reads as on a real host.
"""

from __future__ import annotations

import re
import secrets
import time
from email import message_from_bytes
from email.policy import compat32

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_ADDRESS_HEADERS = ("from", "to", "cc")


def time_to_text(when: float) -> str:
    """to.c time_to_text(), in UTC as on the lab's test hosts: `Tue, 1 Dec 2026 20:08:16 +0000 (UTC)`."""
    t = time.gmtime(when)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000 (UTC)"
    )


def ctime(when: float) -> str:
    """ctime(3) without its newline, as mail.local writes the From_ line."""
    t = time.gmtime(when)
    return (
        f"{_DAYS[t.tm_wday]} {_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {t.tm_year}"
    )


def duration_to_text(seconds: float) -> str:
    """to.c duration_to_text(): `0s`, `1m5s`, `2d3h`."""
    t = int(seconds)
    if t == 0:
        return "0s"
    sign, t = ("-", -t) if t < 0 else ("", t)
    s, t = t % 60, t // 60
    m, t = t % 60, t // 60
    h, d = t % 24, t // 24
    return sign + "".join(f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if v)


def uid() -> int:
    """generate_uid(): a random 64-bit id (sessions, message ids)."""
    return secrets.randbits(64) or 1


def received(
    helo: str,
    rdns: str,
    address: str,
    hostname: str,
    esmtp: bool,
    authenticated: bool,
    msgid: int,
    rcpts: list[str],
    when: float,
) -> str:
    """smtp_session.c's Received header, LF-terminated lines as smtpd stores them."""
    source = address if ":" in address else f"[{address}]"
    proto = f"{'E' if esmtp else ''}SMTP{'A' if authenticated else ''}"
    text = f"Received: from {helo} ({rdns} {source})\n\tby {hostname} (OpenSMTPD) with {proto} id {msgid:08x}"
    if len(rcpts) == 1:
        text += f"\n\tfor <{rcpts[0]}>"
    return text + f";\n\t{time_to_text(when)}\n"


def stored_message(raw: bytes, *, hostname: str, header_prefix: str, add_date: bool, when: float) -> bytes:
    """The message after smtpd's header pass: LF line ends, From/To/Cc qualified, Date and
    Message-ID added where missing (for local and submission listeners)."""
    text = raw.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    head, sep, body = text.partition("\n\n")
    if not sep:
        head, body = text.rstrip("\n"), ""
    lines = head.split("\n")
    out: list[str] = []
    names = set()
    for line in lines:
        name = line.split(":", 1)[0].strip().lower() if line and line[0] not in " \t" else None
        if name:
            names.add(name)
        if name in _ADDRESS_HEADERS:
            key, _, value = line.partition(":")
            line = f"{key}:{_qualify(value, hostname)}"
        out.append(line)
    if add_date and "date" not in names:
        out.append(f"Date: {time_to_text(when)}")
    if "message-id" not in names:
        out.append(f"Message-ID: <{uid():016x}@{hostname}>")
    stored = header_prefix + "\n".join(out) + "\n\n" + body
    return stored.encode("utf-8", "surrogateescape")


def _qualify(value: str, hostname: str) -> str:
    """header_domain_append_callback(): bare local parts get `@hostname`."""
    parts = value.split(",")
    fixed = []
    for part in parts:
        m = re.fullmatch(r"(\s*)([A-Za-z0-9._%+-]+)(\s*)", part)
        fixed.append(f"{m.group(1)}{m.group(2)}@{hostname}{m.group(3)}" if m else part)
    return ",".join(fixed)


def enqueue_headers(raw: bytes, when: float) -> bytes:
    """What sendmail (enqueue.c) sends: a Date header first when the message has none."""
    msg = message_from_bytes(raw, policy=compat32)
    if msg.get("Date") is not None:
        return raw.replace(b"\r\n", b"\n")
    return f"Date: {time_to_text(when)}\n".encode() + raw.replace(b"\r\n", b"\n")


def mbox_entry(sender: str, delivered_to: str, message: bytes, when: float) -> bytes:
    """mda.c's delivery headers then mail.local's framing: From_ line, >From, a blank line."""
    head = f"Return-Path: <{sender}>\n" if sender else ""
    head += f"Delivered-To: {delivered_to}\n"
    content = head.encode() + message
    quoted = re.sub(rb"(?m)^From ", b">From ", content)
    if not quoted.endswith(b"\n"):
        quoted += b"\n"
    return f"From {sender or 'MAILER-DAEMON'} {ctime(when)}\n".encode() + quoted + b"\n"


NOTICE_INTRO = "    Hi!\n\n    This is the MAILER-DAEMON, please DO NOT REPLY to this email.\n\n"
NOTICE_ERROR = (
    "    An error has occurred while attempting to deliver a message for\n"
    "    the following list of recipients:\n\n"
)


def bounce_message(
    hostname: str, to: str, reports: list[tuple[str, str]], original: bytes, when: float
) -> bytes:
    """bounce.c's failure notice: `reports` are (recipient, smtpd's status line) pairs."""
    boundary = f"{secrets.randbits(63):16d}/{hostname}"
    parts = [
        "Subject: Delivery status notification: failed\n"
        f"From: Mailer Daemon <MAILER-DAEMON@{hostname}>\n"
        f"To: {to}\n"
        f"Date: {time_to_text(when)}\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/mixed;boundary="{boundary}"\n'
        "\n"
        "This is a MIME-encapsulated message.\n\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=us-ascii\n\n" + NOTICE_INTRO + "\n" + NOTICE_ERROR,
        "".join(f"{rcpt}: {status}\n" for rcpt, status in reports),
        "\n    Below is a copy of the original message:\n\n"
        f"--{boundary}\n"
        "Content-Description: Delivery Report\n"
        "Content-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; {hostname}\n\n",
        "".join(f"Final-Recipient: rfc822; {rcpt}\nAction: failed\nStatus: 5.0.0\n\n" for rcpt, _ in reports),
        f"--{boundary}\nContent-Description: Message headers\nContent-Type: text/rfc822-headers\n\n",
    ]
    tail = f"\n--{boundary}--\n"
    return "".join(parts).encode() + original + tail.encode()
