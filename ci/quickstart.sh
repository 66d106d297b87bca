#!/usr/bin/env bash
# README step 1: install everything (apt packages, ./.venv), then the main job: check the bundled
# example smtpd.conf in a real OpenSMTPD on a lab test host against the example provider.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/relay-harness lab clean >/dev/null
exec .venv/bin/relay-harness check ci/examples/smtpd.conf \
    --upstream ci/examples/provider.toml \
    --table aliases=ci/examples/aliases \
    --junit report-junit.xml --report-json report.json
