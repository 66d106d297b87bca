"""`[case.expect]` tables → the typed, frozen expectations of harness.expectations, checked.

Parsing is kept apart from judging: here every value's type and every rule over the whole table
is checked when a scenario file loads, so a wrong type is a ScenarioError naming file, line and
field (through `fail`), never a traceback when the case runs; the groups then judge without
re-checking anything. A per-release override is another `Expectations` parsed by the same
function and laid over the base with `Expectations.overridden_by`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, cast, get_args

from harness.expectations import (
    Auth,
    AuthAttempted,
    Bounce,
    ConfigError,
    Deferrals,
    DeliveredOnce,
    Delivery,
    Expectation,
    Expectations,
    Log,
    LogAbsent,
    MailFrom,
    Mbox,
    Queue,
    RcptTo,
    Relayed,
    SubmissionRefused,
    Tls,
    UpstreamReply,
    toml_value,
)
from harness.observation import Observation
from harness.targets.base import ConfigCheck
from harness.upstream.record import TlsMode

MAX_TIMEOUT = 60.0
MAX_DEFERRALS = 10  # expect.deferrals: retries the harness triggers, bounded like everything else
DELIVERY_RESULTS = ("Ok", "TempFail", "PermFail")  # what smtpd 6.8 logs (mta.c, mda.c)
TLS_MODES: tuple[str, ...] = get_args(TlsMode)

Fail = Callable[[str, str], Exception]  # (dotted field, message) → the error to raise, located
_PARSERS: dict[str, Callable[[_Reader, str], Any]] = {
    "relayed": lambda r, k: Relayed(r.flag(k)),
    "tls": lambda r, k: Tls(cast(TlsMode, r.choice(k, TLS_MODES))),
    "auth": lambda r, k: r.table(k, Auth),
    "auth_attempted": lambda r, k: AuthAttempted(r.flag(k)),
    "mail_from": lambda r, k: MailFrom(r.text(k, empty_ok=True)),
    "rcpt_to": lambda r, k: RcptTo(r.str_list(k)),
    "log": lambda r, k: Log(r.regex_list(k)),
    "log_absent": lambda r, k: LogAbsent(r.regex_list(k)),
    "delivery": lambda r, k: r.table(k, Delivery),
    "queue": lambda r, k: Queue(r.str_list(k)),
    "mbox": lambda r, k: r.table(k, Mbox),
    "bounce": lambda r, k: r.table(k, Bounce),
    "submission_refused": lambda r, k: SubmissionRefused(r.regex(k)),
    "upstream_reply": lambda r, k: UpstreamReply(r.regex(k)),
    "deferrals": lambda r, k: Deferrals(r.whole(k, minimum=0, maximum=MAX_DEFERRALS)),
    "delivered_once": lambda r, k: DeliveredOnce(r.true(k)),
    "timeout": lambda r, k: r.seconds(k, MAX_TIMEOUT),
}
KEYS = (*(f.name for f in dataclasses.fields(Expectations)), "config_error_line")


def parse_expectations(raw: Mapping[str, Any], fail: Fail, prefix: str = "expect") -> Expectations:
    """The typed groups of one `[case.expect]` table (types only; `validate` checks the whole)."""
    for key in raw:
        if key not in KEYS:
            raise fail(f"{prefix}.{key}", f"unknown field; known: {', '.join(sorted(KEYS))}")
    reader = _Reader(raw, fail, prefix)
    groups = {key: parse(reader, key) for key, parse in _PARSERS.items() if key in raw}
    if "config_error_line" in raw and "config_error" not in raw:
        raise fail(f"{prefix}.config_error_line", "needs config_error (the message smtpd -n prints)")
    if "config_error" in raw:
        line = reader.whole("config_error_line", minimum=1) if "config_error_line" in raw else None
        groups["config_error"] = ConfigError(reader.text("config_error"), line)
    return Expectations(**groups)


def validate(expect: Expectations, fail: Fail, prefix: str = "expect") -> None:
    """Rules over the whole table: a case must wait on something, a refused config sends nothing."""
    if expect.config_error is not None:
        others = [g.key for g in expect.groups() if g is not expect.config_error]
        if others or expect.timeout is not None:
            raise fail(f"{prefix}.config_error", "a refused config sends nothing: expect nothing else")
        return
    for group in (expect.deferrals, expect.delivered_once):
        if group is not None and expect.relayed != Relayed(True):
            raise fail(f"{prefix}.{group.key}", "needs relayed = true (it counts a relayed message)")
    if expect.submission_refused is not None:
        return
    if not expect.pending(Observation(ConfigCheck(True, ""))):
        raise fail(
            f"{prefix}.relayed" if expect.relayed is not None else prefix,
            "nothing to wait for: add relayed = true, or a log, delivery, auth, mbox or bounce "
            "expectation (relayed = false, queue, tls and log_absent are judged once that is seen)",
        )


class _Reader:
    """Typed reads of one table's values; a wrong type raises the located error."""

    def __init__(self, raw: Mapping[str, Any], fail: Fail, prefix: str) -> None:
        self.raw, self.fail, self.prefix = raw, fail, prefix

    def _error(self, key: str, message: str) -> Exception:
        return self.fail(f"{self.prefix}.{key}", message)

    def flag(self, key: str) -> bool:
        value = self.raw[key]
        if not isinstance(value, bool):
            raise self._error(key, f"must be true or false, not {toml_value(value)}")
        return value

    def text(self, key: str, empty_ok: bool = False) -> str:
        value = self.raw[key]
        if not isinstance(value, str) or not (value or empty_ok):
            raise self._error(key, f"must be a non-empty string, not {toml_value(value)}")
        return value

    def whole(self, key: str, minimum: int, maximum: int | None = None) -> int:
        value = self.raw[key]
        too_big = maximum is not None and isinstance(value, int) and value > maximum
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_big:
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
            raise self._error(key, f"must be a whole number {bounds}, not {toml_value(value)}")
        return value

    def true(self, key: str) -> bool:
        if not self.flag(key):
            raise self._error(key, "false checks nothing: leave it out, or say true")
        return True

    def seconds(self, key: str, maximum: float) -> float:
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum:
            raise self._error(key, f"must be seconds between 0 and {maximum:g}, not {toml_value(value)}")
        return float(value)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.raw[key]
        if value not in choices:
            raise self._error(key, f"must be one of {', '.join(choices)}, not {toml_value(value)}")
        return str(value)

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._error(key, f"must be a list of strings, not {toml_value(value)}")
        return tuple(value)

    def regex(self, key: str) -> str:
        pattern = self.text(key)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise self._error(key, f"bad regular expression {pattern!r}: {exc}") from None
        return pattern

    def regex_list(self, key: str) -> tuple[str, ...]:
        patterns = self.str_list(key)
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise self._error(key, f"bad regular expression {pattern!r}: {exc}") from None
        return patterns

    def table(self, key: str, cls: type[Expectation]) -> Any:
        value = self.raw[key]
        if not isinstance(value, dict):
            raise self._error(key, f"must be a table {{ ... }}, not {toml_value(value)}")
        sub = _Reader(value, self.fail, f"{self.prefix}.{key}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for name in value:
            if name not in fields:
                raise sub._error(name, f"unknown field; known: {', '.join(fields)}")
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and name not in value:
                raise sub._error(name, f"{key} needs {name}")
        kwargs: dict[str, Any] = {}
        for name in value:
            if name == "success":
                kwargs[name] = sub.flag(name)
            elif name == "result":
                kwargs[name] = sub.choice(name, DELIVERY_RESULTS)
            elif name == "stat":
                kwargs[name] = sub.regex(name)
            else:
                kwargs[name] = sub.text(name)
        return cls(**kwargs)
