#!/usr/bin/env bash
# Runs shell commands in a freshly bootstrapped Debian bookworm root, as a fresh machine here would:
#   bash ci/fresh-root.sh 'bash ci/quickstart.sh' 'bash ci/test.sh'
# Why: a package that only the developer's machine has (swaks' TLS needed Net::SSLeay, a dropped
# Recommends) must fail CI, so CI cannot run on this machine's own root.
#
# - The root is `debootstrap --variant=minbase` from the mirror apt uses here, a plain directory
#   under /var/tmp (not an overlay: the lab and accept's sandbox stack overlays of their own and the
#   kernel allows only two levels; not /tmp: the lab uses it).
# - It is entered with pivot_root as the root of private mount, PID, UTS and IPC namespaces (a plain
#   chroot is not enough: accept's sandbox enters namespaces with nsenter/unshare and would then see
#   the machine's real root). The network namespace is the machine's, as on a fresh machine: the
#   registries are reached as here, and the lab's test hosts get their own namespaces inside.
# - It gets what reaches the registries here, read from this machine's config at run time: apt's
#   sources and settings, the CA bundle and local CAs, pip's config files with the local wheel
#   and index folders they name (bind-mounted read-only), and the PIP_*/CA/proxy variables.
# - The repository's files (tracked and untracked, not ignored) are copied to /srv/relay-harness;
#   each command runs there as root with CI=true; the first failing one ends the run with its code.
# - Everything is removed at the end, also on failure or SIGTERM: the namespaces' processes are
#   killed with them, their mounts and the network namespaces made inside go with them, the root
#   is deleted. A root left by a killed run (its owner.lock free) is removed by the next run.
set -euo pipefail

DEBOOTSTRAP_TIMEOUT=900 # seconds; a bootstrap from a reachable mirror takes one to three minutes
RUN_TIMEOUT=3600        # seconds for all the commands together (CI's own limit is 90 minutes)
SUITE=bookworm
PREFIX=/var/tmp/relay-harness-ci-
INNER_REPO=/srv/relay-harness
INNER_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf 'fresh-root: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 2
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# Inside: PID 1 of the new namespaces, still seeing the machine's root. Mount, pivot, run.
# ---------------------------------------------------------------------------------------------

# /dev as a container gets it: a tmpfs with the basic nodes bound from the machine's /dev, its own
# devpts and shm. (Mounting devtmpfs would share the machine's instance: symlinks made there, such
# as /dev/fd, would appear on the machine too.)
mount_dev() {
    local dev=$1 node
    mount -t tmpfs -o mode=0755,nosuid rh-ci-dev "$dev"
    for node in null zero full random urandom tty; do
        touch "$dev/$node"
        mount --bind "/dev/$node" "$dev/$node"
    done
    mkdir -m 0755 "$dev/pts" "$dev/net"
    mkdir -m 1777 "$dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5,nosuid,noexec rh-ci-pts "$dev/pts"
    ln -s pts/ptmx "$dev/ptmx"
    mount -t tmpfs -o mode=1777,nosuid,nodev rh-ci-shm "$dev/shm"
    ln -s /proc/self/fd "$dev/fd"
    ln -s /proc/self/fd/0 "$dev/stdin"
    ln -s /proc/self/fd/1 "$dev/stdout"
    ln -s /proc/self/fd/2 "$dev/stderr"
    if [ -c /dev/net/tun ]; then
        touch "$dev/net/tun"
        mount --bind /dev/net/tun "$dev/net/tun"
    fi
}

