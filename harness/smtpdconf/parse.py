r"""smtpd.conf (OpenSMTPD 6.4+ grammar, as in 6.8, or as in 7.6) as frozen data with line numbers.

Every item carries the line smtpd would report for it, so a finding about the
model can be compared with what `smtpd -n` prints (`FILE:LINE: message`).
The lexer follows parse.y's yylex() closely (keywords, macros, `\` joins,
quoting), because where a token ends and which line it is on are exactly what
the comparison depends on.  The grammar is followed less strictly: a statement
the model does not describe is kept raw rather than rejected, and grammar from
before 6.4 is kept raw and marked so the linter can name it.

Two grammars: 6.8's (Debian 12) and 7.6's (Debian 13), which adds `ciphers` and `protocols` to
relay actions and listeners, and lets `{ }` lists break lines after `{` and `,`. A config is
judged by the grammar of the smtpd it will meet, so the same text can be fine for one release
and a syntax error for the other, exactly where that smtpd says so.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal as TypingLiteral

RawKind = TypingLiteral["pre-6.4", "unknown", "other"]

GRAMMARS = ("6.8", "7.6")
DEFAULT_GRAMMAR = "6.8"
# Every later grammar accepts what an earlier one does: the one to read a config's declarations
# (its tables, actions) with, whichever smtpd will judge it.
WIDEST_GRAMMAR = GRAMMARS[-1]


def grammar_for(smtpd_version: str) -> str:
    """The grammar of an smtpd from its `smtpd -h` version (`OpenSMTPD 7.6.0-portable`, `7.6.0p1`)."""
    m = re.search(r"(\d+)\.(\d+)", smtpd_version)
    if not m:
        return DEFAULT_GRAMMAR
    return "7.6" if (int(m.group(1)), int(m.group(2))) >= (7, 0) else "6.8"


LOCAL_METHODS: frozenset[str] = frozenset({"mbox", "maildir", "lmtp", "mda", "forward-only", "expand-only"})


@dataclass(frozen=True)
class TableRef:
    """`<name>`: a reference to a table declared with `table name ...`."""

    name: str
    line: int


@dataclass(frozen=True)
class Literal:
    """A value written in place (`host smtp://x`, `{ a, b }`): smtpd makes an anonymous table."""

    values: tuple[str, ...]
    line: int


Operand = TableRef | Literal


def operand_key(operand: Operand | None) -> tuple[str, ...]:
    """Compare operands by what they denote, not by where they are written."""
    if operand is None:
        return ()
    if isinstance(operand, TableRef):
        return ("<", operand.name)
    return ("=", *operand.values)


@dataclass(frozen=True)
class Table:
    """`table NAME [backend:]config` or `table NAME { ... }`."""

    name: str
    line: int
    backend: str
    config: str | None = None
    values: tuple[str, ...] = ()
    mapping: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Listen:
    """`listen on IFACE|socket [options]`; options kept as written, refs pulled out."""

    interface: str
    line: int
    options: tuple[str, ...] = ()
    table_refs: tuple[TableRef, ...] = ()
    unknown_options: tuple[str, ...] = ()

    @property
    def is_socket(self) -> bool:
        return self.interface == "socket"


@dataclass(frozen=True)
class Pki:
    """`pki NAME cert|key|dhe FILE`, merged over lines (smtpd lowercases the name)."""

    name: str
    line: int
    cert: str | None = None
    key: str | None = None
    dhe: str | None = None


@dataclass(frozen=True)
class Ca:
    """`ca NAME cert FILE`."""

    name: str
    line: int
    cert: str | None = None


@dataclass(frozen=True)
class Option:
    """One action option in written order (`auth <secrets>`, `tls no-verify`, ...)."""

    name: str
    line: int
    value: Operand | str | None = None
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Action:
    """`action "NAME" METHOD [ARG] [options]` (smtpd calls it a dispatcher)."""

    name: str
    line: int
    method: str
    method_arg: str | None = None
    method_extra: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()

    @property
    def is_relay(self) -> bool:
        return self.method == "relay"

    def option(self, name: str) -> Option | None:
        """The first option of that name: a repeated option is a smtpd error anyway."""
        return next((opt for opt in self.options if opt.name == name), None)

    def operand(self, name: str) -> Operand | None:
        opt = self.option(name)
        if opt is None or not isinstance(opt.value, TableRef | Literal):
            return None
        return opt.value

    def string(self, name: str) -> str | None:
        opt = self.option(name)
        return opt.value if opt is not None and isinstance(opt.value, str) else None

    @property
    def host(self) -> Operand | None:
        return self.operand("host")

    @property
    def auth(self) -> Operand | None:
        return self.operand("auth")

    @property
    def mail_from(self) -> str | None:
        return self.string("mail-from")

    @property
    def helo(self) -> str | None:
        return self.string("helo")

    @property
    def tls_required(self) -> bool:
        return self.option("tls") is not None

    @property
    def tls_no_verify(self) -> bool:
        opt = self.option("tls")
        return opt is not None and "no-verify" in opt.extra


@dataclass(frozen=True)
class Condition:
    """One match condition: `[!] from any`, `for domain <t>`, `tls`, `mail-from regex x`...

    `kind` is the first keyword (from, for, tag, helo, tls, auth, mail-from,
    rcpt-to); `qualifier` the second for from/for (any, local, socket, src,
    rdns, auth, mail-from, domain, rcpt-to).
    """

    kind: str
    line: int
    negated: bool = False
    qualifier: str | None = None
    regex: bool = False
    operand: Operand | None = None

    def key(self) -> tuple[object, ...]:
        return (self.kind, self.negated, self.qualifier, self.regex, operand_key(self.operand))


@dataclass(frozen=True)
class Match:
    """`match [conditions] action "NAME"` or `match [conditions] reject`.

    `action_line` is the line of the action name token: the line smtpd
    reports `no such dispatcher` on (it differs from `line` after a `\\`).
    """

    line: int
    conditions: tuple[Condition, ...] = ()
    action: str | None = None
    action_line: int = 0
    reject: bool = False

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.kind == kind), None)

    @property
    def source(self) -> Condition:
        """`from`, with smtpd's default (`from local`) filled in."""
        return self.condition("from") or Condition("from", self.line, qualifier="local")

    @property
    def destination(self) -> Condition:
        """`for`, with smtpd's default (`for local`) filled in."""
        return self.condition("for") or Condition("for", self.line, qualifier="local")

    @property
    def extra_conditions(self) -> tuple[Condition, ...]:
        return tuple(c for c in self.conditions if c.kind not in ("from", "for"))


