"""`accept` on hosts laid out unlike Debian: lab test hosts made to look like them.

Each host keeps the machine's Debian default /etc/smtpd.conf (the lab host's root is the
machine's, as an overlay) beside the config really in use: a harness that guesses reads that
decoy and reports a healthy host it never looked at. The host must say where its config is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from test_accept import ALIASES, FAILING_LOG, PROVIDER, accept, config, fact, lab_factory, make_real, secrets

from harness.accept.facts import AcceptError
from harness.accept.locate import config_option, systemd_exec_start
from harness.accept.run import WAY_COPY, WAY_SANDBOX, AcceptOptions, run_accept
from harness.pki import TestPki
from harness.report import accept_text as text_report
from harness.targets.base import BundleFile, Target
from harness.targets.lab import Lab, LabHost
from harness.targets.smtpd import SmtpdTarget

pytestmark = pytest.mark.lab


def moved(directory: str, group: str = "_smtpd") -> tuple[str, tuple[BundleFile, ...]]:
    """test_accept's config and tables, with the tables in `directory` instead of /etc/mail."""
    files = tuple(
        replace(
            f,
            path=f.path.replace("/etc/mail/", f"{directory}/"),
            db=f.db.replace("/etc/mail/", f"{directory}/") if f.db else None,
            group=group if f.secret else f.group,
        )
        for f in (ALIASES, secrets())
    )
    return config().replace("/etc/mail/", f"{directory}/"), files


def snapshot(target: SmtpdTarget, *paths: str) -> str:
    """Hash, mode, owner and mtime of every file under `paths` (and the decoy, and the log)."""
    where = " ".join(("/etc/smtpd.conf", "/var/log", *paths))
    return target.check(
        f"find {where} -type f | sort | xargs stat -c '%n %a %U %G %Y %s' && "
        f"find {where} -type f | sort | xargs sha256sum"
    ).stdout


@pytest.mark.parametrize("relay_mode", ["lab", "sandbox"])
def test_the_running_smtpds_f_names_the_config(relay_lab: Lab, lab_host: LabHost, relay_mode: str) -> None:
    """Alpine, Arch, Fedora: /etc/smtpd/smtpd.conf, smtpd started with -f (the decoy unread)."""
    conf, files = moved("/etc/smtpd")
    target = make_real(lab_host, conf, files, config_path="/etc/smtpd/smtpd.conf")
    assert target.check("test -f /etc/smtpd.conf").returncode == 0  # the decoy is there
    before = snapshot(target, "/etc/smtpd")
    report = accept(relay_lab, lab_host, relay_mode=relay_mode)
    text = text_report(report)
    assert report.config_path == "/etc/smtpd/smtpd.conf", text
    summary = fact(report, "config-location")[1]
    assert "the running smtpd (pid " in summary and "-f /etc/smtpd/smtpd.conf" in summary, summary
    assert fact(report, "table:secrets")[0] == "pass", text
    assert fact(report, "relay:relay-external")[0] == "pass", text
    assert report.relay_way == (WAY_COPY if relay_mode == "lab" else WAY_SANDBOX)
    assert report.ok, text
    assert snapshot(target, "/etc/smtpd") == before


def test_f_is_read_as_smtpds_getopt_reads_it() -> None:
    """Combined flags, an attached argument, and what follows the options are not -f's."""
    assert config_option(["-dvf", "/etc/x.conf"]) == "/etc/x.conf"
    assert config_option(["-f/etc/y.conf", "-v"]) == "/etc/y.conf"
    assert config_option(["-T", "mta", "-f", "/etc/z.conf"]) == "/etc/z.conf"
    assert config_option(["-T", "-f", "x"]) is None  # -T took "-f" as its argument
    assert config_option(["-d", "--", "-f", "x"]) is None
    assert config_option(["-v"]) is None
    assert config_option(["-f", "/etc/smtpd.conf", "-x", "lookup"]) == "/etc/smtpd.conf"  # a child


def test_a_systemd_units_exec_start_is_read_from_systemctl_show() -> None:
    """systemd cannot run in a lab host: its `systemctl show -p ExecStart` line, as printed."""
    show = (
        "ExecStart={ path=/usr/sbin/smtpd ; argv[]=/usr/sbin/smtpd -f /etc/smtpd/smtpd.conf ; "
        "ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }\n"
    )
    argv = systemd_exec_start(show)
    assert argv == ("/usr/sbin/smtpd", "-f", "/etc/smtpd/smtpd.conf")
    assert config_option(argv[1:]) == "/etc/smtpd/smtpd.conf"
    assert systemd_exec_start("ExecStart=\n") is None  # no such unit


