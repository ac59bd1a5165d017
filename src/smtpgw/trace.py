"""``smtpgw trace`` and ``smtpgw health``: the relays' mail-flow lines and /health, read over the
inventory's own connection (an ``ansible`` ad-hoc command per group, as a playbook would reach
the hosts: podman in the lab, SSH in production).

On each relay, smtpgw's mail-flow service (src/smtpgw/metrics.py) writes a line per delivery
attempt to the journal under the identifier ``smtpgw-mail``; ``trace`` greps those for a queue
id or Message-ID, then follows what it found (the Message-ID, the next hop's ``queued as`` id)
across every relay of the group until nothing new turns up.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .metrics import parse_record

__all__ = ["HostsError", "follow", "hops_text", "run_on_group", "trace"]

MAX_ROUNDS = 5


class HostsError(RuntimeError):
    """The inventory's hosts could not be asked; the message says which and why."""


@dataclass
class HostResult:
    host: str
    rc: int
    stdout: str
    error: str


def inventory_source(inventory: Path) -> Path:
    """An inventory directory's hosts file when it has one (its tenants/ are not inventory)."""
    if inventory.is_dir():
        for name in ("hosts.yml", "hosts.yaml", "hosts", "hosts.ini"):
            if (inventory / name).is_file():
                return inventory / name
    return inventory


def run_on_group(
    inventory: Path, group: str, argv: list[str], become: bool = False, timeout: int = 120
) -> list[HostResult]:
    """Run argv on every host of the group through ansible's ad-hoc command; each host's result."""
    if not inventory.exists():
        raise HostsError(f"{inventory}: no such inventory; give the inventory of your relays")
    with tempfile.TemporaryDirectory(prefix="smtpgw-hosts-") as tree:
        cmd = ["ansible", group, "-i", str(inventory_source(inventory)), "-t", tree, "-o"]
        cmd += ["-m", "ansible.builtin.command", "-a", shlex.join(argv)]
        cmd += ["--become"] if become else []
        env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="oneline")
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostsError(f"ansible {group} -i {inventory}: {exc}") from None
        results = []
        for path in sorted(Path(tree).iterdir()):
            data = json.loads(path.read_text() or "{}")
            error = "" if "rc" in data else str(data.get("msg") or "unreachable")
            results.append(
                HostResult(path.name, int(data.get("rc", -1)), data.get("stdout", ""), error)
            )
    if not results:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        raise HostsError(
            f"ansible {group} -i {inventory}: no host answered"
            + (f" ({text[-1]})" if text else "")
            + f"; is there a group {group} in the inventory?"
        )
    return results


def _matches(record: dict[str, Any], ids: set[str]) -> bool:
    mid = str(record.get("message_id", ""))
    return bool(
        {str(record.get("queue_id", "")), str(record.get("queued_as", "")), mid, mid.strip("<>")}
        & ids
    )


def follow(search, ids: Iterable[str]) -> list[dict[str, Any]]:
    """Every record linked to ids (queue ids, Message-IDs, with or without <>), through
    ``search(ids) -> records``: a record brings its Message-ID and next hop's queue id along."""
    wanted = {i.strip() for i in ids if i.strip()}
    wanted |= {i.strip("<>") for i in wanted}
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    asked: set[str] = set()
    for _ in range(MAX_ROUNDS):
        todo = wanted - asked
        if not todo:
            break
        asked |= todo
        for record in search(sorted(todo)):
            if _matches(record, wanted):
                key = tuple(sorted((k, str(v)) for k, v in record.items()))
                found[key] = record
                for name in ("queue_id", "queued_as", "message_id"):
                    if record.get(name):
                        wanted.add(str(record[name]))
                        wanted.add(str(record[name]).strip("<>"))
    return sorted(found.values(), key=lambda r: (str(r.get("time", "")), str(r.get("relay", ""))))


