"""Why smtpd exited, from its own lines, and whose fault: the same words whether it gave up while
starting or a moment later while the probes ran (which of the two is the machine's load's doing:
table-ldap's connect fails before or after the queue's READY line)."""

from __future__ import annotations

from pathlib import Path

from harness.relay import backend_server_why, exited_why
from harness.targets.base import Bundle

CORPUS = Path(__file__).parent / "data" / "corpus"
LDAP = (CORPUS / "ldap-aliases.conf").read_text()
# What smtpd 6.8 logged when table-ldap gave up before the queue was loaded (seen under -n 2).
AT_START = [
    "info: OpenSMTPD 6.8.0p2 starting",
    "aliases[36]: fatal: failed to connect",
    "warn: table-proc: imsg_read: Connection reset by peer",
    "lookup: table-proc: exiting",
    "setup_proc: queue done",
    "debug: control -> lookup: pipe closed",
    "smtpd: process control socket closed",
]


def test_a_server_backend_that_gave_up_is_the_missing_server_at_start_and_later() -> None:
    why = backend_server_why(AT_START, Bundle(LDAP))
    assert why is not None
    assert why.startswith("the test host cannot provide the ldap server of table aliases (line 2)")
    assert "`aliases[36]: fatal: failed to connect`" in why
    assert exited_why(AT_START, Bundle(LDAP)) == why


def test_the_twin_a_file_table_is_no_missing_server() -> None:
    as_file = LDAP.replace("ldap:/etc/mail/ldap.conf", "file:/etc/mail/aliases")
    assert as_file != LDAP
    assert backend_server_why(AT_START, Bundle(as_file)) is None
    assert exited_why(AT_START, Bundle(as_file)) == (
        "smtpd exited while the probes ran: `aliases[36]: fatal: failed to connect`"
    )