def test_the_default_compiled_into_the_hosts_smtpd(relay_lab: Lab, lab_host: LabHost) -> None:
    """An smtpd built with another default config path, started without -f: its binary says where."""
    conf, files = moved("/etc/mail")
    target = make_real(lab_host, conf, files, config_path="/opt/smtpd.conf", start="")
    # The host's own smtpd, built with /opt/smtpd.conf as its default (same length as Debian's).
    target.check(
        'python3 -c \'import sys; b = open("/usr/sbin/smtpd", "rb").read(); '
        'assert b.count(b"/etc/smtpd.conf\\0") == 1; '
        'open(sys.argv[1], "wb").write(b.replace(b"/etc/smtpd.conf\\0", b"/opt/smtpd.conf\\0"))\' '
        "/opt/smtpd && chmod 755 /opt/smtpd && mount --bind /opt/smtpd /usr/sbin/smtpd && "
        "/usr/sbin/smtpd && for i in $(seq 100); do smtpctl show status >/dev/null 2>&1 && exit 0; "
        "sleep 0.05; done; exit 1"
    )
    report = accept(relay_lab, lab_host, relay=False)
    text = text_report(report)
    assert report.config_path == "/opt/smtpd.conf", text
    summary = fact(report, "config-location")[1]
    assert "started without -f" in summary and "compiled-in default is /opt/smtpd.conf" in summary
    assert fact(report, "table:secrets")[0] == "pass" and report.ok, text


def test_no_config_where_the_host_says_is_exit_2_and_config_is_taken(
    relay_lab: Lab, lab_host: LabHost
) -> None:
    """FreeBSD's layout (config and tables in /usr/local/etc/mail), smtpd stopped: the binary's
    default (/etc/smtpd.conf here) does not exist, so the host cannot say; --config can."""
    conf, files = moved("/usr/local/etc/mail")
    path = "/usr/local/etc/mail/smtpd.conf"
    target = make_real(lab_host, conf, files, config_path=path, start="", after="rm /etc/smtpd.conf")
    before = snapshot(target, "/usr/local/etc/mail")
    with pytest.raises(AcceptError) as raised:
        accept(relay_lab, lab_host, relay=False)
    message = str(raised.value)
    assert f"root@{lab_host.address}: no smtpd config at /etc/smtpd.conf" in message, message
    assert "compiled-in default" in message and "pass --config PATH" in message, message
    report = accept(relay_lab, lab_host, config=path, upstream=PROVIDER)
    text = text_report(report)
    assert report.config_path == path and fact(report, "table:secrets")[0] == "pass", text
    assert fact(report, "service")[0] == "fail"  # it is stopped: the one finding
    assert fact(report, "relay:relay-external")[0] == "pass", text
    assert snapshot(target, "/usr/local/etc/mail") == before


def test_the_group_smtpd_runs_as_is_the_secrets_tables(relay_lab: Lab, lab_host: LabHost) -> None:
    """Alpine and Arch name smtpd's group `smtpd`: root:smtpd 640 is right there, root:root not."""
    target = lab_host.target
    assert target is not None
    target.check("groupmod -n smtpd opensmtpd")  # the lab host's own /etc (an overlay of its own)
    conf, files = moved("/etc/smtpd", group="smtpd")
    make_real(lab_host, conf, files, config_path="/etc/smtpd/smtpd.conf")
    report = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(report, "table:secrets")
    assert status == "pass" and "/etc/smtpd/secrets exists, mode 640 root:smtpd" in summary, summary
    copied: list[str] = []
    copy = lab_factory(relay_lab)

    @contextmanager
    def recording(pki: TestPki, release: str | None) -> Iterator[Target]:
        with copy(pki, release) as lab_target:
            yield lab_target
            assert isinstance(lab_target, SmtpdTarget)
            copied.append(lab_target.run("stat -c '%a %U %G' /etc/smtpd/secrets").stdout.strip())

    options = AcceptOptions(
        f"ssh://root@{lab_host.address}",
        identity=relay_lab.dir / "id_ed25519",
        known_hosts=relay_lab.dir / "known_hosts",
        upstream=PROVIDER,
        relay_mode="lab",
    )
    relayed = run_accept(options, recording)
    assert relayed.ok, text_report(relayed)
    assert copied == ["640 root opensmtpd"]  # the lab host's own smtpd group, as on the host
    target.check("chgrp root /etc/smtpd/secrets")
    broken = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(broken, "table:secrets")
    assert status == "fail" and "mode 640 root:root, must be mode 640 root:smtpd" in summary, summary