def trace(
    inventory: Path, ids: list[str], group: str = "relays", since: str = "", become: bool = False
) -> list[dict[str, Any]]:
    """The hops of a message through the group's relays (records of metrics.format_record)."""

    def search(todo: list[str]) -> list[dict[str, Any]]:
        pattern = "|".join(re.escape(i) for i in todo)
        argv = ["journalctl", "-t", "smtpgw-mail", "-o", "cat", "--no-pager", "-g", pattern]
        argv += ["--since", since] if since else []
        records = []
        for result in run_on_group(inventory, group, argv, become):
            if result.error:
                raise HostsError(f"{result.host}: {result.error}")
            for line in result.stdout.splitlines():
                record = parse_record(line)
                if record is not None:
                    record.setdefault("host", result.host)
                    records.append(record)
        return records

    return follow(search, ids)


def hops_text(records: list[dict[str, Any]]) -> str:
    """One line a hop, for people."""
    lines = []
    for r in records:
        line = (
            f"{r.get('time', '?')}  {r.get('relay', '?')}  tenant {r.get('tenant', '?')}  "
            f"queue {r.get('queue_id', '?')}  <{r.get('sender', '')}> -> <{r.get('recipient', '')}>"
            f"  via {r.get('route', '?')}  {r.get('result', '?')} {r.get('dsn', '')}".rstrip()
        )
        if r.get("queued_as"):
            line += f"  (next hop's queue {r['queued_as']})"
        elif r.get("detail") and r.get("result") != "delivered":
            line += f"  ({r['detail']})"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The commands (registered by smtpgw.cli)

HEALTH_ARGV = ["python3", "/usr/local/lib/smtpgw/metrics.py", "health", "/etc/smtpgw/metrics.json"]


def cmd_trace(args: Any) -> int:
    import sys

    try:
        records = trace(Path(args.inventory), [args.id], args.group, args.since, args.become)
    except HostsError as exc:
        print(f"smtpgw: trace: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=2))
    elif records:
        print(hops_text(records))
    if not records:
        print(
            f"smtpgw: trace: no relay of {args.group} logged {args.id} (a queue id or Message-ID)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_health(args: Any) -> int:
    import sys

    try:
        results = run_on_group(Path(args.inventory), args.group, HEALTH_ARGV, args.become)
    except HostsError as exc:
        print(f"smtpgw: health: {exc}", file=sys.stderr)
        return 1
    rows = [
        {
            "host": r.host,
            "healthy": r.rc == 0 and not r.error,
            "reason": (r.error or r.stdout.strip()).partition(": ")[2] or r.error or r.stdout,
        }
        for r in results
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['host']}: {'healthy' if row['healthy'] else 'UNHEALTHY'}: {row['reason']}")
    return 0 if all(row["healthy"] for row in rows) else 1


def add_parsers(sub: Any) -> None:
    """``smtpgw trace`` and ``smtpgw health`` on the command line's subcommands."""
    p = sub.add_parser("trace", help="follow a message across the relays by queue id or Message-ID")
    p.add_argument("id", help="a queue id (4B1C52A0F3) or Message-ID (<x@example.com>)")
    p.add_argument("inventory", nargs="?", default="inventories/lab")
    p.add_argument("--group", default="relays", help="the relays' group (default: relays)")
    p.add_argument("--since", default="", help="journalctl --since (e.g. -2h, 2026-11-30)")
    p.add_argument("--become", action="store_true", help="read the journal as root (sudo)")
    p.add_argument("--json", action="store_true", help="the hops as JSON")
    p.set_defaults(func=cmd_trace)
    p = sub.add_parser("health", help="each relay's mail-flow health (its /health)")
    p.add_argument("inventory", nargs="?", default="inventories/lab")
    p.add_argument("--group", default="relays", help="the relays' group (default: relays)")
    p.add_argument("--become", action="store_true", help="run the check as root (sudo)")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_health)
