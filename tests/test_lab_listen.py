"""Every interface, address and name a config listens on exists in its test host (issue 11, part 2).

Linux configs say `listen on lo` (or `localhost`, `eth0`, a Docker bridge's address), OpenBSD
ones `lo0` or a group such as `all`; a test host has `lo` and `lo0`, and installing a bundle
makes whatever else its `listen on` lines name, with test addresses, inside the host only. Proof
that a listener really listens: smtpd's own banner, read by a client inside the host on each
address; proof that nothing leaked: this machine's interfaces and addresses are as they were.
The verdicts the check gives for the same shapes are in test_check_corpus.py.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from harness.smtpdconf import ConfigSyntaxError, listen_needs, parse_config
from harness.targets.base import Bundle
from harness.targets.lab import LabError, LabHost

pytestmark = pytest.mark.lab

# One port per listener: two listeners on one address and port would collide (they do on a real
# host as well), and each line is to be proven on its own.
CONFIG = """\
listen on socket
listen on lo
listen on lo0 port 2525
listen on eth0 port 2526
listen on localhost port 2527
listen on docker0 port 2528
listen on 172.17.0.1 port 2529
listen on 2001:db8:25::25 port 2530
listen on wg0 inet6 port 2531
listen on mail.example.org port 2532
listen on eth0:1 port 2533
listen on egress port 2534
listen on 0.0.0.0 port 2535
listen on ens3 inet4 port 2536
action "local_mail" mbox
match from local for local action "local_mail"
"""

# Runs inside the host: smtpd's banner from (address, port), or why not.
BANNERS = r"""
import json, socket, sys
out = {}
for address, port in json.loads(sys.argv[1]):
    try:
        with socket.create_connection((address, port), 5) as s:
            out[f"{address} {port}"] = s.recv(100).decode(errors="replace").split(" ")[0]
    except OSError as exc:
        out[f"{address} {port}"] = str(exc)
print(json.dumps(out))
"""


def _machine_network() -> tuple[set[str], set[str]]:
    """This machine's interfaces and addresses, other test hosts' veths left out (they come and go)."""
    links = json.loads(
        subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, check=True).stdout
    )
    mine = [link for link in links if not re.fullmatch(r"rh\d+[hp]\d+", link["ifname"])]
    return {link["ifname"] for link in mine}, {a["local"] for link in mine for a in link.get("addr_info", ())}


def _addresses(host: LabHost, interface: str, family: str) -> list[str]:
    assert host.target is not None
    out = host.target.check(f"ip -j -{family[-1]} addr show dev {interface}").stdout
    return [a["local"] for link in json.loads(out) for a in link["addr_info"] if a.get("scope") != "link"]


def test_listen_needs_reads_each_listen_line_the_way_smtpd_tries_it() -> None:
    needs = listen_needs(parse_config(CONFIG + "listen on ::1 port 2540\n"))
    assert needs.interfaces == ("lo", "lo0", "eth0", "docker0", "wg0", "eth0:1", "egress", "ens3")
    assert needs.addresses == ("172.17.0.1", "2001:db8:25::25", "0.0.0.0", "::1")
    assert needs.hostnames == ("localhost", "mail.example.org")
    # `any` is a keyword, no host name: smtpd -n refuses the line, and so does the parser, so the
    # test host makes nothing for it and smtpd's own words reach the report
    lines = len(CONFIG.splitlines())
    with pytest.raises(ConfigSyntaxError, match=rf":{lines + 1}: syntax error"):
        parse_config(CONFIG + "listen on any\n")


def test_every_listen_line_gets_a_listener_smtpd_answers_on(lab_host: LabHost) -> None:
    target = lab_host.target
    assert target is not None
    before = _machine_network()
    target.install(Bundle(CONFIG))
    check = target.check_config()
    assert check.ok, check.output
    target.start()
    docker0 = _addresses(lab_host, "docker0", "inet4")
    wg0 = _addresses(lab_host, "wg0", "inet6")
    ens3 = _addresses(lab_host, "ens3", "inet4")
    eth0_1 = [a for a in _addresses(lab_host, "eth0", "inet4") if a != lab_host.address]
    named = target.check("getent hosts mail.example.org").stdout.split()[0]
    every = _addresses(lab_host, "egress", "inet4")
    assert docker0 and wg0 and ens3 and eth0_1 and every, lab_host.notes
    expected = [
        ("127.0.0.1", 25),
        ("::1", 25),
        ("127.0.0.1", 2525),
        (lab_host.address, 2526),
        ("127.0.0.1", 2527),
        (docker0[0], 2528),
        ("172.17.0.1", 2529),
        ("2001:db8:25::25", 2530),
        (wg0[0], 2531),
        (named, 2532),
        (eth0_1[0], 2533),
        (every[0], 2534),
        ("127.0.0.1", 2535),
        (ens3[0], 2536),
    ]
    banners = json.loads(
        target.check(f"python3 -c {shlex.quote(BANNERS)} {shlex.quote(json.dumps(expected))}").stdout
    )
    assert banners == {f"{a} {p}": "220" for a, p in expected}
    notes = "\n".join(lab_host.notes)
    for name in ("docker0", "wg0", "ens3", "eth0:1", "egress", "172.17.0.1", "mail.example.org"):
        assert f"listen on {name}:" in notes
    assert "Debian's OpenSMTPD has no interface groups" in notes  # `egress` is OpenBSD's
    # Only inside: this machine has none of it.
    assert _machine_network() == before


def test_installing_again_makes_nothing_twice(lab_host: LabHost) -> None:
    """A scenario installs several bundles on one host: what is there is not made again."""
    target = lab_host.target
    assert target is not None
    target.install(Bundle(CONFIG))
    notes = list(lab_host.notes)
    target.install(Bundle(CONFIG))
    assert lab_host.notes == notes
    assert target.check_config().ok


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("listen on 198.51.100.1", "address 198.51.100.1: it is in the lab's own network"),
        ("listen on averyveryverylongname0", "interface averyveryverylongname0: a Linux interface name"),
        ("listen on bad/name", "interface bad/name: a Linux interface name"),
        ("listen on all", "interface all: Linux reserves the names all and default"),
    ],
)
def test_what_the_host_cannot_have_is_said_as_such(lab_host: LabHost, line: str, why: str) -> None:
    """Never "config refused" for what the test host lacks: a LabError (exit 2) naming it."""
    target = lab_host.target
    assert target is not None
    with pytest.raises(LabError, match=f"the test host cannot provide {re.escape(why)}"):
        target.install(Bundle(f'{line}\naction "l" mbox\nmatch from local for local action "l"\n'))
