"""Before/after an upgrade: the facts worth comparing, saved as JSON, and every difference.

A baseline holds what should not change silently: the smtpd version, the config's hash, the
routes it relays by, the tables (path, mode, owner; content hash for non-secret tables only),
the listeners, how the service is run, and what the relay probe saw. Secrets are never in it:
not their content and not a hash of it (a hash of a short password can be brute-forced).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.accept.facts import Fact, HostFacts
from harness.errors import HarnessError
from harness.smtpdconf import expectations
from harness.userfiles import UserFileError, read_text

FORMAT = 1


class BaselineError(HarnessError):
    """The baseline file cannot be read or is not one of ours (exit 2)."""


def build(facts: HostFacts, relay: list[Fact], relay_way: str) -> dict[str, Any]:
    routes: dict[str, Any] = {}
    if facts.parsed is not None:
        for r in expectations(facts.parsed):
            key = f"{r.action}#{len([k for k in routes if k.startswith(r.action + '#')])}"
            routes[key] = {
                "url": r.url,
                "via": r.via,
                "host": r.connect_host,
                "port": r.port,
                "tls": r.tls_mode,
                "auth": r.auth,
                "label": r.label,
                "mail_from": r.mail_from,
            }
    tables: dict[str, Any] = {}
    for t in facts.tables:
        entry: dict[str, Any] = {"backend": t.backend, "path": t.path, "exists": t.file is not None}
        if t.file is not None:
            entry.update(mode=f"{t.file.stat.mode:o}", owner=t.file.stat.owner, group=t.file.stat.group)
            if not t.secret:
                entry["sha256"] = t.file.sha256
        tables[t.name] = entry
    listens = sorted(
        f"{listen.interface} {' '.join(listen.options)}".strip()
        for listen in (facts.parsed.listens if facts.parsed else ())
    )
    return {
        "format": FORMAT,
        "host": facts.host,
        "smtpd": {"path": facts.smtpd, "version": facts.version},
        "config": {
            "path": facts.config_path,
            "sha256": facts.config.sha256 if facts.config else None,
        },
        "routes": routes,
        "tables": tables,
        "listens": listens,
        "service": facts.service,
        "relay": {
            "way": relay_way,
            "probes": {f.name: {"status": f.status, "summary": f.summary} for f in relay},
        },
    }


def dumps(baseline: dict[str, Any]) -> str:
    return json.dumps(baseline, indent=2, sort_keys=True) + "\n"


def save(baseline: dict[str, Any], path: Path) -> None:
    try:
        path.write_text(dumps(baseline), encoding="utf-8")
    except OSError as exc:
        raise BaselineError(f"{path}: cannot write: {exc.strerror}") from None


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text(path, "--baseline").removeprefix("\ufeff"))
    except UserFileError as exc:
        raise BaselineError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise BaselineError(f"--baseline {path}:{exc.lineno}: not JSON: {exc.msg}") from None
    except RecursionError:
        raise BaselineError(f"--baseline {path}: not a relay-harness baseline (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise BaselineError(f"--baseline {path}: not a relay-harness baseline ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BaselineError(f"--baseline {path}: not a relay-harness baseline (format {FORMAT})")
    return data


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Every difference as `key: before → after`.

    The host name may differ (a staging twin), and so may the way the relay was checked (in a
    sandbox on the host or in the local lab): that is the harness's choice, not the host's state.
    """
    old, new = _flatten(before), _flatten(after)
    for key in ("host", "relay.way"):
        old.pop(key, None)
        new.pop(key, None)
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a != b:
            out.append(f"{key}: {_show(a)} → {_show(b)}")
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list):
        return {prefix: tuple(value)}
    return {prefix: value}


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return json.dumps(value) if not isinstance(value, str) or value == "(absent)" else value
