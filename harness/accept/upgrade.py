"""`accept --upgrade-to RELEASE`: what the host's own config and tables would do on the new smtpd.

Before an OS upgrade the question is not "does it relay today" but "what changes tomorrow". The
host's config and tables, read as accept reads them (nothing on the host changes), are installed
on a lab test host of RELEASE's image (its sshd, its smtpd) and probed exactly like today's relay;
the two outcomes are compared probe by probe with `sidebyside`, so every difference is reported
with today's evidence beside the new release's. A probe that passes today and fails after the
upgrade (or a config the new smtpd refuses) is a failure of the host's upgrade plan: exit 1.
"""

from __future__ import annotations

from harness.accept.facts import Fact, HostFacts
from harness.accept.run import LabFactory, host_bundle, lab_probe, relay_profile, smarthost_route
from harness.check import CheckReport
from harness.pki import TestPki
from harness.sidebyside import Difference, compare
from harness.targets.select import lab_target, parse_target
from harness.upstream import Profile

# Differences that break the upgrade (exit 1); the others are reported as warnings.
BREAKING = frozenset({"breaks", "refused"})


def upgrade_facts(
    facts: HostFacts,
    profile: Profile | None,
    release: str,
    today: CheckReport | None,
    today_way: str,
    lab_factory: LabFactory,
) -> tuple[list[Fact], list[str]]:
    """Facts named `upgrade:...`: the new release's verdict on the host's files, and each difference."""
    spec = parse_target(f"lab:{release}")
    route = smarthost_route(facts)
    if route is None:
        return [_config_only(facts, spec.release)], []
    notes: list[str] = []
    if profile is None:
        profile, note = relay_profile(route, facts)
        notes.append(note)
    upgraded_facts, lab_notes, upgraded = lab_probe(facts, profile, lab_factory, spec.release)
    notes.extend(n for n in lab_notes if n not in notes)
    out = [_renamed(f) for f in upgraded_facts]
    if today is None:
        out.append(
            Fact("upgrade", "info", f"the relay was not probed today ({today_way}): nothing to compare")
        )
        return out, notes
    sbs = compare([f"today ({today.target})", upgraded.target], [today, upgraded])
    out.extend(_difference_fact(d) for d in sbs.differences)
    if not sbs.differences:
        out.append(
            Fact("upgrade", "pass", f"on {upgraded.target} every probe behaves as today ({today.target})")
        )
    return out, notes


def _renamed(fact: Fact) -> Fact:
    """`relay:NAME` of the new release becomes `upgrade:relay:NAME`, so both stand in one report."""
    return Fact(
        f"upgrade:{fact.name}", fact.status, fact.summary, fact.command, fact.output, fact.evidence, fact.hint
    )


def _difference_fact(diff: Difference) -> Fact:
    evidence = [line for side in diff.sides for line in side.lines()]
    hint = next((s.hint for s in reversed(diff.sides) if s.hint), None)
    return Fact(
        f"upgrade-difference:{diff.probe}",
        "fail" if diff.kind in BREAKING else "warn",
        diff.summary(),
        evidence=evidence,
        hint=hint,
    )


def _config_only(facts: HostFacts, release: str | None) -> Fact:
    """No smarthost to probe: still ask the new release's smtpd whether it accepts the config."""
    from harness.targets.base import TargetError

    bundle = host_bundle(facts)
    pki = TestPki()
    with lab_target(pki, release) as target:
        try:
            target.install(bundle)
            check = target.check_config(facts.config_path)
        except TargetError as exc:
            return Fact(
                "upgrade:config", "fail", f"the config could not be installed on {target.name}: {exc}"
            )
    if check.ok:
        return Fact(
            "upgrade:config", "pass", f"smtpd on {target.name} accepts the config", output=check.output
        )
    return Fact(
        "upgrade:config",
        "fail",
        f"smtpd on {target.name} refuses the config",
        f"smtpd -n -f {facts.config_path}",
        check.output,
    )
