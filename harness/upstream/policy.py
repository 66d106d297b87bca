"""What the fake provider demands, accepts and how it misbehaves: the profile, as data.

The profile is TOML a sysadmin writes once per provider. It is also the input of
`relay-harness check`, so errors in it must point at a file, a line and a field, like a compiler.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from harness.errors import HarnessError
from harness.names import dns_name_problem
from harness.pki import CERT_KINDS
from harness.userfiles import UserFileError, read_text

TlsPolicy = Literal["starttls-required", "starttls-optional", "implicit", "none"]
AuthPolicy = Literal["required", "optional", "none"]
Protocol = Literal["smtp", "lmtp"]
Stage = Literal["connect", "ehlo", "auth", "mail", "rcpt", "data"]
Drop = Literal["after-ehlo", "after-data"]

MAX_BANNER_DELAY = 60.0  # a fault must end by itself; longer would stall a CI run
MAX_TIMES = 100_000  # `times`: how often a tempfail or drop fires before the provider heals
MAX_FOR_SECONDS = 3600.0  # `for_seconds`: how long it fires, from the first connection


class ProfileError(HarnessError):
    """A profile that cannot be used; str() reads `FILE:LINE: field: message`."""

    def __init__(self, source: str, line: int | None, fieldname: str, message: str) -> None:
        self.source, self.line, self.field, self.message = source, line, fieldname, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {fieldname}: {message}")


@dataclass(frozen=True)
class Credential:
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Faults:
    """Misbehaviour on request; every one is bounded (a delay has a ceiling, a drop is final).

    `tempfail` and `drop` fire on every chance unless healed: with `times`, each fires that many
    times over the upstream's life and never again; with `for_seconds`, only in that window from
    the first connection. That is a provider that fails and then recovers.
    """

    tempfail: Stage | None = None
    drop: Drop | None = None
    starttls_refused: bool = False
    auth_advertised: bool = True
    banner_delay: float = 0.0
    cert: str = "good"
    times: int | None = None
    for_seconds: float | None = None


@dataclass(frozen=True)
class Profile:
    host: str = "smtp.example.net"
    port: int = 587
    tls: TlsPolicy = "starttls-required"
    auth: AuthPolicy = "required"
    protocol: Protocol = "smtp"
    sender_domains: tuple[str, ...] = ()
    credentials: tuple[Credential, ...] = ()
    faults: Faults = Faults()

    def check_password(self, user: str, password: str) -> bool:
        return any(c.user == user and c.password == password for c in self.credentials)

    def secrets(self) -> tuple[str, ...]:
        """Every password the profile knows, for redaction of anything the harness prints."""
        return tuple(c.password for c in self.credentials if c.password)

    def sender_allowed(self, address: str) -> bool:
        if not self.sender_domains:
            return True
        domain = address.rpartition("@")[2].lower()
        return domain in {d.lower() for d in self.sender_domains}


def load_profile(path: Path) -> Profile:
    try:
        text = read_text(path)
    except UserFileError as exc:
        raise ProfileError(exc.path, exc.line, "profile", exc.message) from None
    return parse_profile(text.removeprefix("\ufeff"), str(path))  # a BOM some editors write


def parse_profile(text: str, source: str = "<profile>") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise ProfileError(source, int(m.group(1)) if m else None, "toml", str(exc)) from None
    except RecursionError:
        raise ProfileError(source, None, "toml", "arrays or tables nested too deeply") from None
    return _Reader(text, source).profile(data)


def profile_from_data(data: dict[str, Any], source: str = "<profile>") -> Profile:
    """A profile given as data (a scenario's [upstream] table); its errors name the field only."""
    return _Reader("", source).profile(data)


def _control(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


class _Reader:
    """Turns the TOML dict into a Profile, naming the line of the first bad field it meets."""

    _TOP = {"host", "port", "tls", "auth", "protocol", "sender_domains", "credentials", "faults"}
    _FAULTS = {
        "tempfail",
        "drop",
        "starttls_refused",
        "auth_advertised",
        "banner_delay",
        "cert",
        "times",
        "for_seconds",
    }

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def error(self, name: str, message: str) -> ProfileError:
        return ProfileError(self.source, self._line(name), name, message)

    def _line(self, name: str) -> int | None:
        """The line of field `name` (`port`, `faults.cert`, `credentials[1].user`) in its own table.

        A field that is missing points at its table's header; inline tables and dotted keys at
        the top level point at the line that holds them.
        """
        m = re.fullmatch(r"(?:(\w+)(?:\[(\d+)\])?\.)?(\w+)", name)
        if m is None:
            return None
        table, index, key = m.groups()
        headers = [
            (i, h.group(1))
            for i, s in enumerate(self.lines)
            if (h := re.match(r"^\s*\[\[?\s*([\w.-]+)\s*\]\]?\s*(#.*)?$", s))
        ]
        bounds = [i for i, _ in headers] + [len(self.lines)]
        root = (0, bounds[0])
        if table is None:
            own = [i for i, h in headers if h == key]
            return self._find(key, *root) or (own[0] + 1 if own else None)
        sections = [(i, bounds[n + 1]) for n, (i, h) in enumerate(headers) if h == table]
        if index is not None:
            sections = sections[int(index) : int(index) + 1]
        if sections:
            start, end = sections[0]
            return self._find(key, start + 1, end) or start + 1
        return self._find(f"{table}.{key}", *root) or self._find(table, *root)

    def _find(self, key: str, start: int, end: int) -> int | None:
        """1-based line of `key = ...` (the key bare or quoted) in lines[start:end]."""
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        return next((i + 1 for i in range(start, end) if pattern.match(self.lines[i])), None)

    def profile(self, data: dict[str, Any]) -> Profile:
        self._unknown(data, self._TOP, "")
        defaults = Profile()
        host = self._typed(data, "host", str, defaults.host)
        if not host:
            raise self.error("host", "must not be empty")
        problem = dns_name_problem(host)
        if problem is not None:
            raise self.error("host", f"{problem} (the provider's host name, as in the relay URL)")
        port = self._typed(data, "port", int, defaults.port)
        if not 1 <= port <= 65535:
            raise self.error("port", f"{port} is not a port number (1-65535)")
        domains = self._typed(data, "sender_domains", list, [])
        if not all(isinstance(d, str) and d for d in domains):
            raise self.error("sender_domains", "must be a list of domain names")
        for domain in domains:
            problem = dns_name_problem(domain, allow_ip=False)
            if problem is not None:
                raise self.error("sender_domains", f"{problem} (a sender domain, without @)")
        return Profile(
            host=host,
            port=port,
            tls=self._choice(data, "tls", get_args(TlsPolicy), defaults.tls),
            auth=self._choice(data, "auth", get_args(AuthPolicy), defaults.auth),
            protocol=self._choice(data, "protocol", get_args(Protocol), defaults.protocol),
            sender_domains=tuple(domains),
            credentials=self._credentials(data.get("credentials", [])),
            faults=self._faults(data.get("faults", {})),
        )

    def _credentials(self, raw: Any) -> tuple[Credential, ...]:
        if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
            raise self.error("credentials", "must be an array of tables: [[credentials]]")
        out = []
        for i, entry in enumerate(raw):
            name = f"credentials[{i}]"
            self._unknown(entry, {"user", "password", "password_env"}, f"{name}.")
            user = entry.get("user")
            if not isinstance(user, str) or not user:
                raise self.error(f"{name}.user", "a user name is required")
            if _control(user):
                raise self.error(f"{name}.user", "contains a control character (newline, NUL, ...)")
            if "password" in entry and "password_env" in entry:
                raise self.error(f"{name}.password", "give password or password_env, not both")
            if "password_env" in entry:
                var = entry["password_env"]
                if not isinstance(var, str) or not os.environ.get(var):
                    raise self.error(
                        f"{name}.password_env", f"environment variable {var!r} is not set or empty"
                    )
                password = os.environ[var]
            else:
                password = entry.get("password")
                if not isinstance(password, str) or not password:
                    raise self.error(f"{name}.password", "a password (or password_env) is required")
            if _control(password):
                # AUTH PLAIN separates user and password by NUL; a newline ends an SMTP line.
                field = f"{name}.password_env" if "password_env" in entry else f"{name}.password"
                raise self.error(
                    field, "contains a control character (NUL, newline, ...): no SMTP client can send it"
                )
            out.append(Credential(user, password))
        return tuple(out)

    def _faults(self, raw: Any) -> Faults:
        if not isinstance(raw, dict):
            raise self.error("faults", "must be a table: [faults]")
        self._unknown(raw, self._FAULTS, "faults.")
        delay = raw.get("banner_delay", 0.0)
        if not isinstance(delay, int | float) or isinstance(delay, bool):
            raise self.error("faults.banner_delay", "must be a number of seconds")
        if not 0 <= delay <= MAX_BANNER_DELAY:
            raise self.error("faults.banner_delay", f"must be between 0 and {MAX_BANNER_DELAY:g}")
        tempfail = self._choice(raw, "tempfail", get_args(Stage), None, "faults.")
        drop = self._choice(raw, "drop", get_args(Drop), None, "faults.")
        times, for_seconds = self._heal(raw, tempfail is not None or drop is not None)
        return Faults(
            tempfail=tempfail,
            drop=drop,
            starttls_refused=self._typed(raw, "starttls_refused", bool, False, "faults."),
            auth_advertised=self._typed(raw, "auth_advertised", bool, True, "faults."),
            banner_delay=float(delay),
            cert=self._choice(raw, "cert", CERT_KINDS, "good", "faults."),
            times=times,
            for_seconds=for_seconds,
        )

    def _heal(self, raw: dict[str, Any], healable: bool) -> tuple[int | None, float | None]:
        """`times` or `for_seconds`: when tempfail and drop stop firing (at most one of them)."""
        times, seconds = raw.get("times"), raw.get("for_seconds")
        if times is not None and seconds is not None:
            raise self.error("faults.for_seconds", "give times or for_seconds, not both")
        name = "faults.times" if times is not None else "faults.for_seconds"
        if (times is not None or seconds is not None) and not healable:
            raise self.error(name, "bounds tempfail and drop, and neither is set")
        if times is not None and (not isinstance(times, int) or isinstance(times, bool)):
            raise self.error(name, f"must be a whole number of times, not {times!r}")
        if times is not None and not 1 <= times <= MAX_TIMES:
            raise self.error(name, f"must be between 1 and {MAX_TIMES}")
        if seconds is not None and (not isinstance(seconds, int | float) or isinstance(seconds, bool)):
            raise self.error(name, f"must be a number of seconds, not {seconds!r}")
        if seconds is not None and not 0 < seconds <= MAX_FOR_SECONDS:
            raise self.error(name, f"must be more than 0 and at most {MAX_FOR_SECONDS:g} seconds")
        return times, None if seconds is None else float(seconds)

    def _unknown(self, data: dict[str, Any], known: set[str], prefix: str) -> None:
        for key in data:
            if key not in known:
                raise self.error(f"{prefix}{key}", f"unknown field; known: {', '.join(sorted(known))}")

    def _typed(self, data: dict[str, Any], key: str, kind: type, default: Any, prefix: str = "") -> Any:
        value = data.get(key, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(f"{prefix}{key}", f"must be of type {kind.__name__}, not {value!r}")
        return value

    def _choice(
        self,
        data: dict[str, Any],
        key: str,
        choices: tuple[Any, ...],
        default: Any,
        prefix: str = "",
    ) -> Any:
        value = data.get(key, default)
        if value is not None and value not in choices:
            raise self.error(f"{prefix}{key}", f"{value!r} is not one of {', '.join(choices)}")
        return value
