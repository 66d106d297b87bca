#!/usr/bin/env bash
# Installs everything relay-harness needs on a fresh Debian (bookworm) machine, as root.
# Idempotent: safe to run again. Creates ./.venv with the harness installed (editable).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "ci/setup.sh: run as root (apt-get, network namespaces): sudo $0" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# Installing opensmtpd starts the system smtpd unless policy-rc.d says no; the harness runs its
# own smtpd instances in test hosts and wants the machine's port 25 left alone.
made_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
cleanup() { if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

# Installed with --no-install-recommends, so everything the tests and the README use is named here,
# Recommends included (CI runs in a freshly bootstrapped minbase root: .ci/run, ci/fresh-root.sh):
#   opensmtpd           the real smtpd, smtpctl, makemap, newaliases, sendmail
#   opensmtpd-extras    the table backends Debian ships apart (sqlite:, postgres:, ...): check uses them
#   openssh-server      sshd in every test host (its Depends bring openssh-sftp-server and procps)
#   iproute2 util-linux ip netns/veths; unshare, nsenter, mount, su (test hosts, accept's sandbox)
#   swaks               the README's client and tests/test_upstream_cli.py; swaks --tls needs
#   libnet-ssleay-perl  Net::SSLeay, only a Recommends of swaks
#   ca-certificates     the registries' CAs for pip (and the machine's local ones, rebuilt in)
#   python3-venv        the .venv below (Debian's python3)
#   debootstrap         Debian roots of other releases (e.g. trixie's OpenSMTPD 7.6), built in the lab
packages=(opensmtpd opensmtpd-extras openssh-server iproute2 util-linux swaks libnet-ssleay-perl ca-certificates
    python3-venv debootstrap)
need=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
echo "ci/setup.sh: ready (OpenSMTPD $(dpkg-query -W -f='${Version}' opensmtpd), venv .venv)"
