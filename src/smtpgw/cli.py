"""The `smtpgw` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smtpgw import lab


def _table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def cmd_lab_up(args: argparse.Namespace) -> int:
    the_lab = lab.Lab.from_env()
    started = the_lab.up(args.hosts or None)
    for host, state in started:
        print(f"{host.name:<10} {the_lab.planned_ip(host):<13} systemd {state:<9} {host.purpose}")
    print(f"inventory: {the_lab.inventory_path()}")
    return 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    the_lab = lab.Lab.from_env()
    removed = the_lab.down()
    print(f"removed {len(removed)} container(s) and the {the_lab.name} network")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    rows = lab.Lab.from_env().status()
    print(_table(rows))
    return 0 if all(r["container"] in ("running", "absent") for r in rows) else 1


def cmd_tenants_check(args: argparse.Namespace) -> int:
    from smtpgw import tenant_files

    path = Path(args.path)
    extra = args.smarthost or []
    if (path / "tenants").is_dir():  # an inventory: its tenants/ and its own smart hosts
        result = tenant_files.check_inventory(path, smarthosts=extra)
        path = path / "tenants"
    elif path.is_dir():  # a tenants directory: smart hosts only from --smarthost
        result = tenant_files.check_dir(path, smarthosts=extra or None)
    else:
        print(f"smtpgw: {path}: no such directory of tenant files", file=sys.stderr)
        return 2
    for note in result.notes:
        print(note, file=sys.stderr)
    for error in result.errors:
        print(error, file=sys.stderr)
    if result.errors:
        print(f"{len(result.errors)} error(s) in {path}", file=sys.stderr)
        return 1
    print(
        f"{path}: {len(result.tenants)} tenant(s) ok"
        + (f", {len(result.removed)} marked absent" if result.removed else "")
    )
    return 0


def cmd_tenants_new(args: argparse.Namespace) -> int:
    """A tenant file from the template, its password into the vault file; nothing on refusal."""
    from smtpgw import tenant_new

    inventory = Path(args.inventory)
    try:
        plan = tenant_new.plan_tenant(
            inventory,
            args.name,
            args.domain or [],
            preset=args.preset,
            networks=args.network or [],
            login=args.login,
            vault_file=Path(args.vault_file) if args.vault_file else None,
            vault_password_file=Path(args.vault_password_file)
            if args.vault_password_file
            else None,
        )
        tenant_new.create_tenant(
            plan, Path(args.vault_password_file) if args.vault_password_file else None
        )
    except tenant_new.NewTenantError as exc:
        for error in exc.errors:
            print(f"smtpgw: {error}", file=sys.stderr)
        print("nothing written", file=sys.stderr)
        return 1
    print(f"{plan.tenant_file}: tenant {plan.name} (login {plan.login})")
    print(f"{plan.vault_file}: its password as {plan.vault_var}")
    if plan.vault_note:
        print(plan.vault_note)
    if args.show_password:
        print(f"password: {plan.password}")
    print("deploy it: ansible-playbook playbooks/site.yml (with this inventory)")
    return 0


def _add_tenants_new(ten_sub: argparse._SubParsersAction) -> None:
    p_new = ten_sub.add_parser(
        "new", help="write a tenant file from templates/tenant.yml.j2, its password into the vault"
    )
    p_new.add_argument("name", help="the tenant's name ([a-z0-9-])")
    p_new.add_argument("--domain", action="append", required=True, help="a domain (repeat)")
    p_new.add_argument(
        "--preset", help="route through the inventory's smart host that uses this provider preset"
    )
    p_new.add_argument("--network", action="append", help="a device network, CIDR (repeat)")
    p_new.add_argument("--login", help="the SASL login (default app@DOMAIN)")
    p_new.add_argument("--inventory", default="inventories/lab", help="the inventory")
    p_new.add_argument(
        "--vault-file", help="where the password goes (default INVENTORY/group_vars/all/vault.yml)"
    )
    p_new.add_argument(
        "--vault-password-file",
        help="ansible-vault password file (default $ANSIBLE_VAULT_PASSWORD_FILE): an encrypted "
        "vault file is decrypted, extended and encrypted again; a new one is made encrypted",
    )
    p_new.add_argument("--show-password", action="store_true", help="print the new password")
    p_new.set_defaults(func=cmd_tenants_new)


def cmd_send(args: argparse.Namespace) -> int:
    import os
    import smtplib

    from smtpgw import smtpclient

    password = os.environ.get(args.password_env) if args.login else None
    if args.login and password is None:
        print(f"smtpgw: --login needs the password in ${args.password_env}", file=sys.stderr)
        return 2
    sub = smtpclient.Submission(
        host=args.server,
        port=args.port,
        tls=args.tls,
        server_name=args.server_name,
        cafile=args.ca,
        login=args.login,
        password=password,
    )
    try:
        token = smtpclient.send(sub, args.sender, args.to, args.subject)
    except (OSError, smtplib.SMTPException) as exc:
        print(f"smtpgw: sending through {args.server}:{args.port} failed: {exc}", file=sys.stderr)
        return 1
    print(f"accepted by {args.server}:{args.port}; token {token}")
    if args.expect_on:
        text = lab.Lab.from_env().find_mail(token, host=args.expect_on)
        print(f"--- arrived on {args.expect_on} ---")
        print(text.rstrip())
    return 0


def _dns_inputs(args: argparse.Namespace):
    """The inventory's DNS inputs and the wanted records, or an error message (exit 1)."""
    from smtpgw import dns_inputs, dns_records, tenant_schema

    try:
        inputs = dns_inputs.from_inventory(Path(args.inventory))
        return inputs, inputs.desired()
    except (
        dns_inputs.InventoryProblem,
        dns_records.DnsProblem,
        tenant_schema.TenantError,
        ValueError,
    ) as exc:
        for line in str(exc).splitlines():
            print(f"smtpgw: {line}", file=sys.stderr)
        return None, None


