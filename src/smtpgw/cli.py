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

    p_lim = sub.add_parser("limits", help="tenants' sending limits and counters")
    lim_sub = p_lim.add_subparsers(dest="limits_command", required=True)
    p_show = lim_sub.add_parser(
        "show", help="counters, limits and what is left per tenant, from the relays' Redis"
    )
    p_show.add_argument("tenant", nargs="?", help="one tenant (default: all)")
    p_show.add_argument("--json", action="store_true", help="as JSON")
    p_show.add_argument("--relay", default="relay1", help="the lab relay to ask (default relay1)")
    p_show.set_defaults(func=cmd_limits_show)
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
