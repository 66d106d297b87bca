"""smtpd.conf as data: parse it, read its relay URLs, lint it, and say what it must do.

from harness.smtpdconf import parse_file, lint, expectations
"""

from harness.smtpdconf.expect import RelayExpectation, expectations, relay_urls, rewrite_sender
from harness.smtpdconf.lint import Finding, covers, lint, lint_text
from harness.smtpdconf.parse import (
    KEYWORDS,
    Action,
    Ca,
    Condition,
    Config,
    ConfigSyntaxError,
    Include,
    Listen,
    Literal,
    Match,
    Operand,
    Option,
    Pki,
    RawStatement,
    Statement,
    Table,
    TableRef,
    parse_config,
    parse_file,
)
from harness.smtpdconf.relayurl import SCHEMES, RelayUrl, RelayUrlError, TlsMode, parse_relay_url

__all__ = [
    "KEYWORDS",
    "SCHEMES",
    "Action",
    "Ca",
    "Condition",
    "Config",
    "ConfigSyntaxError",
    "Finding",
    "Include",
    "Listen",
    "Literal",
    "Match",
    "Operand",
    "Option",
    "Pki",
    "RawStatement",
    "RelayExpectation",
    "RelayUrl",
    "RelayUrlError",
    "Statement",
    "Table",
    "TableRef",
    "TlsMode",
    "covers",
    "expectations",
    "lint",
    "lint_text",
    "parse_config",
    "parse_file",
    "parse_relay_url",
    "relay_urls",
    "rewrite_sender",
]
