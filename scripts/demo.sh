#!/usr/bin/env bash
# The main job, on the local lab: start the lab hosts, deploy the gateway with the example tenants,
# send mail through it (a login on 587, a login on 465 routed via the smart host, a device on the
# tenant's network on 25) and show each message arrive at the recipients' MX.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export SMTPGW_ROOT="$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh

step() { printf '\n== %s\n' "$*"; }

step "Lab hosts"
smtpgw lab up

step "Lab services: CA, DNS, receiving MX, smart host (playbooks/lab.yml)"
ansible-playbook playbooks/lab.yml

step "Tenants (smtpgw tenants check)"
smtpgw tenants check inventories/lab --smarthost upstream1

step "The gateway (playbooks/site.yml)"
ansible-playbook playbooks/site.yml

step "DNS records of the tenant domains on the lab DNS server: plan, apply, check (smtpgw dns)"
smtpgw dns plan inventories/lab || [ $? -eq 2 ]   # 2: there are changes to apply
smtpgw dns apply inventories/lab
smtpgw dns check inventories/lab

relay=$(python3 -c 'from smtpgw import lab; print(lab.HOSTS["relay1"].ip)')
tls=(--server "$relay" --server-name relay1.lab.test --ca .lab/pki/ca.crt)

step "Mail from a login, STARTTLS on 587, delivered direct to the recipient's MX"
SMTPGW_PASSWORD=lab-acme-scanner-pw smtpgw send "${tls[@]}" --port 587 \
    --login scanner@acme.test --from scanner@acme.test --to alice@dest.test --expect-on mx1

step "Mail from a login, implicit TLS on 465, routed via the smart host upstream1"
SMTPGW_PASSWORD=lab-globex-billing-pw smtpgw send "${tls[@]}" --port 465 --tls implicit \
    --login billing@globex.test --from billing@globex.test --to bob@dest.test --expect-on mx1

step "Mail from a device on acme's network (this machine), port 25, no login"
smtpgw send --server "$relay" --port 25 --tls starttls --server-name relay1.lab.test \
    --ca .lab/pki/ca.crt --from scanner@acme.test --to carol@dest.test --expect-on mx1

step "Lab status"
smtpgw lab status
printf '\nThe lab keeps running: `make lab-down` removes it.\n'