@dataclass(frozen=True)
class Include:
    """`include "FILE"`: followed where its text is given (parse_config's `include`), as smtpd
    reads it in place; else recorded only (the file lives on the host the config ships to)."""

    path: str
    line: int


@dataclass(frozen=True)
class RawStatement:
    """A statement the model does not describe.

    kind "pre-6.4" is grammar from before OpenSMTPD 6.4 (`accept ... relay via`),
    "other" a valid 6.4+ statement not modelled here (`smtp limit ...`), and
    "unknown" anything else.
    """

    kind: RawKind
    keyword: str
    line: int
    words: tuple[str, ...] = ()


Statement = Table | Listen | Pki | Ca | Action | Match | Include | RawStatement


@dataclass(frozen=True)
class Config:
    """A parsed smtpd.conf. `statements` keeps file order, duplicates included."""

    path: str
    tables: Mapping[str, Table] = field(default_factory=dict)
    listens: tuple[Listen, ...] = ()
    actions: Mapping[str, Action] = field(default_factory=dict)
    matches: tuple[Match, ...] = ()
    pkis: Mapping[str, Pki] = field(default_factory=dict)
    cas: Mapping[str, Ca] = field(default_factory=dict)
    includes: tuple[Include, ...] = ()
    raw: tuple[RawStatement, ...] = ()
    statements: tuple[Statement, ...] = ()
    macros: Mapping[str, str] = field(default_factory=dict)

    @property
    def relay_actions(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions.values() if a.is_relay)


# --------------------------------------------------------------------------
# Errors