def test_a_host_without_python3_is_checked_with_its_files_copied(relay_lab: Lab, lab_host: LabHost) -> None:
    """The sandbox's forwarder is the host's python3; nothing else on the host needs it."""
    target = make_real(lab_host)
    target.check("rm -f $(which -a python3 python3.11)")  # the test host's own root (an overlay)
    report = accept(relay_lab, lab_host, relay_mode="auto")
    text = text_report(report)
    assert report.relay_way == WAY_COPY and report.ok, text
    assert "the host cannot run the relay sandbox (missing on the host: python3)" in " ".join(report.notes)


def included_config() -> tuple[str, tuple[BundleFile, ...]]:
    """test_accept's config with its secrets table and relay action in an included file."""
    lines = config().splitlines(keepends=True)
    relay = "".join(line for line in lines if "secrets" in line)  # the table and the relay action
    include = 'include "/etc/mail/relay.conf"\n'  # where the table was: before the match using it
    conf = "".join(
        include if "table secrets" in line else line
        for line in lines
        if "action" not in line or "secrets" not in line
    )
    return conf, (ALIASES, secrets(), BundleFile("/etc/mail/relay.conf", relay.encode(), 0o640))


@pytest.mark.parametrize("relay_mode", ["lab", "sandbox"])
def test_a_config_that_includes_another_file_is_followed(
    relay_lab: Lab, lab_host: LabHost, relay_mode: str
) -> None:
    """The relay route and its secrets table live in an included file: read from the host and
    followed as smtpd does (they passed unchecked, the relay never tried), copied with the config."""
    conf, files = included_config()
    target = make_real(lab_host, conf, files)
    before = snapshot(target, "/etc/mail")
    report = accept(relay_lab, lab_host, relay_mode=relay_mode)
    text = text_report(report)
    assert fact(report, "include:/etc/mail/relay.conf")[0] == "pass", text
    assert fact(report, "table:secrets")[0] == "pass", text
    assert fact(report, "relay:relay-external")[0] == "pass", text
    assert "/etc/mail/relay.conf" in fact(report, "host-unchanged")[1]
    assert report.ok, text
    target.check("chmod 644 /etc/mail/secrets")  # the broken twin: the included table's mode
    broken = accept(relay_lab, lab_host, relay=False)
    assert fact(broken, "table:secrets")[0] == "fail" and not broken.ok
    target.check("chmod 640 /etc/mail/secrets")
    assert snapshot(target, "/etc/mail") == before


def test_a_relative_include_is_exit_2(relay_lab: Lab, lab_host: LabHost) -> None:
    conf, files = included_config()
    make_real(lab_host, conf.replace('"/etc/mail/relay.conf"', '"relay.conf"'), files, start="")
    with pytest.raises(AcceptError) as raised:
        accept(relay_lab, lab_host, relay=False)
    message = str(raised.value)
    assert f"root@{lab_host.address}: /etc/smtpd.conf:2: include 'relay.conf' is a relative path" in message
    assert "pass --config" in message


def test_a_table_reached_through_a_symlink_is_judged_by_the_file(relay_lab: Lab, lab_host: LabHost) -> None:
    """/etc/mail/secrets -> /srv/mail/secrets (config management keeps the real file elsewhere):
    smtpd opens the file the link points to, so its mode and owner are the ones that count."""
    moved_secrets = replace(secrets(), path="/srv/mail/secrets")
    link = "ln -s /srv/mail/secrets /etc/mail/secrets && /usr/sbin/smtpd -f /etc/smtpd.conf"
    target = make_real(lab_host, files=(ALIASES, moved_secrets), start=link)
    before = snapshot(target, "/etc/mail", "/srv/mail")
    report = accept(relay_lab, lab_host)
    text = text_report(report)
    assert fact(report, "table:secrets")[0] == "pass", text
    assert report.ok, text
    target.check("chmod 644 /srv/mail/secrets")  # the broken twin: the file itself readable by all
    broken = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(broken, "table:secrets")
    assert status == "fail" and "secrets table is mode 644 root:opensmtpd" in summary, summary
    target.check("chmod 640 /srv/mail/secrets")
    assert snapshot(target, "/etc/mail", "/srv/mail") == before


def test_an_included_file_that_is_missing_fails_as_smtpd_does(relay_lab: Lab, lab_host: LabHost) -> None:
    """The config's fault (smtpd -n refuses it too): exit 1 with both facts, not exit 2."""
    conf, files = included_config()
    make_real(lab_host, conf, files, start="", after="rm /etc/mail/relay.conf")
    report = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(report, "include:/etc/mail/relay.conf")
    assert status == "fail" and "the file does not exist" in summary, summary
    assert fact(report, "smtpd-n")[0] == "fail" and not report.ok


