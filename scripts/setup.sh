#!/usr/bin/env bash
# One-command set-up of a fresh Debian 12 machine for smtpgw (run as root, from any directory):
#   Debian packages, the virtual environment, a project-local containers.conf, the lab image.
# Safe to run again: each step checks first and does only what is missing (a second run takes seconds).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
state="$root/.lab"
# testssl.sh: the gateway scenario's TLS policy test runs it against 587 and 465.
apt_packages=(podman runc debootstrap uidmap slirp4netns containernetworking-plugins
    python3 python3-venv python3-dev make git openssl ca-certificates iproute2 testssl.sh)

step() { printf '\n== %s\n' "$*"; }
fail() {
    printf '\nsmtpgw setup failed: %s\n' "$1" >&2
    [ $# -lt 2 ] || printf 'what to do: %s\n' "$2" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] ||
    fail "it must run as root (it installs Debian packages and runs podman containers with systemd)" \
        "run it again as root: sudo make setup"
[ -r /etc/debian_version ] ||
    fail "this is not a Debian machine" "smtpgw's lab is built and tested on Debian 12 (bookworm)"

step "Debian packages"
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null ||
        fail "apt-get update failed" "check /etc/apt/sources.list* and that the Debian mirror is reachable"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        fail "apt-get install ${missing[*]} failed" "run it by hand to see apt's message"
else
    echo "all present"
fi

step "Python virtual environment ($venv)"
python=${SMTPGW_PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "$python is older than 3.11" "install Python 3.11 or set SMTPGW_PYTHON=/path/to/python3.11"
stamp="$venv/.smtpgw-installed"
want=$(sha256sum "$root/pyproject.toml" | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "up to date"
else
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" ||
        fail "could not create the virtual environment" "install python3-venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q -e "$root[dev]" ||
        fail "pip could not install the project and its tools" "run: $venv/bin/pip install -e '$root[dev]'"
    echo "$want" >"$stamp"
    echo "installed"
fi

step "Podman configuration ($state/containers.conf)"
mkdir -p "$state"
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu)
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
cat >"$state/containers.conf.new" <<EOF
# Written by scripts/setup.sh; used through CONTAINERS_CONF. runc, because crun fails on hybrid
# cgroups; ulimits no higher than this machine's hard limits, or containers do not start.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
mv "$state/containers.conf.new" "$state/containers.conf"
export CONTAINERS_CONF="$state/containers.conf"
timeout 60 podman info >/dev/null 2>"$state/podman-info.err" ||
    fail "podman cannot start: $(tail -n 3 "$state/podman-info.err")" \
        "check 'podman info'; if a killed run left locks behind, 'podman system renumber' clears them"

# Every lab container runs systemd, which takes inotify instances of the user's (root's): with
# Debian's 128, the containers of two scenarios side by side can fail to boot ("Failed to create
# inotify object: Too many open files"). Raise it, never lower it, and keep it across reboots.
inotify=$(sysctl -n fs.inotify.max_user_instances)
if [ "$inotify" -lt 1024 ]; then
    echo 'fs.inotify.max_user_instances = 1024' >/etc/sysctl.d/60-smtpgw-lab.conf
    sysctl -q -w fs.inotify.max_user_instances=1024 ||
        fail "cannot raise fs.inotify.max_user_instances ($inotify)" "run set-up as root"
    echo "fs.inotify.max_user_instances: $inotify -> 1024"
fi

step "The checkout as the collection smtpgw.gateway ($state/collections)"
# ansible.cfg's collections_path; a relative link, so a moved checkout keeps working.
mkdir -p "$state/collections/ansible_collections/smtpgw"
ln -sfn ../../../.. "$state/collections/ansible_collections/smtpgw/gateway"
echo "linked"

step "Lab image"
"$root/lab/image/build.sh" || exit 1

step "Done"
echo "activate with: source $root/scripts/env.sh   (or use the make targets)"