def _dns_server(inputs):
    from smtpgw import dns_publish

    if not inputs.server:
        raise dns_publish.DnsError(
            "smtpgw_dns_server is not set; name the primary DNS server of the tenant zones"
        )
    return dns_publish.Server(str(inputs.server).strip(), inputs.port)


def cmd_dns(args: argparse.Namespace) -> int:
    """plan: 0 nothing to change, 2 changes; apply: 0 done; check: 0 all ok, 2 not; 1 errors."""
    import json

    from smtpgw import dns_publish, dns_records

    inputs, desired = _dns_inputs(args)
    if desired is None:
        return 1
    if args.dns_command == "export":
        print("\n".join(dns_records.export_lines(desired)))
        return 0
    server = None
    try:
        server = _dns_server(inputs)
        if args.dns_command == "check":
            findings = dns_publish.check(desired, server, inputs.resolver)
            if args.json:
                print(json.dumps(dns_publish.findings_as_dicts(findings), indent=2))
            else:
                for f in findings:
                    line = f"{f.status:<8} {f.name} {f.kind} at {f.server}"
                    if f.status != "ok":
                        line += f"\n         expected: {f.expected}\n         seen: {f.seen or '-'}"
                    print(line)
            return 0 if all(f.status == "ok" for f in findings) else 2
        the_plan = dns_publish.plan(desired, server)
        key = dns_publish.tsig_key(inputs.tsig) if args.dns_command == "apply" else None
        for line in the_plan.lines():
            print(line)
        summary = (
            f"{len(the_plan.changes)} name(s) to change in {len(the_plan.zones)} zone(s); "
            f"{the_plan.queries} queries to {server}"
        )
        if args.dns_command == "plan":
            print(summary if the_plan.changes else f"no changes; {the_plan.queries} queries")
            return 2 if the_plan.changes else 0
        if not the_plan.changes:
            print(f"no changes, no update sent; {the_plan.queries} queries")
            return 0
        applied = dns_publish.apply(the_plan, server, key)
        print(f"applied: {applied.updates} update(s) to {server} ({', '.join(applied.zones)})")
        return 0
    except dns_publish.DnsError as exc:
        print(f"smtpgw: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.close()


def cmd_dkim(args: argparse.Namespace) -> int:
    """rotate / status of DKIM key rotations (smtpgw.dkim_rotation_ops); 1 on errors."""
    import json

    from smtpgw import (
        dkim_keys,
        dkim_rotation,
        dkim_rotation_ops,
        dns_inputs,
        dns_publish,
        dns_records,
        tenant_schema,
    )

    try:
        if args.dkim_command == "status":
            entries = dkim_rotation_ops.report(Path(args.inventory))
            if args.json:
                print(json.dumps(entries, indent=2))
            else:
                print("\n".join(dkim_rotation_ops.status_lines(entries)))
            return 0
        if args.go_on and args.domain is not None and args.inventory == "inventories/lab":
            args.domain, args.inventory = None, args.domain  # `rotate --continue INVENTORY`
        if (args.domain is None) == (not args.go_on):
            print("smtpgw: name a DOMAIN to rotate, or --continue (not both)", file=sys.stderr)
            return 1
        states = dkim_rotation_ops.rotate(Path(args.inventory), args.domain, args.grace)
        entries = [dkim_rotation_ops.describe(s) for s in states]
        print("\n".join(dkim_rotation_ops.status_lines(entries)))
        return 0
    except (
        dkim_rotation.RotationProblem,
        dkim_keys.KeyProblem,
        dns_publish.DnsError,
        dns_inputs.InventoryProblem,
        dns_records.DnsProblem,
        tenant_schema.TenantError,
    ) as exc:
        for line in str(exc).splitlines():
            print(f"smtpgw: {line}", file=sys.stderr)
        return 1


def cmd_limits_show(args: argparse.Namespace) -> int:
    """Counters, limits and what is left, per tenant, as a relay reads them from its Redis (the
    relays' own copy of the policy service: `policyd.py show`), through the lab's podman."""
    import json

    cmd = ["python3", "/usr/local/lib/smtpgw/policyd.py", "show", "/etc/smtpgw/policy.json"]
    cmd += [args.tenant] if args.tenant else []
    proc = lab.Lab.from_env().exec(args.relay, *cmd, "--json")
    try:
        rows = json.loads(proc)
    except ValueError:
        print(f"smtpgw: limits show on {args.relay} failed: {proc.strip()}", file=sys.stderr)
        return 1
    if args.tenant and not rows:
        print(f"smtpgw: no tenant {args.tenant} with limits on {args.relay}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    show = [
        {
            "tenant": r["tenant"],
            "who": f"{r['kind']} {r['name']}",
            "day (sent/limit/left)": f"{r['sent_day']}/{r['limit_day'] or '-'}/"
            f"{'-' if r['left_day'] is None else r['left_day']}",
            "hour (sent/limit/left)": f"{r['sent_hour']}/{r['limit_hour'] or '-'}/"
            f"{'-' if r['left_hour'] is None else r['left_hour']}",
            "recipients/message": str(r["recipients_per_message"] or "-"),
        }
        for r in rows
    ]
    print(_table(show))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    return doctor.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smtpgw", description="SMTP gateways as code")
    sub = p.add_subparsers(dest="command", required=True)

    p_lab = sub.add_parser("lab", help="the local lab of podman containers")
    lab_sub = p_lab.add_subparsers(dest="lab_command", required=True)
    p_up = lab_sub.add_parser("up", help="start lab hosts (all by default); safe to repeat")
    p_up.add_argument("hosts", nargs="*", help=f"hosts to start, of: {', '.join(lab.HOSTS)}")
    p_up.set_defaults(func=cmd_lab_up)
    lab_sub.add_parser("down", help="remove every lab container and the network").set_defaults(
        func=cmd_lab_down
    )
    lab_sub.add_parser("status", help="show the lab hosts and their state").set_defaults(
        func=cmd_lab_status
    )

    p_send = sub.add_parser("send", help="send a test message through a gateway")
    p_send.add_argument("--server", required=True, help="address or name of the gateway")
    p_send.add_argument("--port", type=int, default=587)
    p_send.add_argument("--tls", choices=["starttls", "implicit", "none"], default="starttls")
    p_send.add_argument("--server-name", help="name the certificate must carry")
    p_send.add_argument("--ca", help="CA file to verify the gateway against")
    p_send.add_argument("--login", help="SASL login (password from --password-env)")
    p_send.add_argument("--password-env", default="SMTPGW_PASSWORD", metavar="VAR")
    p_send.add_argument("--from", dest="sender", required=True)
    p_send.add_argument("--to", required=True)
    p_send.add_argument("--subject")
    p_send.add_argument(
        "--expect-on", metavar="LABHOST", help="wait until it arrives on this lab MX and show it"
    )
    p_send.set_defaults(func=cmd_send)

    p_ten = sub.add_parser("tenants", help="tenant files")
    ten_sub = p_ten.add_subparsers(dest="tenants_command", required=True)
    p_check = ten_sub.add_parser("check", help="validate tenant files without touching any host")
    p_check.add_argument(
        "path", nargs="?", default="inventories/lab", help="an inventory or its tenants/ directory"
    )
    p_check.add_argument(
        "--smarthost",
        action="append",
        help="a smart-host name tenants may route via (repeat); an inventory's own "
        "relay_smarthosts (group_vars/, host_vars/) are read too",
    )
    p_check.set_defaults(func=cmd_tenants_check)
    _add_tenants_new(ten_sub)

    p_dns = sub.add_parser("dns", help="DNS records of the tenant domains (SPF, DKIM, DMARC...)")
    dns_sub = p_dns.add_subparsers(dest="dns_command", required=True)
    for name, text in (
        ("plan", "show what apply would add, change and remove (exit 2 if anything)"),
        ("apply", "publish the plan: one TSIG-signed RFC 2136 update per zone"),
        ("check", "ask the authoritative servers (and the resolver) for every record"),
        ("export", "print the records as zone-file lines"),
    ):
        p_cmd = dns_sub.add_parser(name, help=text)
        p_cmd.add_argument("inventory", nargs="?", default="inventories/lab")
        if name == "check":
            p_cmd.add_argument("--json", action="store_true", help="findings as JSON")
        p_cmd.set_defaults(func=cmd_dns)

    p_dkim = sub.add_parser("dkim", help="DKIM key rotation, staged and safe")
    dkim_sub = p_dkim.add_subparsers(dest="dkim_command", required=True)
    p_rot = dkim_sub.add_parser(
        "rotate", help="start a rotation of DOMAIN's keys, or go on with every one (--continue)"
    )
    p_rot.add_argument("domain", nargs="?", help="the domain whose keys to replace")
    p_rot.add_argument("inventory", nargs="?", default="inventories/lab")
    p_rot.add_argument(
        "--continue", dest="go_on", action="store_true", help="go on with every rotation"
    )
    p_rot.add_argument(
        "--grace",
        type=int,
        help="seconds the old records stay after the relays switch "
        "(default: smtpgw_dkim_rotation_grace, else 7 days)",
    )
    p_rot.set_defaults(func=cmd_dkim)
    p_stat = dkim_sub.add_parser(
        "status", help="where each domain's rotation is, what it waits for"
    )
    p_stat.add_argument("inventory", nargs="?", default="inventories/lab")
    p_stat.add_argument("--json", action="store_true", help="as JSON")
    p_stat.set_defaults(func=cmd_dkim)

    p_lim = sub.add_parser("limits", help="tenants' sending limits and counters")
    lim_sub = p_lim.add_subparsers(dest="limits_command", required=True)
    p_show = lim_sub.add_parser(
        "show", help="counters, limits and what is left per tenant, from the relays' Redis"
    )
    p_show.add_argument("tenant", nargs="?", help="one tenant (default: all)")
    p_show.add_argument("--json", action="store_true", help="as JSON")
    p_show.add_argument("--relay", default="relay1", help="the lab relay to ask (default relay1)")
    p_show.set_defaults(func=cmd_limits_show)

    from . import trace  # smtpgw trace, smtpgw health

    trace.add_parsers(sub)

    from . import doctor

    p_doc = sub.add_parser("doctor", help="walk a gateway's layers and name the first that fails")
    doctor.add_arguments(p_doc)
    p_doc.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except lab.LabError as exc:
        print(f"smtpgw: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
