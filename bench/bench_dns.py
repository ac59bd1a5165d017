"""Benchmark: `dns plan` and `dns apply` for 1,000 tenant domains against the lab DNS server.

Each tenant domain (t0000.bench.test ...) is a zone of its own on dns1 (BIND, the lab_dns role,
plus the bench's zones added to it), as customers' domains usually are. The bench times, with
the same functions `smtpgw dns` runs: the first plan (everything to add), the first apply, a
second plan (nothing to change) and a second apply (which must send nothing), and counts the DNS
messages each sent. All domains share one RSA and one Ed25519 DKIM key (making 1,000 RSA keys
would only time key generation; the records are the same size).

    python bench/bench_dns.py [--domains N] [--keep]
"""

from __future__ import annotations

import argparse
import sys
import time

from _benchlab import (
    BenchError,
    BenchLab,
    fail,
    host,
    log,
    on,
    rerun_command,
    run_playbook,
    section,
    source_version,
)
from smtpgw import dkim_keys
from smtpgw.dns_publish import Server, TsigKey, apply, check, plan
from smtpgw.dns_records import desired_records
from smtpgw.tenant_schema import validate_tenants

KEY = TsigKey("lab_dns_tsig", "hmac-sha256", "c210cGd3LWxhYi1vbmx5LWtleS1OT1QtYS1zZWNyZXQ=")
SELECTORS = {"rsa": "smtpgw-rsa", "ed25519": "smtpgw-ed25519"}

# Runs inside dns1: one zone file per domain and one named.conf include, then a reconfig.
ZONES_SCRIPT = r"""
set -eu
n=$1
conf=/etc/bind/named.conf.bench
: > "$conf"
i=0
while [ "$i" -lt "$n" ]; do
  z=$(printf 't%04d.bench.test' "$i")
  {
    echo '$TTL 300'
    echo "@ IN SOA dns1.lab.test. hostmaster.$z. 1 3600 600 604800 300"
    echo '@ IN NS dns1.lab.test.'
  } > "/var/lib/bind/db.$z"
  chown bind:bind "/var/lib/bind/db.$z"
  echo "zone \"$z\" { type primary; file \"/var/lib/bind/db.$z\";" \
    'update-policy { grant "lab_dns_tsig" zonesub ANY; }; };' >> "$conf"
  i=$((i + 1))
done
grep -q named.conf.bench /etc/bind/named.conf \
  || echo 'include "/etc/bind/named.conf.bench";' >> /etc/bind/named.conf
named-checkconf
rndc reconfig
"""


def tenants(count: int) -> list[dict]:
    raw = {f"t{i:04d}.yml": {"domains": [f"t{i:04d}.bench.test"]} for i in range(count)}
    result = validate_tenants(raw)
    if result.errors:
        raise BenchError("\n".join(result.errors[:5]))
    return result.tenants


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--keep", action="store_true", help="leave the bench lab running")
    args = parser.parse_args(argv)
    print(f"smtpgw bench_dns: {args.domains} tenant domains, {source_version()}")
    try:
        with BenchLab(["dns1"], keep=args.keep):
            section("Lab DNS server (playbooks/lab.yml) and the bench's zones")
            run_playbook("lab.yml", label="lab")
            start = time.monotonic()
            on("dns1", "sh", "-c", ZONES_SCRIPT, "zones", str(args.domains), timeout=600)
            log(f"{args.domains} zones added to dns1 in {time.monotonic() - start:.1f} s")
            dns1, relay = host("dns1").ip, host("relay1").ip
            return measure(args.domains, dns1, relay)
    except BenchError as exc:
        return fail(str(exc))


def measure(count: int, dns1: str, relay: str) -> int:
    section("Records")
    start = time.monotonic()
    rsa = dkim_keys.load_private(dkim_keys.generate("rsa"), "rsa", "bench rsa")
    ed = dkim_keys.load_private(dkim_keys.generate("ed25519"), "ed25519", "bench ed25519")
    the_tenants = tenants(count)
    keys = {}
    for tenant in the_tenants:
        (domain,) = tenant["domains"]
        keys[(domain, SELECTORS["rsa"])] = dkim_keys.txt_value(rsa)
        keys[(domain, SELECTORS["ed25519"])] = dkim_keys.txt_value(ed)
    desired = desired_records(the_tenants, [relay], keys, SELECTORS.values(), ttl=300)
    records = len(desired.records())
    seconds = time.monotonic() - start
    log(f"{records} records in {len(desired.zones)} zones computed in {seconds:.2f} s")

    server = Server(dns1, timeout=30)
    figures = []
    for label in ("first", "second"):
        queries = server.queries
        the_plan = plan(desired, server)
        plan_queries = server.queries - queries
        updates = server.updates
        applied = apply(the_plan, server, KEY)
        sent = server.updates - updates
        figures.append(
            (label, the_plan.seconds, plan_queries, len(the_plan.changes), applied.seconds, sent)
        )
        log(
            f"{label} run: plan {the_plan.seconds:.2f} s, {plan_queries} queries, "
            f"{len(the_plan.changes)} names to change; apply {applied.seconds:.2f} s, "
            f"{sent} update messages"
        )
    findings = check(desired, server)
    bad = [f for f in findings if f.status != "ok"]
    server.close()

    section("Figures")
    owned_names = records  # every record is at its own name (TXT rrsets), the register included
    print(f"   domains {count}, zones {len(desired.zones)}, owned names {owned_names}")
    print("   | run | plan s | plan queries | names changed | apply s | update messages |")
    print("   |---|---|---|---|---|---|")
    for label, plan_s, queries, changed, apply_s, sent in figures:
        print(f"   | {label} | {plan_s:.2f} | {queries} | {changed} | {apply_s:.2f} | {sent} |")
    print(f"   dns check: {len(findings)} findings, {len(bad)} not ok")
    print(f"\n   rerun: {rerun_command('bench_dns.py', sys.argv[1:])}")
    first, second = figures
    if second[5] != 0 or second[3] != 0:
        return fail(f"the second run changed {second[3]} names and sent {second[5]} updates")
    if first[5] != len(desired.zones):
        return fail(f"{first[5]} updates for {len(desired.zones)} zones")
    if first[2] > owned_names or second[2] > owned_names:
        return fail("a plan sent more queries than there are owned names")
    if bad:
        return fail(f"dns check: {bad[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
