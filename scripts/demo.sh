#!/usr/bin/env bash
# The main job, on the local lab: start the lab hosts, deploy the gateway with the example tenants,
# send mail through it (a login on 587, a login on 465 routed via the smart host, a device on the
# tenant's network on 25) and show each message arrive at the recipients' MX.
#
# The lab is the user's (`smtpgw-lab`, inventory inventories/lab) unless SMTPGW_LAB_NAME and
# SMTPGW_LAB_SUBNET name another: `make test` runs this script in a lab of its own that way. Another
# lab's inventory is .lab/NAME/ (the hosts.yml `smtpgw lab up` writes, the lab inventory's
# group_vars and tenants linked, its own CA and DKIM keys), so it never touches the user's lab.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export SMTPGW_ROOT="$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh

step() { printf '\n== %s\n' "$*"; }

lab_name=${SMTPGW_LAB_NAME:-smtpgw-lab}
playbook_args=()
inventory=inventories/lab
pki=.lab/pki
if [[ $lab_name != smtpgw-lab ]]; then
    inventory=.lab/$lab_name
    mkdir -p "$inventory"
    ln -sfn ../../inventories/lab/group_vars "$inventory/group_vars"
    ln -sfn ../../inventories/lab/tenants "$inventory/tenants"
    pki=$inventory/pki
    playbook_args=(-i "$inventory/hosts.yml" -e "lab_pki_dir=$root/$pki")
fi

step "Lab hosts: one relay with the DNS server, the MX and the smart host around it"
# (`smtpgw lab up` with no names also starts relay2 and redis1: a cluster of two relays.)
smtpgw lab up relay1 dns1 mx1 upstream1

step "Lab services: CA, DNS, receiving MX, smart host (playbooks/lab.yml)"
ansible-playbook "${playbook_args[@]}" playbooks/lab.yml

step "Tenants (smtpgw tenants check)"
smtpgw tenants check "$inventory" --smarthost upstream1

step "The gateway (playbooks/site.yml)"
ansible-playbook "${playbook_args[@]}" playbooks/site.yml

step "DNS records of the tenant domains on the lab DNS server: plan, apply, check (smtpgw dns)"
smtpgw dns plan "$inventory" || [ $? -eq 2 ]   # 2: there are changes to apply
smtpgw dns apply "$inventory"
smtpgw dns check "$inventory"

relay=$(python3 -c 'from smtpgw import lab; print(lab.Lab.from_env().ip("relay1"))')
tls=(--server "$relay" --server-name relay1.lab.test --ca "$pki/ca.crt")

step "Mail from a login, STARTTLS on 587, delivered direct to the recipient's MX"
SMTPGW_PASSWORD=lab-acme-scanner-pw smtpgw send "${tls[@]}" --port 587 \
    --login scanner@acme.test --from scanner@acme.test --to alice@dest.test --expect-on mx1

step "Mail from a login, implicit TLS on 465, routed via the smart host upstream1"
SMTPGW_PASSWORD=lab-globex-billing-pw smtpgw send "${tls[@]}" --port 465 --tls implicit \
    --login billing@globex.test --from billing@globex.test --to bob@dest.test --expect-on mx1

step "Mail from a device on acme's network (this machine), port 25, no login"
smtpgw send --server "$relay" --port 25 --tls starttls --server-name relay1.lab.test \
    --ca "$pki/ca.crt" --from scanner@acme.test --to carol@dest.test --expect-on mx1

step "Health: each relay's mail flow (smtpgw health), and the tenants' counts on its /metrics"
smtpgw health "$inventory"
python3 - "$relay" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}:9155/metrics", timeout=10).read().decode()
print("\n".join(line for line in text.splitlines() if line.startswith("smtpgw_messages_total")))
PY

step "Doctor: every layer of the gateway, from names to the tenants' DNS (smtpgw doctor)"
# (The password: from the login's tenant file. The CA: this lab's own.)
smtpgw doctor "$inventory" --login scanner@acme.test --ca "$pki/ca.crt"

step "Lab status"
smtpgw lab status
printf '\nThe lab keeps running: `make lab-down` removes it.\n'