inside() {
    local root=$1 binds=$2 envfile=$3 lock=$4
    shift 4
    mount --make-rprivate /
    mount --bind "$root" "$root"
    mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
    mount -t sysfs -o nosuid,nodev,noexec sysfs "$root/sys" 2>/dev/null || mount --rbind /sys "$root/sys"
    mount_dev "$root/dev"
    mount -t tmpfs -o mode=0755,nosuid,nodev rh-ci-run "$root/run"
    mkdir -m 1777 "$root/run/lock"
    # Test hosts' addresses live in the machine's network namespace: choose them under the same
    # lock as labs outside this root do, or two hosts could take one address.
    if [ -n "$lock" ]; then
        touch "$root$lock"
        mount --bind "$lock" "$root$lock"
    fi
    local dir
    while IFS= read -r dir; do
        [ -n "$dir" ] || continue
        mkdir -p "$root$dir"
        mount --bind "$dir" "$root$dir"
        mount -o remount,bind,ro "$root$dir"
    done <"$binds"
    local -a env=()
    mapfile -t env <"$envfile"
    cd "$root"
    mkdir -p .old-root
    pivot_root . .old-root
    cd /
    umount -l /.old-root
    rmdir /.old-root
    # shellcheck disable=SC2016 # the script below is expanded by the inner bash
    exec /usr/bin/env -i "${env[@]}" /bin/bash -c '
        set -u
        cd "$1" || exit 2
        shift
        for step in "$@"; do
            printf "fresh-root: ==> %s\n" "$step" >&2
            start=$(date +%s.%N)
            bash -c "$step"
            rc=$?
            took=$(awk -v a="$start" -v b="$(date +%s.%N)" "BEGIN { printf \"%.1f\", b - a }")
            printf "fresh-root: <== %s: exit %d after %ss\n" "$step" "$rc" "$took" >&2
            [ "$rc" -eq 0 ] || exit "$rc"
        done
    ' fresh-root "$INNER_REPO" "$@"
}

if [ "${1:-}" = "--inside" ]; then
    shift
    inside "$@"
    exit $?
fi

# ---------------------------------------------------------------------------------------------
# Outside: prerequisites, bootstrap, what reaches the registries, the repository; then enter.
# ---------------------------------------------------------------------------------------------

[ "$#" -gt 0 ] || die "usage: $0 'COMMAND' ['COMMAND' ...]  (each run in the fresh root, in order)"
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, namespaces, mounts): sudo bash $0 ..."
repo=$(cd "$(dirname "$0")/.." && pwd)
self="$repo/ci/fresh-root.sh"

# The deb822 or one-line source apt uses for SUITE: "URI KEYRING" (KEYRING may be empty).
apt_source() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && enabled != "no" && uri != "")
                    { print uri, key; found = 1; exit }
                types = suites = uri = key = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            { field = tolower($1); sub(/:$/, "", field); $1 = ""; sub(/^ +/, "") }
            field == "types" { types = $0 }
            field == "suites" { suites = $0 }
            field == "uris" { split($0, u, " "); uri = u[1] }
            field == "signed-by" { key = $0 }
            field == "enabled" { enabled = tolower($0) }
            END { if (!found) flush() }
        ' "$f"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$SUITE" '
        $1 != "deb" { next }
        { key = ""; i = 2 }
        $2 ~ /^\[/ {
            while (i <= NF) { if ($i ~ /^\[?signed-by=/) { key = $i; sub(/^\[?signed-by=/, "", key); sub(/\]$/, "", key) }
                              if ($i ~ /\]$/) { i++; break } ; i++ }
        }
        $(i + 1) == suite { print $i, key }
    '
}

# pip's config files (global, XDG, user, PIP_CONFIG_FILE), in pip's own search order.
pip_configs() {
    local d
    echo /etc/pip.conf
    local IFS=:
    for d in ${XDG_CONFIG_DIRS:-/etc/xdg}; do echo "$d/pip/pip.conf"; done
    echo "$HOME/.pip/pip.conf"
    echo "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf"
    [ -z "${PIP_CONFIG_FILE:-}" ] || echo "$PIP_CONFIG_FILE"
}

