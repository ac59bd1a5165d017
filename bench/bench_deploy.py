#!/usr/bin/env python3
"""Deploy time of playbooks/site.yml with 1, 100 and 1,000 tenants: first run and second run.

Sets up a lab of its own (`smtpgw-bench`: dns1 and relay1) and runs playbooks/lab.yml once (the
lab CA and DNS the relay needs; not measured). Then, for each size, it generates that many tenants
(each a domain, one login with a literal password and one /32 network), gives the relay a fresh
container (so every first run is a deployment to a new host: packages, configuration, tables) and
times two runs of playbooks/site.yml: the first, and the second, which must change nothing.

With `--first-runs N` it measures only first runs instead: N fresh relay containers in a row, one
tenant each, with the time of every first run and of its slowest handler; a handler over 20 s
(one that waited on a hung service) fails it.

Prints a table of the times, the ratio second run (largest) / second run (1 tenant), and where the
time goes: the tasks whose time grows most with the tenants (from ansible.posix.profile_tasks).
Exits non-zero when a run fails, a second run changes anything, or the relay does not end up
with every login.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlab as bl

FRESH_RELAY = Path(__file__).resolve().parent / "fresh_relay.yml"
USERS_FILE = "/etc/dovecot/smtpgw-users"


@dataclass
class Size:
    tenants: int
    first: bl.Run
    second: bl.Run
    logins: int


def task_times(run: bl.Run) -> dict[str, float]:
    times: dict[str, float] = {}
    for name, secs in run.tasks:
        times[name] = times.get(name, 0.0) + secs
    return times


def deployed_logins() -> int:
    out = bl.on("relay1", "grep", "-c", "^[^#]", USERS_FILE, check=False)
    return int(out.strip() or 0)


def measure(count: int, fresh: bool) -> Size:
    bl.section(f"{count} tenant(s)")
    bl.write_tenants(bl.generated_tenants(count))
    if fresh:
        bl.BenchLab.recreate("relay1")
        bl.run_playbook(FRESH_RELAY, label="fresh-relay")
        bl.log("relay1: a fresh container, resolving through dns1")
    first = bl.run_playbook("site.yml", label=f"site-{count}-first")
    bl.log(f"first run:  {first.seconds:6.1f} s, {first.total_changed} change(s)")
    second = bl.run_playbook("site.yml", label=f"site-{count}-second")
    bl.log(f"second run: {second.seconds:6.1f} s, {second.total_changed} change(s)")
    return Size(count, first, second, deployed_logins())


def report(sizes: list[Size]) -> None:
    print(
        f"   {'tenants':>7}  {'first run':>9}  {'changed':>7}  {'second run':>10}  {'changed':>7}"
    )
    for s in sizes:
        print(
            f"   {s.tenants:>7}  {s.first.seconds:>8.1f}s  {s.first.total_changed:>7}  "
            f"{s.second.seconds:>9.1f}s  {s.second.total_changed:>7}"
        )
    small, large = sizes[0], sizes[-1]
    print(
        f"\n   second run ({large.tenants}) / second run ({small.tenants}): "
        f"{large.second.seconds / small.second.seconds:.2f}"
        f"   first run ({large.tenants}) / first run ({small.tenants}): "
        f"{large.first.seconds / small.first.seconds:.2f}"
    )
    for which in ("first", "second"):
        base = task_times(getattr(small, which))
        big = task_times(getattr(large, which))
        grown = sorted(big, key=lambda t: big[t] - base.get(t, 0.0), reverse=True)[:6]
        print(
            f"\n   where the {which} run's time goes: the tasks that grow most, "
            f"{small.tenants} -> {large.tenants} tenants (s)"
        )
        for task in grown:
            print(f"   {base.get(task, 0.0):>7.1f} -> {big[task]:>6.1f}  {task}")
        total = getattr(large, which).seconds
        print(
            f"   ({sum(big.values()):.0f} s of {total:.0f} s in tasks; {len(big)} tasks, "
            f"{sum(big.values()) / max(len(big), 1):.1f} s a task on average)"
        )


def sizes_runs(counts: list[int]) -> list[str]:
    """A first and a second run for each number of tenants; prints the table; the problems."""
    problems: list[str] = []
    sizes = []
    for i, count in enumerate(counts):
        size = measure(count, fresh=i > 0)
        sizes.append(size)
        if size.second.total_changed:
            problems.append(
                f"{count} tenants: the second run changed {size.second.total_changed} "
                "thing(s); it should change nothing"
            )
        if size.logins != count:
            problems.append(
                f"{count} tenants: {bl.host('relay1').container}:{USERS_FILE} has "
                f"{size.logins} login(s), not {count}"
            )
    bl.section("Results")
    report(sizes)
    return problems


def first_runs(count: int) -> list[str]:
    """`count` first runs in a row, each on a fresh relay container; returns the problems."""
    bl.section(f"{count} first runs in a row, 1 tenant, each on a fresh relay container")
    bl.write_tenants(bl.generated_tenants(1))
    times: list[float] = []
    problems: list[str] = []
    print(f"   {'run':>3}  {'first run':>9}  slowest handler")
    for i in range(count):
        bl.BenchLab.recreate("relay1")
        bl.run_playbook(FRESH_RELAY, label=f"fresh-relay-{i + 1}")
        run = bl.run_playbook("site.yml", label=f"site-first-{i + 1}")
        handlers = [(secs, name) for name, secs in run.tasks if name.split(" : ")[-1] in HANDLERS]
        secs, name = max(handlers, default=(0.0, "none"))
        print(f"   {i + 1:>3}  {run.seconds:>8.1f}s  {secs:.1f} s {name}", flush=True)
        times.append(run.seconds)
        if secs > SLOW_HANDLER:
            problems.append(f"first run {i + 1}: {name} took {secs:.1f} s")
    times.sort()
    median = times[len(times) // 2]
    fastest, slowest = times[0], times[-1]
    print(f"\n   first runs: fastest {fastest:.1f} s, median {median:.1f} s, slowest {slowest:.1f}")
    return problems


# A handler slower than this waited on something (a restart takes 1-3 s here).
SLOW_HANDLER = 20.0
# The relay role's handlers (profile_tasks puts the role's name before them).
HANDLERS = {
    "Check the Postfix configuration",
    "Reload Postfix",
    "Restart Dovecot",
    "Restart the header-From check",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 and 100 tenants")
    p.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], help="e.g. 1,100,1000")
    p.add_argument("--keep", action="store_true", help="leave the bench lab running afterwards")
    p.add_argument(
        "--first-runs", type=int, metavar="N", help="only N first runs on fresh relays, 1 tenant"
    )
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([1, 100] if args.quick else [1, 100, 1000])
    if not all(1 <= n <= 65536 for n in args.sizes):
        p.error("sizes must be between 1 and 65536 tenants")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    rerun = bl.rerun_command("bench_deploy.py", argv)
    what = (
        f"{args.first_runs} first runs"
        if args.first_runs
        else ", ".join(str(n) for n in args.sizes) + " tenants"
    )
    print(f"smtpgw bench: deploy time of playbooks/site.yml, {what}\nrerun: {rerun}")
    print(f"source: {bl.source_version()}")
    started = time.monotonic()
    problems: list[str] = []
    try:
        with bl.BenchLab(["dns1", "relay1"], keep=args.keep):
            bl.section("Lab services (playbooks/lab.yml, not measured)")
            bl.write_tenants(bl.generated_tenants(1))
            run = bl.run_playbook("lab.yml")
            bl.log(f"lab.yml: {run.seconds:.0f} s")
            if args.first_runs:
                problems += first_runs(args.first_runs)
            else:
                problems += sizes_runs(args.sizes)
    except bl.BenchError as exc:
        return bl.fail(f"{exc}\nrerun: {rerun}")
    except KeyboardInterrupt:
        return bl.fail("interrupted; the bench lab was removed")
    if problems:
        return bl.fail("\n".join(problems) + f"\nrerun: {rerun}")
    print(f"\nfinished in {time.monotonic() - started:.0f} s; playbook logs in {bl.LOGS}")
    print(f"rerun: {rerun}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
