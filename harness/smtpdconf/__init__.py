"""smtpd.conf as data: parse it, read its relay URLs, lint it, and say what it must do.

from harness.smtpdconf import parse_file, lint, expectations
"""

from harness.smtpdconf.expect import RelayExpectation, expectations, relay_urls, rewrite_sender
from harness.smtpdconf.lint import Finding, covers, lint, lint_text
from harness.smtpdconf.listens import ListenNeeds, listen_needs
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
from harness.smtpdconf.tables import (
    alias_tables,
    auth_tables,
    db_source,
    expand,
    is_local_user,
    local_users,
    parse_aliases,
)

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
    "ListenNeeds",
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
    "alias_tables",
    "auth_tables",
    "covers",
    "db_source",
    "expand",
    "expectations",
    "is_local_user",
    "lint",
    "lint_text",
    "listen_needs",
    "local_users",
    "parse_aliases",
    "parse_config",
    "parse_file",
    "parse_relay_url",
    "relay_urls",
    "rewrite_sender",
]
