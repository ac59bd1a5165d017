#!/usr/bin/env bash
# Upgrade check, by hand (not part of `make test`: two deployments, ~5 min on an idle machine):
# deploy the lab gateway with the relay role of an older commit, then with this checkout's, on
# the same containers; the second deployment must succeed, a third must change nothing, and mail
# from a login must arrive at the MX with both DKIM signatures.
#
#   scripts/check-upgrade.sh OLD_COMMIT     e.g. 6ce1454 (main before rspamd replaced fromcheck)
#
# It runs in a lab of its own (smtpgw-upgrade, 10.89.77.0/24) and removes it at the end; the old
# commit is checked out in a temporary worktree. Prints what the old deployment ran and what is
# left of it after the new one (its milter units, files and users), so a retirement shows.
set -euo pipefail
old=${1:?usage: scripts/check-upgrade.sh OLD_COMMIT}
root=$(cd "$(dirname "$0")/.." && pwd)
export SMTPGW_LAB_NAME=smtpgw-upgrade SMTPGW_LAB_SUBNET=10.89.77.0/24
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
work=$(mktemp -d /tmp/smtpgw-upgrade.XXXXXX)
cleanup() {
    (cd "$root" && smtpgw lab down >/dev/null) || true
    git -C "$root" worktree remove --force "$work/old" 2>/dev/null || true
    rm -rf "$work" "$root/.lab/$SMTPGW_LAB_NAME"
}
trap cleanup EXIT
git -C "$root" worktree add -q --detach "$work/old" "$old"
mkdir -p "$work/inventory"
ln -s "$root/inventories/lab/group_vars" "$work/inventory/group_vars"
ln -s "$root/inventories/lab/tenants" "$work/inventory/tenants"
(cd "$root" && smtpgw lab up >/dev/null)
cp "$root/.lab/$SMTPGW_LAB_NAME/hosts.yml" "$work/inventory/hosts.yml"
relay=$(cd "$root" && python3 -c 'from smtpgw import lab; print(lab.Lab.from_env().ip("relay1"))')
container=$SMTPGW_LAB_NAME-relay1

deploy() {  # TREE PLAYBOOK LOG: a playbook of that checkout, as the collection it is
    local tree=$1 playbook=$2 log=$3
    mkdir -p "$tree/.lab/collections/ansible_collections/smtpgw"
    ln -sfn ../../../.. "$tree/.lab/collections/ansible_collections/smtpgw/gateway"
    if ! (cd "$tree" && SMTPGW_ROOT=$tree ANSIBLE_CONFIG=$tree/ansible.cfg ansible-playbook \
        -i "$work/inventory/hosts.yml" -e "lab_pki_dir=$work/pki" "playbooks/$playbook" \
        >"$log" 2>&1); then
        tail -30 "$log"
        echo "FAILED: $playbook of $tree (whole log: $log)" >&2
        exit 1
    fi
    grep -A3 "PLAY RECAP" "$log" | grep relay1 || true
}
services() {
    podman exec "$container" sh -c \
        "systemctl list-units --type=service --state=running --no-legend | awk '{print \$1}' \
         | grep -E 'smtpgw|rspamd|postfix|dovecot' | tr '\n' ' '; echo; postconf -P | grep milters"
}

echo "== $old: lab.yml and site.yml"
deploy "$work/old" lab.yml "$work/old-lab.log" >/dev/null
deploy "$work/old" site.yml "$work/old-site.log"
services
echo "== $(git -C "$root" rev-parse --short HEAD) (this checkout): site.yml twice"
deploy "$root" site.yml "$work/new-site.log"
services
second=$(deploy "$root" site.yml "$work/new-site2.log")
echo "$second"
[[ $second == *"changed=0 "* ]] || { echo "FAILED: the second run changed something" >&2; exit 1; }
echo "== mail from a login on 587"
out=$(cd "$root" && SMTPGW_PASSWORD=lab-acme-scanner-pw smtpgw send --server "$relay" \
    --server-name relay1.lab.test --ca "$work/pki/ca.crt" --login scanner@acme.test \
    --from scanner@acme.test --to alice@dest.test --expect-on mx1)
grep -E "^accepted|^DKIM-Signature" <<<"$out"
[[ $(grep -c "^DKIM-Signature" <<<"$out") == 2 ]] || { echo "FAILED: not signed twice" >&2; exit 1; }
echo "upgrade from $old: ok"