class ConfigSyntaxError(Exception):
    """A config smtpd would refuse while reading it; `str()` is smtpd's `FILE:LINE: message`."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class TrailingSyntaxError(ConfigSyntaxError):
    """A syntax error after tokens that already form a whole statement, which takes effect.

    smtpd's yacc reduces a statement as soon as its tokens complete one (a default reduction:
    it does not look at the next token first), running its actions (the action declared, the
    rule added), and only then finds that the token after it cannot follow. So in
    `action "relay" relay bogus host ...` the action `relay` exists, and a later `match ...
    action "relay"` is no error; the syntax error is reported only if those actions accepted
    the statement (one that refuses it, such as `no such dispatcher`, is the line's only error).
    A `table NAME {` list is made before its values are read (a mid-rule action), so a list
    that breaks off is a table of the values before the break.
    """

    def __init__(self, path: str, line: int, message: str, statement: Statement) -> None:
        super().__init__(path, line, message)
        self.statement = statement


# --------------------------------------------------------------------------
# Lexer: a transcription of yylex()/lgetc() in OpenSMTPD 6.8 parse.y, so the
# same bytes split into the same tokens on the same lines.

# Unquoted words that are keywords (smtpd's lookup() table); such a word is
# not a STRING, so `action relay relay` is a syntax error while
# `action "relay" relay` is fine.
_KEYWORD_TEXT = """action admd alias any auth auth-optional backup bounce bypass ca cert chain
    chroot ciphers commit compression connect data data-line dhe disconnect domain
    ehlo encryption expand-only fcrdns filter for forward-only from group helo
    helo-src host hostname hostnames include inet4 inet6 junk key limit listen lmtp
    local mail-from maildir mask-src masquerade match max-deferred max-message-size
    mbox mda mta mx no-dsn no-verify noop on phase pki port proc proc-exec proxy-v2
    queue quit rcpt-to rdns received-auth recipient regex reject relay report rewrite
    rset scheduler senders smtp smtp-in smtp-out smtps socket src srs sub-addr-delim
    table tag tagged tls tls-require ttl user userbase verify virtual warn-interval
    wrapper"""
KEYWORDS: frozenset[str] = frozenset(_KEYWORD_TEXT.split())

_START_EXPAND = "\x01"
_DONE_EXPAND = "\x02"
_NOT_IN_WORD = frozenset("(){}<>!=#,")
_ENDS_NUMBER = frozenset(" \t\n\r\v\f),/}=")

TokenKind = TypingLiteral["word", "quoted", "punct", "newline", "eof"]


@dataclass(frozen=True)
class Token:
    kind: TokenKind
    text: str
    line: int

    def is_punct(self, char: str) -> bool:
        return self.kind == "punct" and self.text == char

    @property
    def is_string(self) -> bool:
        """smtpd's STRING: quoted, or an unquoted word that is not a keyword."""
        return self.kind == "quoted" or (self.kind == "word" and self.text not in KEYWORDS)


def _is_alnum(c: str) -> bool:
    return c.isascii() and c.isalnum()


def _in_word(c: str) -> bool:
    """C's isalnum() || ispunct() in the C locale, minus smtpd's separators."""
    printable_punct = c.isascii() and c.isprintable() and not c.isalnum() and c != " "
    return _is_alnum(c) or (printable_punct and c not in _NOT_IN_WORD)


class _Lexer:
    """Character stream with smtpd's pushback, macro expansion and line counting."""

    def __init__(self, text: str, path: str, macros: dict[str, str]) -> None:
        self._text = text
        self._pos = 0
        self._unget: list[str] = []
        self._expanding = False
        self._eof_reached = False
        self.line = 1
        self.path = path
        self.macros = macros

    def _igetc(self) -> str:
        while True:
            if self._unget:
                c = self._unget.pop()
            elif self._pos < len(self._text):
                c = self._text[self._pos]
                self._pos += 1
            else:
                c = ""
            if c == _START_EXPAND:
                self._expanding = True
            elif c == _DONE_EXPAND:
                self._expanding = False
            else:
                return c

    def _lgetc(self) -> str:
        """Outside quotes a backslash-newline joins lines and `\\x` is `x`."""
        c = self._igetc()
        while c == "\\":
            nxt = self._igetc()
            if nxt != "\n":
                c = nxt
                break
            self.line += 1
            c = self._igetc()
        if c == "" and not self._eof_reached:
            self._eof_reached = True  # smtpd fakes one newline at EOF
            return "\n"
        return c

    def skip_line(self) -> None:
        """findeol(): the rest of the line is dropped."""
        while (c := self._lgetc()) not in ("\n", ""):
            pass
        if c == "\n":
            self.line += 1

    def _lungetc(self, c: str) -> None:
        if c:
            self._unget.append(c)

    def _error(self, line: int, message: str) -> ConfigSyntaxError:
        return ConfigSyntaxError(self.path, line, message)

    def next_token(self) -> Token:
        while True:
            c = self._lgetc()
            while c in (" ", "\t"):
                c = self._lgetc()
            line = self.line
            if c == "#":
                while c not in ("\n", ""):
                    c = self._lgetc()
            if c == "$" and not self._expanding:
                self._expand_macro(line)
                continue
            break
        if c in ("'", '"'):
            return self._quoted(c, line)
        if c == "-" or (c.isascii() and c.isdigit()):
            token = self._number(c, line)
            if token is not None:
                return token
        if c == "=":
            nxt = self._lgetc()
            if nxt == ">":
                return Token("punct", "=>", line)
            self._lungetc(nxt)
        if _is_alnum(c) or c in (":", "_"):
            return self._word(c, line)
        if c == "\n":
            self.line += 1
            return Token("newline", "\n", line)
        if c == "":
            return Token("eof", "", line)
        return Token("punct", c, line)

    def _expand_macro(self, line: int) -> None:
        name = ""
        while True:
            c = self._lgetc()
            if _is_alnum(c) or c == "_":
                name += c
                continue
            self._lungetc(c)
            break
        value = self.macros.get(name)
        if value is None:
            raise self._error(line, f"macro '{name}' not defined")
        self._unget.append(_DONE_EXPAND)
        self._unget.extend(reversed(value))
        self._unget.append(_START_EXPAND)

    def _quoted(self, quote: str, line: int) -> Token:
        chars: list[str] = []
        while True:
            c = self._igetc()
            if c == "":
                raise self._error(self.line, "reached end of file while parsing quoted string")
            if c == "\n":
                self.line += 1
                continue
            if c == "\\":
                nxt = self._igetc()
                if nxt in (quote, " ", "\t"):
                    c = nxt
                elif nxt == "\n":
                    self.line += 1
                    continue
                else:
                    self._lungetc(nxt)
            elif c == quote:
                return Token("quoted", "".join(chars), line)
            elif c == "\0":
                raise self._error(self.line, "syntax error")
            chars.append(c)

    def _number(self, first: str, line: int) -> Token | None:
        """Digits ending on a separator are a NUMBER; otherwise re-read as a word."""
        chars = [first]
        c = self._lgetc()
        while c.isascii() and c.isdigit():
            chars.append(c)
            c = self._lgetc()
        self._lungetc(c)
        if chars != ["-"] and (c == "" or c in _ENDS_NUMBER):
            return Token("word", "".join(chars), line)
        for pushed in reversed(chars[1:]):
            self._lungetc(pushed)
        return Token("punct", "-", line) if first == "-" else None

    def _word(self, first: str, line: int) -> Token:
        chars = [first]
        c = self._lgetc()
        while c and _in_word(c):
            chars.append(c)
            c = self._lgetc()
        self._lungetc(c)
        return Token("word", "".join(chars), line)

    def statement(self) -> list[Token] | None:
        """Tokens up to the newline that ends a statement; `{ }` lists may span lines."""
        tokens: list[Token] = []
        depth = 0
        while True:
            token = self.next_token()
            if token.kind == "eof":
                if depth > 0:
                    raise self._error(token.line, "syntax error")
                return tokens or None
            tokens.append(token)
            if token.is_punct("{"):
                depth += 1
            elif token.is_punct("}"):
                depth -= 1
            elif token.kind == "newline" and depth <= 0:
                return tokens


# --------------------------------------------------------------------------
# Parser


class _Cursor:
    """Walks one statement's tokens; the last token is always its newline."""

    def __init__(self, tokens: list[Token], path: str, grammar: str = DEFAULT_GRAMMAR) -> None:
        self._tokens = tokens
        self._index = 0
        self.path = path
        self.grammar = grammar

    @property
    def since_7(self) -> bool:
        return self.grammar != "6.8"

    def newlines(self) -> None:
        """7.x's `optnl`: newlines skipped where its grammar allows them."""
        while self.peek().kind == "newline" and not self.at_end():
            self.next()

    def peek(self, ahead: int = 0) -> Token:
        return self._tokens[min(self._index + ahead, len(self._tokens) - 1)]

    def next(self) -> Token:
        token = self.peek()
        if self._index < len(self._tokens) - 1:
            self._index += 1
        return token

    def at_end(self) -> bool:
        return self.peek().kind == "newline" and self._index >= len(self._tokens) - 1

    @property
    def index(self) -> int:
        """Where the cursor is: the token a syntax error is about."""
        return self._index

    def error(self, token: Token | None = None, message: str = "syntax error") -> Exception:
        return ConfigSyntaxError(self.path, (token or self.peek()).line, message)

    def is_keyword(self, *words: str) -> bool:
        token = self.peek()
        return token.kind == "word" and token.text in words

    def keyword(self, *words: str) -> str | None:
        """Consume and return one of `words` if it comes next (unquoted)."""
        if self.is_keyword(*words):
            return self.next().text
        return None

    def expect(self, word: str) -> Token:
        if not self.is_keyword(word):
            raise self.error()
        return self.next()

    def string(self) -> Token:
        if not self.peek().is_string:
            raise self.error()
        return self.next()

    def punct(self, char: str) -> Token:
        if not self.peek().is_punct(char):
            raise self.error()
        return self.next()

    def end(self) -> None:
        if not self.at_end():
            raise self.error()

    def rest(self) -> tuple[str, ...]:
        """The remaining words as written (for statements kept raw)."""
        words: list[str] = []
        while not self.at_end():
            words.append(self.next().text)
        return tuple(words)


def _value_list(cur: _Cursor) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """`{ a, b }` or `{ k = v, k => v }`.

    6.8: after `{` and before `}` no newline is allowed, and separators follow parse.y's
    `comma`: one ',' (no newline after it), or newlines, or nothing. 7.x adds `optnl` after
    `{`, after each element and after a ','.
    """
    cur.punct("{")
    values: list[str] = []
    mapping: list[tuple[str, str]] = []
    while True:
        if cur.since_7:
            cur.newlines()
        key = cur.string()
        if cur.peek().is_punct("=") or cur.peek().is_punct("=>"):
            if values:
                raise cur.error()
            cur.next()
            mapping.append((key.text, cur.string().text))
        elif mapping:
            raise cur.error()
        else:
            values.append(key.text)
        if cur.since_7:
            cur.newlines()
        if cur.peek().is_punct("}"):
            cur.next()
            return tuple(values), tuple(mapping)
        if cur.peek().is_punct(","):
            cur.next()
        else:
            while cur.peek().kind == "newline" and not cur.at_end():
                cur.next()


def _operand(cur: _Cursor) -> Operand:
    """parse.y `tables`: `<name>`, `{ list }`, or one STRING (an anonymous table)."""
    token = cur.peek()
    if token.is_punct("<"):
        cur.next()
        name = cur.string()
        cur.punct(">")
        return TableRef(name.text, name.line)
    if token.is_punct("{"):
        values, mapping = _value_list(cur)
        return Literal(values or tuple(k for k, _ in mapping), token.line)
    return Literal((cur.string().text,), token.line)


def _parse_table(cur: _Cursor) -> Table:
    start = cur.expect("table")
    name = cur.string().text
    if cur.peek().is_punct("{"):
        values, mapping = _value_list(cur)
        cur.end()
        return Table(name, start.line, "static", None, values, mapping)
    spec = cur.string().text
    cur.end()
    if spec.startswith("/"):
        return Table(name, start.line, "static", spec)
    backend, sep, config = spec.partition(":")
    if sep and not config.startswith("/"):
        raise cur.error(start, f"invalid backend parameter for table: {name}")
    return Table(name, start.line, backend, config if sep else None)


# listen options and how many words follow each (tables count as one operand).
_LISTEN_WORD_ARGS: dict[str, int] = {
    "port": 1,
    "pki": 1,
    "ca": 1,
    "tag": 1,
    "hostname": 1,
}
_LISTEN_TABLE_ARGS = frozenset({"hostnames", "senders"})
_LISTEN_FLAGS = frozenset(
    {
        "inet4",
        "inet6",
        "smtps",
        "tls",
        "tls-require",
        "verify",
        "mask-src",
        "received-auth",
        "no-dsn",
        "proxy-v2",
        "masquerade",
    }
)


# 7.x: TLS settings per listener and relay action (OpenBSD 6.9), one string each.
_TLS_SETTINGS = frozenset({"ciphers", "protocols"})
# What `listen on socket` takes (parse.y opt_sock_listen); 7.5 added no-dsn.
_SOCKET_OPTIONS = frozenset({"filter", "mask-src", "tag"})


def _parse_listen(cur: _Cursor) -> Listen:
    """Lenient: options are kept as written; only table references are resolved."""
    start = cur.expect("listen")
    cur.expect("on")
    token = cur.next()
    socket = token.kind == "word" and token.text == "socket"
    if not (token.is_string or socket):  # a keyword (`any`, `local`, `tls`) is no interface
        raise cur.error(token)
    options: list[str] = []
    refs: list[TableRef] = []
    unknown: list[str] = []
    while not cur.at_end():
        word = cur.next()
        if socket and word.text not in _SOCKET_OPTIONS | ({"no-dsn"} if cur.since_7 else set()):
            raise cur.error(word)
        options.append(word.text)
        takes_table = word.text in _LISTEN_TABLE_ARGS or (
            word.text in ("auth", "auth-optional") and _starts_operand(cur.peek())
        )
        if takes_table:
            _collect_ref(_operand(cur), refs, options)
        elif word.text == "filter":
            options.extend(_filter_arg(cur))
        elif word.text in _LISTEN_WORD_ARGS or (cur.since_7 and word.text in _TLS_SETTINGS):
            options.append(cur.next().text)
        elif word.text not in _LISTEN_FLAGS and word.text not in ("auth", "auth-optional"):
            unknown.append(word.text)
    return Listen(token.text, start.line, tuple(options), tuple(refs), tuple(unknown))


def _starts_operand(token: Token) -> bool:
    return token.is_punct("<") or token.is_punct("{") or token.is_string


def _collect_ref(operand: Operand, refs: list[TableRef], options: list[str]) -> None:
    if isinstance(operand, TableRef):
        refs.append(operand)
        options.append(f"<{operand.name}>")
    else:
        options.extend(operand.values)


def _filter_arg(cur: _Cursor) -> tuple[str, ...]:
    """`filter NAME` or an inline chain `filter { a, b }`."""
    if not cur.peek().is_punct("{"):
        return (cur.string().text,)
    words: list[str] = []
    while not cur.peek().is_punct("}"):
        if cur.at_end():
            raise cur.error()
        words.append(cur.next().text)
    cur.next()
    return tuple(w for w in words if w not in (",", "\n"))


def _parse_pki(cur: _Cursor, pkis: dict[str, Pki]) -> Pki:
    start = cur.expect("pki")
    name = cur.string().text.lower()
    pki = pkis.get(name) or Pki(name, start.line)
    while not cur.at_end():
        which = cur.keyword("cert", "key", "dhe")
        if which is None:
            raise cur.error()
        value = cur.string().text
        if which == "cert":
            pki = replace(pki, cert=value)
        elif which == "key":
            pki = replace(pki, key=value)
        else:
            pki = replace(pki, dhe=value)
    pkis[name] = pki
    return pki


def _parse_ca(cur: _Cursor, cas: dict[str, Ca]) -> Ca:
    start = cur.expect("ca")
    name = cur.string().text.lower()
    cur.expect("cert")
    ca = replace(cas.get(name) or Ca(name, start.line), cert=cur.string().text)
    cur.end()
    cas[name] = ca
    return ca


def _parse_method(cur: _Cursor) -> tuple[str, str | None, tuple[str, ...]]:
    """The dispatcher type and its argument (`maildir "~/Mail" junk`, `lmtp "/sock"`...)."""
    method = cur.keyword("mbox", "maildir", "lmtp", "mda", "forward-only", "expand-only", "relay")
    if method is None:
        raise cur.error()
    arg: str | None = None
    extra: tuple[str, ...] = ()
    if method == "maildir":
        if cur.peek().is_string:
            arg = cur.next().text
        if cur.keyword("junk"):
            extra = ("junk",)
    elif method in ("lmtp", "mda"):
        arg = cur.string().text
        if method == "lmtp" and cur.keyword("rcpt-to"):
            extra = ("rcpt-to",)
    return method, arg, extra


_LOCAL_STRING_OPTIONS = frozenset({"user", "wrapper"})
_LOCAL_TABLE_OPTIONS = frozenset({"alias", "virtual", "userbase"})
_REMOTE_STRING_OPTIONS = frozenset({"helo", "pki", "ca", "mail-from"})
_REMOTE_TABLE_OPTIONS = frozenset({"helo-src", "src", "host", "domain", "auth"})


def _parse_action_option(cur: _Cursor, local: bool) -> Option:
    token = cur.peek()
    name = token.text if token.kind == "word" else ""
    strings = _LOCAL_STRING_OPTIONS if local else _REMOTE_STRING_OPTIONS
    if not local and cur.since_7:
        strings = strings | _TLS_SETTINGS
    tables = _LOCAL_TABLE_OPTIONS if local else _REMOTE_TABLE_OPTIONS
    if name in strings or name == "ttl":
        cur.next()
        return Option(name, token.line, cur.string().text)
    if name in tables:
        cur.next()
        return Option(name, token.line, _operand(cur))
    if local:
        raise cur.error()
    return _parse_remote_flag(cur, token)


def _parse_remote_flag(cur: _Cursor, token: Token) -> Option:
    """Relay options that are flags or take keywords: tls, backup, srs, filter."""
    name = cur.keyword("tls", "backup", "srs", "filter")
    if name == "tls":
        return Option(name, token.line, None, ("no-verify",) if cur.keyword("no-verify") else ())
    if name == "backup":
        if cur.keyword("mx"):
            return Option(name, token.line, cur.string().text)
        return Option(name, token.line)
    if name == "srs":
        return Option(name, token.line)
    if name == "filter":
        return Option(name, token.line, None, _filter_arg(cur))
    raise cur.error(token)


def _parse_action(cur: _Cursor) -> Action:
    start = cur.expect("action")
    name = cur.string().text
    method, arg, extra = _parse_method(cur)
    options: list[Option] = []
    while not cur.at_end():
        options.append(_parse_action_option(cur, local=method != "relay"))
    return Action(name, start.line, method, arg, extra, tuple(options))


# What may follow `from` / `for`, and whether a table operand follows.
_FROM_QUALIFIERS: dict[str, str] = {
    "socket": "none",
    "local": "none",
    "any": "none",
    "src": "table",
    "rdns": "optional",
    "auth": "optional",
    "mail-from": "table",
}
_FOR_QUALIFIERS: dict[str, str] = {
    "local": "none",
    "any": "none",
    "domain": "table",
    "rcpt-to": "table",
}
_PLAIN_CONDITIONS: dict[str, str] = {
    "tag": "table",
    "helo": "table",
    "tls": "none",
    "auth": "optional",
    "mail-from": "table",
    "rcpt-to": "table",
}


def _parse_condition(cur: _Cursor) -> Condition:
    negated = cur.peek().is_punct("!")
    if negated:
        cur.next()
    token = cur.peek()
    kind = cur.keyword("from", "for", *_PLAIN_CONDITIONS)
    if kind is None:
        raise cur.error()
    qualifier: str | None = None
    if kind in ("from", "for"):
        qualifiers = _FROM_QUALIFIERS if kind == "from" else _FOR_QUALIFIERS
        qualifier = cur.keyword(*qualifiers)
        if qualifier is None:
            raise cur.error()
        arity = qualifiers[qualifier]
    else:
        arity = _PLAIN_CONDITIONS[kind]
    regex = arity != "none" and cur.keyword("regex") is not None
    operand: Operand | None = None
    if arity == "table" or regex or (arity == "optional" and _starts_operand(cur.peek())):
        operand = _operand(cur)
    return Condition(kind, token.line, negated, qualifier, regex, operand)


def _parse_match(cur: _Cursor) -> Match:
    start = cur.expect("match")
    conditions: list[Condition] = []
    seen: set[str] = set()
    while not cur.is_keyword("action", "reject"):
        if cur.at_end():
            raise cur.error()
        condition = _parse_condition(cur)
        if condition.kind in seen:
            raise cur.error(cur.peek(), f"{condition.kind} already specified for this rule")
        seen.add(condition.kind)
        conditions.append(condition)
    if cur.keyword("reject"):
        cur.end()
        return Match(start.line, tuple(conditions), None, start.line, reject=True)
    cur.expect("action")
    name = cur.string()
    cur.end()
    return Match(start.line, tuple(conditions), name.text, name.line)


# Statement keywords of the grammar before 6.4, and 6.4+ statements kept raw.
PRE_64_KEYWORDS: frozenset[str] = frozenset(
    {
        "accept",
        "reject",
        "expire",
        "max-message-size",
        "max-mta-deferred",
        "bounce-warn",
        "ciphers",
        "limit",
        "subaddressing-delimiter",
    }
)
PRE_64_WORDS: frozenset[str] = frozenset({"certificate", "mask-source", "deliver", "via"})
_OTHER_KEYWORDS: frozenset[str] = frozenset(
    {
        "smtp",
        "queue",
        "mta",
        "mda",
        "bounce",
        "proc",
        "proc-exec",
        "filter",
        "srs",
        "admd",
        "scheduler",
    }
)


class _Builder:
    """Collects statements into the dicts and lists that become a Config."""

    def __init__(
        self,
        path: str,
        grammar: str = DEFAULT_GRAMMAR,
        errors: list[ConfigSyntaxError] | None = None,
        include: Callable[[str], str | None] | None = None,
    ) -> None:
        self.path = path
        self.grammar = grammar
        self.errors = errors
        self.include = include
        self._depth = 0
        self.tables: dict[str, Table] = {}
        self.actions: dict[str, Action] = {}
        self.pkis: dict[str, Pki] = {}
        self.cas: dict[str, Ca] = {}
        self.macros: dict[str, str] = {}
        self.statements: list[Statement] = []

    def add(self, tokens: list[Token]) -> None:
        cur = _Cursor(tokens, self.path, self.grammar)
        if cur.at_end():
            return
        first = cur.peek()
        if first.kind == "word" and cur.peek(1).is_punct("="):
            self._macro(cur)
            return
        try:
            statement = self._statement(cur, first)
        except ConfigSyntaxError as exc:
            if any(t.kind == "word" and t.text in PRE_64_WORDS for t in tokens):
                statement = RawStatement("pre-6.4", first.text, first.line, _Cursor(tokens, "").rest())
            elif self.errors is not None:
                prefix = self._reduced_prefix(tokens, cur.index) if exc.message == "syntax error" else None
                if prefix is None:
                    self.errors.append(exc)  # smtpd's `grammar error '\n'`: skip the statement, go on
                    return
                statement = prefix
                self.errors.append(TrailingSyntaxError(exc.path, exc.line, exc.message, statement))
            else:
                raise
        self.statements.append(statement)
        if isinstance(statement, Include):
            self._follow(statement)

    def feed(self, text: str, path: str) -> None:
        _feed(self, text, path)

    def _follow(self, include: Include) -> None:
        """The included file's statements, read with its own name (smtpd's errors say FILE:LINE)."""
        text = self.include(include.path) if self.include is not None else None
        if text is None or self._depth >= MAX_INCLUDE_DEPTH:
            return
        outer, self.path = self.path, include.path
        self._depth += 1
        try:
            self.feed(text, include.path)
        finally:
            self._depth -= 1
            self.path = outer

    def _reduced_prefix(self, tokens: list[Token], index: int) -> Statement | None:
        """The statement yacc had reduced when it met tokens[index], if any (TrailingSyntaxError)."""
        if not 0 < index < len(tokens):
            return None
        head = tokens[:index]
        newline = Token("newline", "\n", tokens[index].line)
        candidates = [head]
        if len(head) >= 3 and head[0].text == "table" and head[2].is_punct("{"):
            values = head[:-1] if head[-1].is_punct(",") else head
            candidates = [[*values, Token("punct", "}", tokens[index].line)]]
        for candidate in candidates:
            cur = _Cursor([*candidate, newline], self.path, self.grammar)
            try:
                return self._statement(cur, candidate[0])
            except ConfigSyntaxError:
                continue
        return None

    def _macro(self, cur: _Cursor) -> None:
        name = cur.string()
        cur.punct("=")
        value = cur.string()
        cur.end()
        self.macros[name.text] = value.text

    def _statement(self, cur: _Cursor, first: Token) -> Statement:
        keyword = first.text if first.kind == "word" else ""
        if keyword == "table":
            table = _parse_table(cur)
            self.tables.setdefault(table.name, table)
            return table
        if keyword == "action":
            action = _parse_action(cur)
            self.actions.setdefault(action.name, action)
            return action
        if keyword == "match":
            return _parse_match(cur)
        if keyword == "listen":
            return _parse_listen(cur)
        if keyword == "pki":
            return _parse_pki(cur, self.pkis)
        if keyword == "ca":
            return _parse_ca(cur, self.cas)
        if keyword == "include":
            cur.next()
            include = Include(cur.string().text, first.line)
            cur.end()
            return include
        kind: RawKind = "unknown"
        if keyword in PRE_64_KEYWORDS:
            kind = "pre-6.4"
        elif keyword in _OTHER_KEYWORDS:
            kind = "other"
        return RawStatement(kind, first.text, first.line, cur.rest())

    def build(self) -> Config:
        statements = tuple(self.statements)
        return Config(
            path=self.path,
            tables=dict(self.tables),
            listens=tuple(s for s in statements if isinstance(s, Listen)),
            actions=dict(self.actions),
            matches=tuple(s for s in statements if isinstance(s, Match)),
            pkis=dict(self.pkis),
            cas=dict(self.cas),
            includes=tuple(s for s in statements if isinstance(s, Include)),
            raw=tuple(s for s in statements if isinstance(s, RawStatement)),
            statements=statements,
            macros=dict(self.macros),
        )


def parse_config(
    text: str,
    path: str = "smtpd.conf",
    grammar: str = DEFAULT_GRAMMAR,
    errors: list[ConfigSyntaxError] | None = None,
    include: Callable[[str], str | None] | None = None,
) -> Config:
    """Parse smtpd.conf text; raise ConfigSyntaxError where smtpd's grammar (GRAMMARS) would.

    `include` gives the text of a file an `include "FILE"` line names (None: not known here):
    its statements count where the line stands, as smtpd's own parser reads them, so its tables
    and actions are the config's (with lines of that file, errors naming it).

    References (undefined actions and tables) are not errors here: they are
    the linter's job, so one run can report all of them. With `errors`, a
    statement smtpd's grammar refuses is recorded there and skipped, and parsing
    goes on as smtpd's does (a lexer error, such as an unterminated quote, ends it).
    """
    if grammar not in GRAMMARS:
        raise ValueError(f"grammar {grammar!r}: one of {', '.join(GRAMMARS)}")
    builder = _Builder(path, grammar, errors, include)
    builder.feed(text, path)
    return builder.build()


# smtpd's pushfile() has no limit; a file including itself would recurse forever here
MAX_INCLUDE_DEPTH = 8


def _feed(builder: _Builder, text: str, path: str) -> None:
    """Every statement of one file (the config, or a file it includes) into `builder`."""
    lexer = _Lexer(text, path, builder.macros)
    errors = builder.errors
    while True:
        try:
            tokens = lexer.statement()
        except ConfigSyntaxError as exc:
            if errors is None:
                raise
            errors.append(exc)
            if not exc.message.startswith("macro "):
                break
            # yylex(): findeol() and an error token, which the grammar reports in its own words;
            # its recovery (`grammar error '\n'`) then drops everything up to the next newline
            # token: the line after the macro's goes too.
            errors.append(ConfigSyntaxError(path, exc.line, "syntax error"))
            lexer.skip_line()
            with contextlib.suppress(ConfigSyntaxError):
                lexer.statement()
            continue
        if tokens is None:
            break
        builder.add(tokens)


def newer_grammar_line(
    text: str, path: str = "smtpd.conf", include: Callable[[str], str | None] | None = None
) -> int | None:
    """The first line smtpd 6.8's grammar refuses in a config OpenSMTPD 7.x's accepts (`protocols`,
    `ciphers` on a relay; None: no such line): a 6.8 target's `syntax error` there is 7.x grammar."""
    try:
        parse_config(text, path, DEFAULT_GRAMMAR, include=include)
    except ConfigSyntaxError as old:
        try:
            parse_config(text, path, WIDEST_GRAMMAR, include=include)
        except ConfigSyntaxError:
            return None
        return old.line
    return None


def parse_file(path: str | os.PathLike[str]) -> Config:
    """Read and parse a file; errors name the file as given, like `smtpd -f`."""
    # newline="": smtpd sees a CR as a stray character (CRLF files are a syntax error).
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        return parse_config(handle.read(), os.fspath(path))