# "KIND PATH" for every local path pip's settings name (files and environment): KIND is index
# (an index folder), links (a find-links folder) or file (cert, constraint, requirement).
pip_paths() {
    local f
    while IFS= read -r f; do
        [ -f "$f" ] || continue
        awk '
            /^[ \t]*[#;]/ { next }
            /^\[/ { key = ""; next }
            /^[ \t]+[^ \t]/ && key != "" { print key, $0; next }
            /=/ { key = $0; sub(/[ \t]*=.*/, "", key); val = $0; sub(/^[^=]*=[ \t]*/, "", val); print key, val }
        ' "$f"
    done < <(pip_configs)
    local name key
    for name in $(compgen -e | grep '^PIP_' || true); do
        key=$(printf '%s' "${name#PIP_}" | tr 'A-Z_' 'a-z-')
        printf '%s %s\n' "$key" "${!name}"
    done
}
local_pip_paths() {
    local key rest token path
    pip_paths | while read -r key rest; do
        case "$key" in
            index-url | extra-index-url) kind=index ;;
            find-links) kind=links ;;
            cert | client-cert | constraint | requirement | build-constraint) kind="file" ;;
            *) continue ;;
        esac
        for token in $rest; do
            path=${token#file://}
            case "$path" in /*) ;; *) continue ;; esac
            [ -e "$path" ] && printf '%s %s\n' "$kind" "$path"
        done
    done
}

# The variables that carry registry access here: pip's, CA bundles, proxies.
registry_env_names() {
    compgen -e | grep -E '^(PIP_[A-Z0-9_]+|[A-Za-z0-9_]*(CA_|_CA|CERT|SSL)[A-Za-z0-9_]*|(http|https|ftp|all|no)_proxy|(HTTP|HTTPS|FTP|ALL|NO)_PROXY)$' || true
}

copy_into_root() { # copy_into_root PATH: the machine's file at the same path in the root
    mkdir -p "$root$(dirname "$1")"
    cp -a "$1" "$root$1"
}

work=""
child=""
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        say "stopping the fresh root's processes"
        kill -KILL "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    if [ -n "$work" ] && [ -d "$work" ]; then
        remove_root "$work"
    fi
    exit "$rc"
}
# A root is removed only once nothing is mounted below it (mounts are made in private namespaces,
# so normally nothing is; a leftover would otherwise be deleted through).
remove_root() {
    local dir=$1 target
    while read -r target; do
        case "$target" in "$dir" | "$dir"/*) umount -l "$target" 2>/dev/null || true ;; esac
    done < <(findmnt -rn -o TARGET | sort -r)
    if findmnt -rn -o TARGET | grep -q "^$dir\(/\|$\)"; then
        say "not removing $dir: still mounted below it"
        return 1
    fi
    rm -rf --one-file-system "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Runs "$@" (an unshare --kill-child) in the background and waits, so a signal reaches the traps
# at once. Killing that unshare kills its child, the namespace's PID 1, and with it every process
# in the namespace (unshare itself ignores SIGTERM while it waits); setpriv's parent-death signal
# kills it too if this script is killed outright (SIGKILL runs no trap).
# With --log FILE, its output goes there (not the function's: the traps' messages must not).
run_child() {
    if [ "$1" = --log ]; then
        local log=$2
        shift 2
        setpriv --pdeathsig KILL "$@" >"$log" 2>&1 &
    else
        setpriv --pdeathsig KILL "$@" &
    fi
    child=$!
    local rc=0
    wait "$child" || rc=$?
    child=""
    return "$rc"
}

total_start=$(now)
for stale in "$PREFIX"*; do
    [ -d "$stale" ] || continue
    pid=${stale#"$PREFIX"}
    case "$pid" in '' | *[!0-9]*) continue ;; esac
    # Its run holds owner.lock for as long as any of its processes lives (a pid alone may be
    # reused within seconds here: pid_max 32768 and a test suite's churn). No lock: the pid decides.
    if [ -e "$stale/owner.lock" ]; then
        flock -n "$stale/owner.lock" true || continue
    elif kill -0 "$pid" 2>/dev/null; then
        continue
    fi
    say "removing $stale (left by pid $pid, which is gone)"
    remove_root "$stale" || true
done

if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap on this machine"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends debootstrap >/dev/null
fi
for tool in unshare pivot_root setpriv findmnt timeout flock; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install util-linux coreutils"
done

read -r mirror keyring < <(apt_source) || true
[ -n "${mirror:-}" ] || die "no apt source for $SUITE in /etc/apt/sources.list{,.d}: cannot choose a mirror"

fstype=$(findmnt -n -o FSTYPE --target "$(dirname "$PREFIX")")
case "$fstype" in overlay | aufs | fuse.*)
    die "$(dirname "$PREFIX") is on $fstype: the root must be on a real filesystem (the lab stacks overlays on it)" ;;
esac

work="$PREFIX$$"
root="$work/root"
mkdir -m 0700 "$work"
exec {owner_lock}>"$work/owner.lock" # inherited by every process of the run: held until all are gone
flock -s "$owner_lock"
mkdir "$root"
say "bootstrapping $SUITE (minbase) from $mirror into $root (at most ${DEBOOTSTRAP_TIMEOUT}s)"
start=$(now)
# In its own mount and PID namespaces: the proc/sys debootstrap mounts in the root, and every
# process it starts, go with it even when the time bound kills it.
rc=0
run_child --log "$work/debootstrap.log" unshare --mount --pid --fork --kill-child --propagation private \
    timeout --kill-after=10 "$DEBOOTSTRAP_TIMEOUT" \
    debootstrap --variant=minbase ${keyring:+--keyring="$keyring"} "$SUITE" "$root" "$mirror" || rc=$?
if [ "$rc" -ne 0 ]; then
    tail -n 30 "$work/debootstrap.log" >&2
    [ "$rc" -ne 124 ] || die "debootstrap did not finish in ${DEBOOTSTRAP_TIMEOUT}s"
    die "debootstrap failed (exit $rc); its log's end is above"
fi
debootstrap_s=$(since "$start")
say "debootstrap: ${debootstrap_s}s"

# apt as configured here: sources, settings, the keyrings the sources are signed by.
rm -f "$root/etc/apt/sources.list"
for path in /etc/apt/sources.list /etc/apt/sources.list.d /etc/apt/apt.conf.d /etc/apt/preferences.d \
    /etc/apt/trusted.gpg /etc/apt/trusted.gpg.d; do
    [ -e "$path" ] || continue
    if [ -d "$path" ]; then
        mkdir -p "$root$path"
        cp -a "$path/." "$root$path/"
    else
        copy_into_root "$path"
    fi
done
while read -r key; do
    [ -f "$key" ] && [ ! -e "$root$key" ] && copy_into_root "$key"
done < <(grep -rhoiE '(signed-by[:=][ ]*)/[^] ]+' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null |
    sed -E 's/^[^/]*//' | sort -u)
# Name resolution and the certificate authorities as here (the local CAs are also picked up when
# setup installs ca-certificates, which rebuilds the bundle).
for path in /etc/resolv.conf /etc/hosts /etc/ssl/certs/ca-certificates.crt; do
    [ -f "$path" ] && copy_into_root "$path"
done
if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
# pip as here: its config files, and the local paths they (or PIP_*) name.
while IFS= read -r path; do
    [ -f "$path" ] && copy_into_root "$path"
done < <(pip_configs)
: >"$work/binds"
while read -r kind path; do
    if [ -f "$path" ]; then
        [ -e "$root$path" ] || copy_into_root "$path"
    elif [ "$kind" = index ]; then
        # A PEP 503 index folder's pages link to files beside it (../../files/...): bind its parent.
        dirname "$path" >>"$work/binds"
    else
        echo "$path" >>"$work/binds"
    fi
done < <(local_pip_paths)
sort -u -o "$work/binds" "$work/binds"
# The environment: a clean one, as root, with CI=true, plus the registry variables and the files
# they name (the CA bundle, mostly).
{
    echo "PATH=$INNER_PATH"
    echo "HOME=/root"
    echo "USER=root"
    echo "LOGNAME=root"
    echo "LANG=C.UTF-8"
    echo "TERM=${TERM:-dumb}"
    echo "CI=true"
    for name in $(registry_env_names); do
        value=${!name}
        printf '%s=%s\n' "$name" "$value"
        if [ -f "$value" ] && [ ! -e "$root$value" ]; then copy_into_root "$value"; fi
    done
} >"$work/env"
say "registry access: $(wc -l <"$work/binds") folder(s) bound read-only, $(registry_env_names | wc -l) variable(s)"

# The repository as a checkout has it: tracked and untracked files, not what .gitignore ignores
# (a developer's .venv or caches would hide a missing install step).
mkdir -p "$root$INNER_REPO"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z -co --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$repo/$f" ] && printf '%s\0' "$f"; done |
        tar -C "$repo" --null -T - -cf - | tar -C "$root$INNER_REPO" -xf -
else
    tar -C "$repo" --exclude=./.venv -cf - . | tar -C "$root$INNER_REPO" -xf -
fi

lock=""
if [ -d /run ]; then
    lock=/run/relay-harness.lock
    [ -e "$lock" ] || : >"$lock"
fi

say "entering the fresh root (pivot_root; private mount, PID, UTS, IPC namespaces)"
start=$(now)
rc=0
run_child unshare --mount --pid --uts --ipc --fork --kill-child --propagation private \
    timeout --kill-after=10 "$RUN_TIMEOUT" bash "$self" --inside "$root" "$work/binds" "$work/env" "$lock" "$@" || rc=$?
[ "$rc" -ne 124 ] || say "the commands did not finish in ${RUN_TIMEOUT}s"
say "commands: $(since "$start")s, exit $rc"
say "total: $(since "$total_start")s (debootstrap ${debootstrap_s}s)"
exit "$rc"