def test_a_table_named_by_a_relative_path_fails_as_smtpd_refuses_it(
    relay_lab: Lab, lab_host: LabHost
) -> None:
    """`file:mail/secrets`: smtpd says `invalid backend parameter for table`, and so does the
    harness's parser; nothing in the login's home directory (/root here) is read for it."""
    conf = config().replace("file:/etc/mail/secrets", "file:mail/secrets")
    files = (ALIASES, replace(secrets(), path="/root/mail/secrets"))
    make_real(lab_host, conf, files, start="")
    report = accept(relay_lab, lab_host, relay=False)
    status, summary = fact(report, "config-grammar")
    assert status == "warn" and "invalid backend parameter for table" in summary, summary
    assert fact(report, "smtpd-n")[0] == "fail" and not report.ok
    assert "/root/mail/secrets" not in fact(report, "host-unchanged")[1]


def test_the_mail_log_of_a_host_that_logs_to_var_log_messages(relay_lab: Lab, lab_host: LabHost) -> None:
    """Alpine's busybox syslogd writes every facility to /var/log/messages: its smtpd lines count."""
    make_real(lab_host, log=FAILING_LOG, after="mv /var/log/mail.log /var/log/messages")
    report = accept(relay_lab, lab_host, relay=False)
    log = next(f for f in report.facts if f.name == "mail-log")
    assert log.status == "fail" and "authentication failed (1)" in log.summary, log.summary
    assert log.command == "tail -n 5000 /var/log/messages"


def test_two_smtpd_with_different_configs_is_exit_2_and_config_chooses(
    relay_lab: Lab, lab_host: LabHost
) -> None:
    """A second instance (its own mount namespace for its queue and control socket, as two
    instances need): which one to check cannot be guessed."""
    target = make_real(lab_host)
    target.write_file(
        "/etc/smtpd/other.conf", b"listen on socket\naction l mbox\nmatch from local for local action l\n"
    )
    target.check(
        "unshare --mount --propagation private sh -c 'mount -t tmpfs rh-run /run && "
        "mount -t tmpfs rh-spool /var/spool && mkdir -m 0711 /var/spool/smtpd && "
        "/usr/sbin/smtpd -f /etc/smtpd/other.conf'"
    )
    with pytest.raises(AcceptError) as raised:
        accept(relay_lab, lab_host, relay=False)
    message = str(raised.value)
    assert f"root@{lab_host.address}: several smtpd run with different configs" in message, message
    assert "/etc/smtpd.conf" in message and "/etc/smtpd/other.conf" in message
    assert "pass --config PATH" in message
    chosen = accept(relay_lab, lab_host, relay=False, config="/etc/smtpd.conf")
    assert chosen.config_path == "/etc/smtpd.conf" and chosen.ok, text_report(chosen)
    said = fact(chosen, "config-location")[1]
    assert said.startswith("config /etc/smtpd.conf: --config (the host does not say: several smtpd run"), said
    assert "pass --config" not in said


def test_an_smtpd_in_a_container_is_not_the_hosts(relay_lab: Lab, lab_host: LabHost) -> None:
    """A container's smtpd shows in the host's process list with its -f path, a path inside the
    container's own root: the host's smtpd is the one whose root is the host's."""
    target = make_real(lab_host)
    container = (  # its own root: the host's directories bound in, its own queue and /run
        "mkdir -p /srv/ct && mount -t tmpfs rh-ct /srv/ct && cd /srv/ct && "
        "for d in usr lib lib64 bin sbin etc dev var; do [ -e /$d ] || continue; "
        "if [ -L /$d ]; then ln -s $(readlink /$d) $d; else mkdir $d && mount --rbind /$d $d; fi; done && "
        "mkdir -p run tmp ct && printf 'listen on socket\\naction l mbox\\n"
        "match from local for local action l\\n' > ct/smtpd.conf && "
        "unshare --mount --propagation private sh -c 'mount -t tmpfs rh-ct-spool var/spool && "
        "mkdir -m 0711 var/spool/smtpd && exec chroot /srv/ct /usr/sbin/smtpd -f /ct/smtpd.conf' && "
        "for i in $(seq 100); do [ -S /srv/ct/run/smtpd.sock ] && exit 0; sleep 0.05; done; exit 1"
    )
    target.check(container)
    assert "-f /ct/smtpd.conf" in target.check("ps -A -o args=").stdout  # seen from the host
    report = accept(relay_lab, lab_host, relay=False)
    text = text_report(report)
    assert report.config_path == "/etc/smtpd.conf" and report.ok, text
    assert "the running smtpd (pid " in fact(report, "config-location")[1], text
