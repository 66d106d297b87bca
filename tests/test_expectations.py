"""evaluate() and the twin rule on hand-made observations: judging without smtpd, without waiting."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.expectations import (
    Auth,
    AuthAttempted,
    Bounce,
    ConfigError,
    Deferrals,
    DeliveredOnce,
    Delivery,
    Expectations,
    Log,
    LogAbsent,
    MailFrom,
    Mbox,
    Mismatch,
    Queue,
    RcptTo,
    Relayed,
    SubmissionRefused,
    Tls,
    UpstreamReply,
    evaluate,
)
from harness.observation import Observation, Submission
from harness.scenarios import Case, judge_twin, load_scenario
from harness.targets.base import ConfigCheck
from harness.upstream import AuthAttempt, MessageRecord, SessionRecord

ACCEPTED = ConfigCheck(True, "")
REFUSED = ConfigCheck(
    False, "/etc/smtpd.conf:4: no such dispatcher: outbound", 4, "no such dispatcher: outbound"
)
SENT = (Submission("root", ("bob@example.com",), "sendmail"),)
RELAYED_LINE = (
    '1 mta delivery evpid=2 from=<root@host1> to=<bob@example.com> rcpt=<-> source="198.51.100.2" '
    'relay="198.51.100.1 (smtp.example.net)" delay=0s result="Ok" stat="250 2.0.0 Ok: queued"'
)
TEMPFAIL_LINE = RELAYED_LINE.replace(
    'result="Ok" stat="250 2.0.0 Ok: queued"', 'result="TempFail" stat="451 4.3.0 Try again later"'
)
MDA_LINE = (
    "3 mda delivery evpid=4 from=<root@host1> to=<root@host1> rcpt=<root@host1> user=alice delay=0s "
    "result=Ok stat=Delivered"
)
BOUNCE_LINE = MDA_LINE.replace("from=<root@host1>", "from=<>")


def message(
    rcpt: str = "bob@example.com", accepted: bool = True, mail_from: str = "root@example.org"
) -> MessageRecord:
    reply = "250 2.0.0 Ok: queued" if accepted else "550 5.1.8 rejected"
    return MessageRecord(mail_from, (rcpt,), (), 100, reply, accepted)


def session(
    tls: str = "starttls",
    auth: tuple[AuthAttempt, ...] = (AuthAttempt("PLAIN", "alice@example.org", True, True),),
    messages: tuple[MessageRecord, ...] = (),
    replies: tuple[str, ...] = ("220 ready", "250 2.0.0 Ok: queued"),
) -> SessionRecord:
    return SessionRecord(
        id=1,
        peer="198.51.100.2",
        listener="198.51.100.1:587",
        protocol="smtp",
        tls=tls,
        tls_version=None,
        tls_cipher=None,
        tls_error=None,
        ehlo="host1",
        auth=auth,
        messages=messages,
        replies=replies,
        started=0.0,
        ended=None,
    )


RELAYED = Observation(ACCEPTED, SENT, (session(messages=(message(),)),), (RELAYED_LINE,))
NOTHING = Observation(ACCEPTED, SENT)


def fields(mismatches: list[Mismatch]) -> list[str]:
    return [m.field for m in mismatches]


def test_an_observation_that_meets_everything_has_no_mismatch() -> None:
    expect = Expectations(
        relayed=Relayed(True),
        tls=Tls("starttls"),
        auth=Auth("PLAIN", "alice@example.org", True),
        auth_attempted=AuthAttempted(True),
        mail_from=MailFrom("root@example.org"),
        rcpt_to=RcptTo(("bob@example.com",)),
        log=Log((r"result=\"Ok\"",)),
        log_absent=LogAbsent(("TempFail",)),
        delivery=Delivery("Ok", r"^250 ", "bob@example.com"),
        upstream_reply=UpstreamReply("^250 2.0.0"),
    )
    assert evaluate(expect, RELAYED) == []
    assert not expect.pending(RELAYED)


@pytest.mark.parametrize(
    ("group", "observation", "field", "text"),
    [
        (Relayed(True), NOTHING, "relayed", "expected the upstream to accept the mail, saw nothing accepted"),
        (
            Relayed(False),
            RELAYED,
            "relayed",
            "saw it accepted mail from <root@example.org> to bob@example.com",
        ),
        (Tls("implicit"), RELAYED, "tls", "expected TLS implicit, saw TLS starttls"),
        (Tls("starttls"), NOTHING, "tls", "saw no session at the upstream"),
        (Auth(user="carol@example.org"), RELAYED, "auth.user", "expected AUTH user 'carol@example.org'"),
        (Auth(success=False), RELAYED, "auth.success", "saw True"),
        (Auth(mechanism="PLAIN"), NOTHING, "auth", "saw none"),
        (AuthAttempted(False), RELAYED, "auth_attempted", "saw AUTH PLAIN as alice@example.org"),
        (MailFrom("root@example.net"), RELAYED, "mail_from", "saw <root@example.org>"),
        (
            RcptTo(("bob@example.com", "carol@example.com")),
            RELAYED,
            "rcpt_to",
            "saw RCPT TO ['bob@example.com']",
        ),
        (
            Log(("AUTH rejected",)),
            RELAYED,
            "log",
            "expected a log line matching 'AUTH rejected', saw no such line",
        ),
        (LogAbsent(("mta delivery",)), RELAYED, "log_absent", "saw '1 mta delivery"),
        (Delivery(result="TempFail"), RELAYED, "delivery.result", "saw Ok (250 2.0.0 Ok: queued)"),
        (Delivery(stat="^451"), RELAYED, "delivery.stat", "expected delivery stat matching '^451'"),
        (Delivery(rcpt="carol@example.com"), RELAYED, "delivery", "a delivery attempt to carol@example.com"),
        (Queue(("bob@example.com",)), RELAYED, "queue", "saw smtpctl show queue: (empty)"),
        (UpstreamReply("^535"), RELAYED, "upstream_reply", "expected the upstream to reply '^535'"),
        (
            SubmissionRefused("Connection refused"),
            RELAYED,
            "submission_refused",
            "saw every submission accepted",
        ),
        (ConfigError("no such table"), RELAYED, "config_error", "saw smtpd -n accept it"),
    ],
)
def test_each_group_names_its_field_and_what_it_saw(
    group: object, observation: Observation, field: str, text: str
) -> None:
    expect = Expectations(**{group.key: group})  # type: ignore[attr-defined]
    mismatches = evaluate(expect, observation)
    assert field in fields(mismatches)
    assert any(text in str(m) for m in mismatches), [str(m) for m in mismatches]


def test_the_relaying_session_is_the_one_that_carried_the_sent_mail() -> None:
    # A first session refused another message in plain text; the sent mail went in the second.
    other = session(tls="none", auth=(), messages=(message("carol@example.com", accepted=False),))
    obs = Observation(ACCEPTED, SENT, (other, session(messages=(message(),))))
    assert evaluate(Expectations(relayed=Relayed(True), tls=Tls("starttls")), obs) == []
    # Mail accepted for a recipient nobody sent to is not the sent mail being relayed.
    stray = Observation(ACCEPTED, SENT, (session(messages=(message("carol@example.com"),)),))
    assert fields(evaluate(Expectations(relayed=Relayed(True)), stray)) == ["relayed"]


def test_delivery_judges_the_first_attempt() -> None:
    obs = Observation(ACCEPTED, SENT, log=(TEMPFAIL_LINE, RELAYED_LINE))
    assert evaluate(Expectations(delivery=Delivery("TempFail", "^451 4\\.3\\.0")), obs) == []
    assert fields(evaluate(Expectations(delivery=Delivery("Ok")), obs)) == ["delivery.result"]


def test_mbox_needs_the_delivery_and_the_content_and_a_bounce_comes_from_the_null_sender() -> None:
    with_mail = {"alice": "From root\nSubject: alias probe root\n\nbody\n"}
    obs = Observation(ACCEPTED, SENT, log=(MDA_LINE,), mailboxes=with_mail)
    assert evaluate(Expectations(mbox=Mbox("alice", "Subject: alias probe root")), obs) == []
    assert fields(evaluate(Expectations(mbox=Mbox("alice", "other subject")), obs)) == ["mbox.contains"]
    assert fields(evaluate(Expectations(mbox=Mbox("bob")), obs)) == ["mbox", "mbox.contains"]
    assert "not looked at" in str(evaluate(Expectations(mbox=Mbox("bob")), obs)[1])
    # The delivery to alice above was mail from root, not smtpd's bounce.
    assert fields(evaluate(Expectations(bounce=Bounce("alice")), obs)) == ["bounce"]
    bounced = Observation(ACCEPTED, SENT, log=(BOUNCE_LINE,), mailboxes={"alice": "550 5.1.8 rejected"})
    assert evaluate(Expectations(bounce=Bounce("alice", "550 5.1.8")), bounced) == []


def test_deferrals_count_tempfails_before_the_delivery_and_say_when_to_retry() -> None:
    two = Observation(ACCEPTED, SENT, log=(TEMPFAIL_LINE, TEMPFAIL_LINE, RELAYED_LINE))
    assert evaluate(Expectations(deferrals=Deferrals(2)), two) == []
    assert [str(m) for m in evaluate(Expectations(deferrals=Deferrals(1)), two)] == [
        "deferrals: expected 1 deferral(s) before delivery, saw smtpd deferred it 2 time(s)"
    ]
    deferred = Observation(ACCEPTED, SENT, log=(TEMPFAIL_LINE, TEMPFAIL_LINE))
    expect = Expectations(deferrals=Deferrals(1))
    assert "more often" in evaluate(expect, deferred)[0].saw
    assert not expect.pending(deferred)  # one deferral too many: stop waiting, it has failed
    assert Expectations(deferrals=Deferrals(2)).pending(deferred)
    # Each deferral expected is retried at once; none once the mail is delivered.
    assert Expectations(deferrals=Deferrals(2)).retries_due(deferred) == 2
    assert Expectations(deferrals=Deferrals(1)).retries_due(deferred) == 1
    assert Expectations(deferrals=Deferrals(2)).retries_due(two) == 0
    permfail = Observation(ACCEPTED, SENT, log=(TEMPFAIL_LINE.replace("TempFail", "PermFail"),))
    assert (
        evaluate(Expectations(deferrals=Deferrals(0)), permfail)[0].wanted == "delivery after 0 deferral(s)"
    )


def test_delivered_once_counts_each_recipient_and_reads_the_queue() -> None:
    once = Observation(ACCEPTED, SENT, (session(messages=(message(),)),), (RELAYED_LINE,))
    assert evaluate(Expectations(delivered_once=DeliveredOnce()), once) == []
    twice = Observation(ACCEPTED, SENT, (session(messages=(message(), message())),), (RELAYED_LINE,))
    assert [m.saw for m in evaluate(Expectations(delivered_once=DeliveredOnce()), twice)] == [
        "counts: {'bob@example.com': 2}"
    ]
    queued = Observation(ACCEPTED, SENT, once.sessions, once.log, queue="1|local|mta|bob@example.com|...")
    assert [m.wanted for m in evaluate(Expectations(delivered_once=DeliveredOnce()), queued)] == [
        "nothing left queued for ['bob@example.com']"
    ]
    assert Expectations(delivered_once=DeliveredOnce()).pending(NOTHING)


def test_implicit_expectations_config_accepted_and_submissions_accepted() -> None:
    refused = Observation(REFUSED)
    mismatches = evaluate(Expectations(relayed=Relayed(True)), refused)
    assert [str(m) for m in mismatches] == [
        "config: expected smtpd -n to accept the config, "
        "saw smtpd -n refuse it (no such dispatcher: outbound)"
    ]
    assert evaluate(Expectations(config_error=ConfigError("no such dispatcher", 4)), refused) == []
    assert fields(evaluate(Expectations(config_error=ConfigError("no such dispatcher", 5)), refused)) == [
        "config_error_line"
    ]
    not_sent = Observation(
        ACCEPTED, (Submission("root", ("bob@example.com",), "smtp", "Connection refused"),)
    )
    assert fields(evaluate(Expectations(relayed=Relayed(False), log=Log(())), not_sent)) == ["send"]
    assert evaluate(Expectations(submission_refused=SubmissionRefused("refused$")), not_sent) == []


def test_pending_is_what_waiting_waits_for() -> None:
    expect = Expectations(relayed=Relayed(True), log=Log(("mta delivery",)), queue=Queue(("x",)))
    assert expect.pending(NOTHING)
    assert not expect.pending(RELAYED)  # the queue is judged at the end, never waited for
    assert not Expectations(relayed=Relayed(False), log_absent=LogAbsent(("x",))).pending(NOTHING)
    # Two messages: relayed is met by the first; rcpt_to waits for the second to be accepted too.
    both = Expectations(relayed=Relayed(True), rcpt_to=RcptTo(("bob@example.com", "carol@example.com")))
    assert both.pending(RELAYED)
    carol = session(messages=(message(), message("carol@example.com")))
    assert not both.pending(Observation(ACCEPTED, SENT, (carol,), (RELAYED_LINE,)))


def test_a_release_override_replaces_only_the_groups_it_gives() -> None:
    base = Expectations(relayed=Relayed(True), tls=Tls("starttls"), log=Log(("a",)), timeout=5.0)
    trixie = base.overridden_by(Expectations(log=Log(("b",))))
    assert trixie == Expectations(relayed=Relayed(True), tls=Tls("starttls"), log=Log(("b",)), timeout=5.0)


PAIR = '''
description = "a pair"
config = """
table secrets file:/etc/mail/secrets
action "outbound" relay host smtp+tls://label@smtp.example.net:587 auth <secrets> mail-from "@example.org"
match from local for any action "outbound"
"""
[tables]
secrets = "label alice@example.org:pw-1\\n"
[upstream]
sender_domains = ["example.org"]

[[case]]
name = "relays"
[case.expect]
relayed = true
tls = "starttls"

[[case]]
name = "no-tls"
twin_of = "relays"
upstream = { tls = "none" }
[case.expect]
relayed = false
log = ["TLS required"]
'''


def positive_of(tmp_path: Path) -> Case:
    path = tmp_path / "pair.toml"
    path.write_text(PAIR)
    return load_scenario(path).case("relays")


def test_twin_that_fails_its_positive_is_discriminated_by_the_expectation_named(tmp_path: Path) -> None:
    plain = Observation(
        ACCEPTED, SENT, (session(tls="none", auth=(), messages=()),), ("mta error reason=TLS required",)
    )
    verdict = judge_twin(positive_of(tmp_path), plain)
    assert verdict.proves
    assert verdict.explain() == (
        "twin discriminated by: relayed (positive wants the upstream to accept the mail, twin saw nothing "
        "accepted); tls (positive wants TLS starttls, twin saw TLS none)"
    )


def test_twin_that_satisfies_every_expectation_of_its_positive_proves_nothing(tmp_path: Path) -> None:
    verdict = judge_twin(positive_of(tmp_path), RELAYED)
    assert not verdict.proves
    assert verdict.explain() == "this pair proves nothing: the twin satisfies every expectation of relays"
