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
    started = lab.up(args.hosts or None)
    for host, state in started:
        print(f"{host.name:<10} {host.ip:<13} systemd {state:<9} {host.purpose}")
    print(f"inventory: {lab.inventory_path(lab.project_root())}")
    return 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    removed = lab.down()
    print(f"removed {len(removed)} container(s) and the {lab.NETWORK} network")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    rows = lab.status()
    print(_table(rows))
    return 0 if all(r["container"] in ("running", "absent") for r in rows) else 1


def cmd_tenants_check(args: argparse.Namespace) -> int:
    from smtpgw import tenants

    path = Path(args.path)
    if not path.is_dir() and (path / "tenants").is_dir():
        path = path / "tenants"
    if (path / "tenants").is_dir():
        path = path / "tenants"
    if not path.is_dir():
        print(f"smtpgw: {path}: no such directory of tenant files", file=sys.stderr)
        return 2
    result = tenants.check_dir(path, smarthosts=args.smarthost or None)
    for error in result.errors:
        print(error, file=sys.stderr)
    if result.errors:
        print(f"{len(result.errors)} error(s) in {path}", file=sys.stderr)
        return 1
    print(f"{path}: {len(result.tenants)} tenant(s) ok" + (
        f", {len(result.removed)} marked absent" if result.removed else ""
    ))
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

    p_ten = sub.add_parser("tenants", help="tenant files")
    ten_sub = p_ten.add_subparsers(dest="tenants_command", required=True)
    p_check = ten_sub.add_parser("check", help="validate tenant files without touching any host")
    p_check.add_argument(
        "path", nargs="?", default="inventories/lab", help="an inventory or its tenants/ directory"
    )
    p_check.add_argument(
        "--smarthost", action="append", help="a smart-host name tenants may route via (repeat)"
    )
    p_check.set_defaults(func=cmd_tenants_check)
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
