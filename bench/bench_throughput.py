#!/usr/bin/env python3
"""Relay throughput of the deployed gateway: the full path on 587 against a bare Postfix, same run.

Sets up a lab of its own (`smtpgw-bench`: dns1, relay1, mx1), deploys the gateway with one
tenant (a login, and this machine's address on the lab network as its network), and replaces the
MX's Postfix by Postfix's `smtp-sink`, so what is measured is the relay and not the MX. Then, in
rounds that rotate the order, it sends the same number of 5 KB messages through three paths:

- `587 full`: STARTTLS (the client's default, TLS 1.3), a login, and rspamd as milter (the
  header-From check and two DKIM signatures, RSA-2048 and Ed25519), as applications send;
- `2525 bare`: a Postfix smtpd service the bench adds to the relay's master.cf after the
  deployment (`postconf -M`, for the bench only): no TLS, no login, no milter, no policy
  service, relayed because the client is on the tenant's network;
- `2587 no milter`: 587's settings (STARTTLS, AUTH) without rspamd, also added by the bench, so
  the cost of TLS and AUTH and the cost of rspamd show apart;
- `2588 no limits`: 587 exactly (its master.cf line read back from the relay: TLS, AUTH, rspamd,
  syslog name) without the sending limits: no policy service at RCPT, and a login of the bench
  tenant for which an rspamd settings rule the bench adds leaves out the count at the end of DATA
  (`SMTPGW_LIMITS`), so the cost of the limits (a policy request at RCPT, answered without Redis
  while the tenant is far below its limits, and rspamd's run of the counter script in the
  relay's Redis) shows as the ratio of 587 to it; the bench checks that 587's messages, and only
  those, were counted in Redis;
- `587 look only` (with `--split-limits`): 587 as 2588's login, so the policy service's look at
  RCPT without rspamd's count: the two parts of the limits' cost apart;
- `2589 rspamd rl` (with `--rspamd-ratelimit`): 2588 with rspamd's own `ratelimit` module in
  place of the policy service, counting the login in the relay's Redis (a leaky bucket the bench
  sets up for a second login of the bench tenant, which only this path uses), so that the two
  ways of counting compare in the same run.

All paths go through the same Postfix, the same restrictions and the same onward delivery (direct,
MX lookup, to the sink). Each path: `--sessions` parallel sessions, each session sends
`--per-session` messages then quits and a new one starts, until `--messages` were sent or the time
limit passed. Reported per path: accepted messages/s (until the last one was accepted), end to end
messages/s (until the sink had them all), CPU per message of the relay container (and of its
rspamd, policy service and Redis processes), the sink and this client; and the ratio of each
path to the bare one. Before
the load, sequential sessions measure where the set-up time of a session goes (25 with the
milter; 587 and 465, each with TLS 1.3 and 1.2), and count the stalls.

Exits non-zero when anything fails (a message refused, one not delivered to the sink, a message
of the full path that reached the sink without both signatures, the lab).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import smtplib
import socket
import ssl
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlab as bl
from smtpgw.smtpclient import ImplicitTLS

RELAY = bl.host("relay1")
MX = bl.host("mx1")
SENDER = "app@bench.test"
PASSWORD = "bench-app-password"
RECIPIENT = "sink@dest.test"
SINK_DIR = "/dev/shm/smtpgw-bench-sink"  # tmpfs: the sink writes each message here, we count them
SINK_UNIT = "smtpgw-bench-sink"


@dataclass(frozen=True)
class Entry:
    """One way into the relay."""

    label: str
    port: int
    tls: str  # none | starttls | implicit
    login: bool
    user: str = ""  # the login, when not SENDER


TLS_AUTH = Entry("587 full", 587, "starttls", True)
BARE = Entry("2525 bare", 2525, "none", False)
NO_MILTER = Entry("2587 no milter", 2587, "starttls", True)  # 587 without rspamd: where time goes
# 587 exactly (TLS, AUTH, rspamd) without the policy service: what the sending limits cost.
NL_USER = "nolimits@bench.test"
NO_LIMITS = Entry("2588 no limits", 2588, "starttls", True, NL_USER)
# 2588 with rspamd's ratelimit module counting the login (RL_USER) in Redis (--rspamd-ratelimit).
RL_USER = "rl@bench.test"
RSPAMD_RL = Entry("2589 rspamd rl", 2589, "starttls", True, RL_USER)
PLAIN = Entry("25 plain", 25, "none", False)  # latency probe only (with the milter)
IMPLICIT_AUTH = Entry("465 TLS+AUTH", 465, "implicit", True)  # latency probe only
# 587 as 2588's login (--split-limits): the policy service's look at RCPT without rspamd's count,
# so that the two parts of the limits' cost show apart.
LOOK_ONLY = Entry("587 look only", 587, "starttls", True, NL_USER)
LOAD_PATHS = [BARE, TLS_AUTH, NO_MILTER, NO_LIMITS]
# The bench's own smtpd services (master.cf, added after the deployment): bare (no TLS, no SASL,
# no milter, no policy service), and 587's settings without the milter.
BENCH_SERVICES = (
    f"{BARE.port}/inet={BARE.port} inet n - y - - smtpd -o syslog_name=postfix/bench-bare "
    "-o smtpd_milters= -o smtpd_tls_security_level=none -o smtpd_sasl_auth_enable=no "
    "-o smtpd_recipient_restrictions=reject_non_fqdn_recipient",
    f"{NO_MILTER.port}/inet={NO_MILTER.port} inet n - y - - smtpd "
    "-o syslog_name=postfix/bench-nomilter -o smtpd_tls_security_level=encrypt "
    "-o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=yes -o smtpd_milters= "
    "-o smtpd_sender_restrictions="
    "reject_non_fqdn_sender,reject_authenticated_sender_login_mismatch",
)


def copy_of_587(port: int) -> str:
    """A service on `port` that is the relay's 587 as deployed (its master.cf line, read back:
    the same TLS, AUTH, milter and syslog name, so that its log lines cost what 587's do) without
    the policy service at RCPT (main.cf's recipient restrictions less check_policy_service)."""
    line = bl.on("relay1", "postconf", "-M", "587/inet").split()
    if line[:2] != ["587", "inet"] or line[7] != "smtpd":
        raise bl.BenchError(f"unexpected master.cf line for 587: {' '.join(line)}")
    no_policy = ["-o", "smtpd_recipient_restrictions=reject_non_fqdn_recipient"]
    return " ".join([f"{port}/inet={port}", "inet", *line[2:7], "smtpd", *line[8:], *no_policy])


def settings_rule(name: str, user: str, symbols: list[str]) -> str:
    """Shell that adds an rspamd settings rule (once): `user`'s messages run only `symbols`."""
    return (
        f"grep -q {name} /etc/rspamd/local.d/settings.conf ||\n"
        "  cat >> /etc/rspamd/local.d/settings.conf <<'CONF'\n"
        f'{name} {{\n  priority = 10;\n  user = "{user}";\n'
        f"  apply {{\n    symbols_enabled = {json.dumps(symbols)};\n  }}\n}}\nCONF"
    )


# --rspamd-ratelimit: a copy of 587 on 2589 like 2588's, and rspamd's ratelimit module for the
# bench: the plugin linked beside the relay's two, RL_USER's messages counted in the relay's
# Redis (a leaky bucket far above what a run sends), and a settings rule that runs its symbols
# for RL_USER only (the relay's own rule runs only the From check and DKIM for everyone else).
RL_SYMBOLS = [
    "SMTPGW_FROM_CHECK",
    "DKIM_SIGNED",
    "RATELIMIT_CHECK",
    "RATELIMIT_UPDATE",
    "RATELIMITED",
]
RSPAMD_RL_SETUP = f"""set -e
ln -sfn /usr/share/rspamd/plugins/ratelimit.lua /etc/rspamd/smtpgw-plugins/ratelimit.lua
pw=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["redis"]["password"])' \
  </etc/smtpgw/policy.json)
cat > /etc/rspamd/local.d/ratelimit.conf <<CONF
servers = "127.0.0.1:6379";
password = "$pw";
rates {{
  smtpgw_bench = {{
    # RL_USER's messages only: the settings rules alone did not keep the module off the others.
    selector = 'user.lower.equal("{RL_USER}")';
    bucket = {{ burst = 10000000; rate = "1000000 / 1h"; }}
  }}
}}
CONF
{settings_rule("smtpgw_bench_ratelimit", RL_USER, RL_SYMBOLS)}
rspamadm configtest -q
systemctl restart rspamd
"""
# 2588's login: rspamd runs the sender check and DKIM for it, not the count (SMTPGW_LIMITS).
NO_LIMITS_SETUP = f"""set -e
{settings_rule("smtpgw_bench_nolimits", NL_USER, ["SMTPGW_FROM_CHECK", "DKIM_SIGNED"])}
rspamadm configtest -q
systemctl restart rspamd
"""
REDIS_CLI = (
    "redis-cli --no-auth-warning -a \"$(python3 -c 'import json; "
    'print(json.load(open("/etc/smtpgw/policy.json"))["redis"]["password"])\')" '
)


# --------------------------------------------------------------------------------------------
# The SMTP client


def tls_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(bl.CA))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def open_session(path: Entry, ctx: ssl.SSLContext, marks: dict[str, float] | None = None):
    """An SMTP session on `path`, ready for MAIL FROM; `marks` gets the time of each step."""

    def mark(step: str) -> None:
        if marks is not None:
            marks[step] = time.perf_counter()

    mark("start")
    helo = "bench-client.bench.test"
    if path.tls == "implicit":
        smtp: smtplib.SMTP = ImplicitTLS(timeout=30, local_hostname=helo, context=ctx)
    else:
        smtp = smtplib.SMTP(timeout=30, local_hostname=helo)
    smtp._host = bl.RELAY_NAME  # the name the certificate is checked against
    smtp.connect(RELAY.ip, path.port)
    mark("banner")
    if path.tls == "starttls":
        smtp.ehlo()
        mark("ehlo")
        smtp.starttls(context=ctx)
        mark("starttls")
    smtp.ehlo()
    mark("ehlo_tls" if path.tls != "none" else "ehlo")
    if path.login:
        smtp.login(path.user or SENDER, PASSWORD)
        mark("auth")
    return smtp


def message(size: int, tag: str) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: smtpgw bench {tag}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@bench.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"smtpgw relay throughput benchmark: five kilobytes of plain text in short lines.\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 2)]
    return head + body + b"\r\n"


@dataclass
class Load:
    path: Entry
    target: int
    accepted: int = 0
    sessions: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0  # first session opened to last message accepted
    drained: float = 0.0  # first session opened to the sink having every accepted message
    delivered: int = 0
    time_bounded: bool = False
    relay_cpu: float | None = None  # seconds, send + drain
    # CPU seconds of the relay's long-running services the limits involve (PARTS), send + drain.
    parts: dict[str, float] = field(default_factory=dict)
    sink_cpu: float | None = None
    client_cpu: float = 0.0
    setup: list[float] = field(default_factory=list)  # session set-up times (s)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds else 0.0

    @property
    def e2e_rate(self) -> float:
        return self.delivered / self.drained if self.drained else 0.0


class Sender:
    """`sessions` threads that share a budget of messages; each session sends `per_session`."""

    MAX_ERRORS = 20

    def __init__(self, load: Load, sessions: int, per_session: int, size: int, limit: float):
        self.load = load
        self.sessions = sessions
        self.per_session = per_session
        self.size = size
        self.limit = limit
        self.lock = threading.Lock()
        self.claimed = 0
        self.ctx = tls_context()
        self.deadline = 0.0
        self.started = 0.0  # perf_counter when the sessions were let go

    def _claim(self) -> bool:
        with self.lock:
            if (
                self.claimed >= self.load.target
                or len(self.load.errors) >= self.MAX_ERRORS
                or time.monotonic() > self.deadline
            ):
                if time.monotonic() > self.deadline and self.claimed < self.load.target:
                    self.load.time_bounded = True
                return False
            self.claimed += 1
            return True

    def _unclaim(self) -> None:
        with self.lock:
            self.claimed -= 1

    def _error(self, text: str) -> None:
        with self.lock:
            self.load.errors.append(text)

    def _worker(self, start: threading.Barrier, wid: int) -> None:
        start.wait()
        n = 0
        while self._claim():
            marks: dict[str, float] = {}
            try:
                smtp = open_session(self.load.path, self.ctx, marks)
            except (OSError, smtplib.SMTPException) as exc:
                self._unclaim()
                self._error(f"session: {exc!r}")
                continue
            with self.lock:
                self.load.sessions += 1
                self.load.setup.append(time.perf_counter() - marks["start"])
            sent_here = 0
            try:
                while True:  # the message claimed above, then more while the session lasts
                    n += 1
                    data = message(self.size, f"{wid}-{n}")
                    try:
                        smtp.sendmail(SENDER, [RECIPIENT], data)
                    except smtplib.SMTPException as exc:
                        self._error(f"message: {exc!r}")
                        break
                    with self.lock:
                        self.load.accepted += 1
                    sent_here += 1
                    if sent_here >= self.per_session or not self._claim():
                        break
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    smtp.quit()
            except OSError as exc:
                self._error(f"connection: {exc!r}")
                with contextlib.suppress(OSError):
                    smtp.close()

    def run(self) -> None:
        barrier = threading.Barrier(self.sessions + 1)
        threads = [
            threading.Thread(target=self._worker, args=(barrier, i), daemon=True)
            for i in range(self.sessions)
        ]
        for t in threads:
            t.start()
        self.deadline = time.monotonic() + self.limit
        self.started = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join(self.limit + 60)
        self.load.seconds = time.perf_counter() - self.started


# --------------------------------------------------------------------------------------------
# The sink on mx1, and CPU accounting


def sink_start() -> None:
    bl.on("mx1", "systemctl", "stop", "postfix", SINK_UNIT, check=False)
    bl.on("mx1", "sh", "-c", f"mkdir -p {SINK_DIR} && chown nobody {SINK_DIR}")
    bl.on(
        "mx1",
        "systemd-run",
        f"--unit={SINK_UNIT}",
        "--collect",
        "/usr/sbin/smtp-sink",
        "-u",
        "nobody",
        "-h",
        MX.fqdn,
        "-d",
        f"{SINK_DIR}/",
        "0.0.0.0:25",
        "256",
    )
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection((MX.ip, 25), timeout=2) as s:
            if s.recv(100).startswith(b"220"):
                return
        if time.monotonic() > deadline:
            raise bl.BenchError(f"smtp-sink on {MX.container} did not answer on port 25")
        time.sleep(0.3)


def sink_count() -> int:
    return int(bl.on("mx1", "sh", "-c", f"ls -U {SINK_DIR} | wc -l").strip())


def sink_signatures() -> int:
    """DKIM-Signature headers in the message(s) at the sink."""
    out = bl.on("mx1", "sh", "-c", f"cat {SINK_DIR}/* | grep -ci '^DKIM-Signature:' || true")
    return int(out.strip() or 0)


def sink_clear() -> None:
    bl.on("mx1", "find", SINK_DIR, "-type", "f", "-delete")


def relay_queue_size() -> int:
    out = bl.on("relay1", "postqueue", "-j")
    return len([line for line in out.splitlines() if line.strip()])


def cpu_seconds(container: str) -> float | None:
    """CPU time used by a container so far (cgroup v1 cpuacct or v2 cpu.stat), or None."""
    cgpath = bl.podman("inspect", container, "--format", "{{.State.CgroupPath}}").strip()
    v1 = Path(f"/sys/fs/cgroup/cpuacct{cgpath}/cpuacct.usage")
    v2 = Path(f"/sys/fs/cgroup{cgpath}/cpu.stat")
    try:
        if v1.is_file():
            return int(v1.read_text()) / 1e9
        if v2.is_file():
            for line in v2.read_text().splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        return None
    return None


# The relay's services whose CPU the bench reports apart (their processes live through a load).
PARTS = ("rspamd", "policy", "redis")
PROCS = r"""for p in /proc/[0-9]*; do
  s=$(cat $p/stat 2>/dev/null) || continue
  a=$(tr '\0\n ' '___' <$p/cmdline 2>/dev/null | cut -c1-80)
  echo "${p#/proc/} ${a:--} $s"
done"""


def parts_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far (utime + stime, /proc) by each process of PARTS on the relay."""
    out = bl.on("relay1", "sh", "-c", PROCS)
    procs = {}
    for line in out.splitlines():
        pid, cmd, stat = line.split(" ", 2)
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat.rsplit(")", 1)[-1].split()
        part = {"rspamd": "rspamd", "redis-server": "redis"}.get(comm)
        part = part or ("policy" if "smtpgw/policyd.py" in cmd else None)
        if part:
            procs[int(pid)] = (part, (int(rest[11]) + int(rest[12])) / 100.0)  # USER_HZ
    return procs


def parts_used(before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds of each of PARTS since `before` (a process started since counts whole)."""
    used = dict.fromkeys(PARTS, 0.0)
    for pid, (part, cpu) in parts_cpu().items():
        old = before.get(pid)
        used[part] += cpu - (old[1] if old and old[0] == part else 0.0)
    return used


def client_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------------
# The measurements


def wait_delivered(expected: int, timeout: float) -> tuple[int, float]:
    """Poll the sink until it holds `expected` messages; (count, monotonic time reached)."""
    deadline = time.monotonic() + timeout
    while True:
        count = sink_count()
        now = time.perf_counter()
        if count >= expected or time.monotonic() > deadline:
            return count, now
        time.sleep(0.25)


def wait_queue_empty(timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while relay_queue_size():
        if time.monotonic() > deadline:
            raise bl.BenchError(f"the queue of {RELAY.container} did not empty in {timeout:.0f} s")
        time.sleep(0.5)


def run_load(path: Entry, args: argparse.Namespace) -> Load:
    wait_queue_empty()  # nothing of an earlier run still on its way to the sink
    sink_clear()
    load = Load(path, args.messages)
    relay0, sink0, client0 = cpu_seconds(RELAY.container), cpu_seconds(MX.container), client_cpu()
    parts0 = parts_cpu()
    sender = Sender(load, args.sessions, args.per_session, args.size, args.time_limit)
    sender.run()
    load.delivered, reached = wait_delivered(load.accepted, timeout=120)
    load.drained = reached - sender.started
    relay1, sink1 = cpu_seconds(RELAY.container), cpu_seconds(MX.container)
    load.client_cpu = client_cpu() - client0
    load.parts = parts_used(parts0)
    if relay0 is not None and relay1 is not None:
        load.relay_cpu = relay1 - relay0
    if sink0 is not None and sink1 is not None:
        load.sink_cpu = sink1 - sink0
    return load


STEPS = (
    ("banner", "connect+banner"),  # with the TLS handshake on 465
    ("ehlo", "EHLO"),
    ("starttls", "STARTTLS+handshake"),
    ("ehlo_tls", "first EHLO in TLS"),
    ("auth", "AUTH PLAIN"),
    ("mail", "first message"),
)


@dataclass
class Probe:
    label: str
    steps: dict[str, list[float]]  # ms, one value a session

    def median(self, step: str) -> float | None:
        return statistics.median(self.steps[step]) if step in self.steps else None

    @property
    def totals(self) -> list[float]:
        return [sum(v) for v in zip(*self.steps.values(), strict=True)]


def setup_latency(path: Entry, ctx: ssl.SSLContext, count: int, size: int) -> Probe:
    """The time of each step of `count` sequential sessions, each sending one message."""
    steps: dict[str, list[float]] = {}
    version = "plain"
    for _ in range(count):
        marks: dict[str, float] = {}
        smtp = open_session(path, ctx, marks)
        if isinstance(smtp.sock, ssl.SSLSocket):
            version = smtp.sock.version() or "?"
        smtp.sendmail(SENDER, [RECIPIENT], message(size, "latency"))
        marks["mail"] = time.perf_counter()
        smtp.quit()
        order = ["start", *[k for k, _ in STEPS if k in marks]]
        for prev, step in itertools.pairwise(order):
            steps.setdefault(step, []).append((marks[step] - marks[prev]) * 1000)
    return Probe(f"{path.port} {version}", steps)


def latency_report(args: argparse.Namespace) -> None:
    ctx12 = tls_context(ssl.TLSVersion.TLSv1_2)
    probes = [
        setup_latency(PLAIN, tls_context(), args.probes, args.size),
        setup_latency(TLS_AUTH, tls_context(), args.probes, args.size),
        setup_latency(TLS_AUTH, ctx12, args.probes, args.size),
        setup_latency(IMPLICIT_AUTH, tls_context(), args.probes, args.size),
        setup_latency(IMPLICIT_AUTH, ctx12, args.probes, args.size),
    ]
    print(f"   {'median':<20}" + "".join(f"{p.label:>13}" for p in probes))
    for step, label in STEPS:
        cells = [p.median(step) for p in probes]
        print(f"   {label:<20}" + "".join(f"{fmt(c, '13.1f'):>13}" for c in cells))
    print(
        f"   {'session, median':<20}"
        + "".join(f"{statistics.median(p.totals):>13.1f}" for p in probes)
    )
    print(f"   {'session, slowest':<20}" + "".join(f"{max(p.totals):>13.1f}" for p in probes))
    # A step of 30 ms or more is no work of Postfix's: it is waiting (Nagle, delayed ACK).
    labels = dict(STEPS)
    print("   steps of 30 ms or more (stalls), in how many of the column's sessions:")
    for p in probes:
        slow = [
            f"{labels[step]} {sum(v >= 30 for v in values)}/{len(values)}"
            for step, values in p.steps.items()
            if any(v >= 30 for v in values)
        ]
        print(f"   {p.label:>14}: {', '.join(slow) or 'none'}")


# --------------------------------------------------------------------------------------------


def client_address() -> str:
    """This machine's address as the relay sees it (the source address towards it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((RELAY.ip, 25))
        return s.getsockname()[0]


def bench_tenant(client_ip: str) -> dict[str, str]:
    return {
        "bench": (
            "# The benchmark's tenant: a login for 587, and this machine as a network for 25.\n"
            "name: bench\n"
            "domains: [bench.test]\n"
            "users:\n"
            f"  - login: {SENDER}\n"
            f'    password: "{PASSWORD}"\n'
            "  # Only the `2588 no limits` path logs in with this one (never counted).\n"
            f"  - login: {NL_USER}\n"
            f'    password: "{PASSWORD}"\n'
            "  # Only the `2589 rspamd rl` path (--rspamd-ratelimit) logs in with this one.\n"
            f"  - login: {RL_USER}\n"
            f'    password: "{PASSWORD}"\n'
            f"networks: [{client_ip}/32]\n"
            "# Counted in Redis by rspamd on 587 (never reached in a bench run).\n"
            "limits: {messages_per_day: 10000000, messages_per_hour: 1000000}\n"
        )
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def per_msg_ms(cpu: float | None, n: int) -> float | None:
    return None if cpu is None or not n else cpu / n * 1000


def report(loads: list[Load], rounds: int, paths: list[Entry]) -> tuple[float, float]:
    head = (
        f"{'round':>5}  {'path':<13} {'msgs':>5} {'sess':>4} {'secs':>6} {'accepted/s':>10} "
        f"{'e2e/s':>7} {'relay CPU':>9} {'rspamd':>7} {'policy':>7} {'redis':>7} "
        f"{'sink CPU':>8} {'client CPU':>10}"
    )
    print(head)
    print(
        f"{'':>5}  {'':<13} {'':>5} {'':>4} {'':>6} {'':>10} {'':>7} {'ms/msg':>9} "
        f"{'ms/msg':>7} {'ms/msg':>7} {'ms/msg':>7} {'ms/msg':>8} {'ms/msg':>10}"
    )
    per_round = len(loads) // rounds
    for i, ld in enumerate(loads):
        print(
            f"{i // per_round + 1:>5}  {ld.path.label:<13} {ld.accepted:>5} {ld.sessions:>4} "
            f"{ld.seconds:>6.1f} {ld.rate:>10.1f} {ld.e2e_rate:>7.1f} "
            f"{fmt(per_msg_ms(ld.relay_cpu, ld.accepted), '9.2f'):>9} "
            + "".join(
                f"{fmt(per_msg_ms(ld.parts.get(part), ld.accepted), '7.2f'):>7} " for part in PARTS
            )
            + f"{fmt(per_msg_ms(ld.sink_cpu, ld.accepted), '8.2f'):>8} "
            f"{per_msg_ms(ld.client_cpu, ld.accepted) or 0:>10.2f}"
            + ("  (time limit reached)" if ld.time_bounded else "")
        )

    def total(path: Entry) -> tuple[float, float, float | None]:
        mine = [ld for ld in loads if ld.path == path]
        n = sum(ld.accepted for ld in mine)
        rate = n / sum(ld.seconds for ld in mine)
        e2e = sum(ld.delivered for ld in mine) / sum(ld.drained for ld in mine)
        cpus = [ld.relay_cpu for ld in mine]
        cpu = None if None in cpus else sum(c for c in cpus if c is not None) / n * 1000
        return rate, e2e, cpu

    print()
    bare_rate, bare_e2e, bare_cpu = total(BARE)
    for path in paths:
        rate, e2e, cpu = total(path)
        print(f"   {path.label:<13}: {rate:7.1f} accepted/s, {e2e:7.1f} end to end/s")
    for path in paths:
        if path == BARE:
            continue
        rate, e2e, cpu = total(path)
        print(
            f"   ratio {path.label} / bare: accepted/s {rate / bare_rate:.2f}, "
            f"end to end/s {e2e / bare_e2e:.2f}"
            + (
                f", relay CPU per message {cpu / bare_cpu:.2f}x ({cpu:.2f} vs {bare_cpu:.2f} ms)"
                if cpu and bare_cpu
                else ""
            )
        )
        ratios = []
        for rnd in range(rounds):
            mine = loads[rnd * per_round : (rnd + 1) * per_round]
            a = next(ld for ld in mine if ld.path == path)
            b = next(ld for ld in mine if ld.path == BARE)
            ratios.append(a.rate / b.rate)
        if rounds > 1:
            print("      per round (accepted/s): " + ", ".join(f"{r:.2f}" for r in ratios))
    full, no_limits = total_rate(loads, TLS_AUTH), total_rate(loads, NO_LIMITS)
    print(
        f"   sending limits (587 full against 2588 no limits): {full / no_limits:.3f}, "
        f"a cost of {(1 - full / no_limits) * 100:.1f} % of accepted/s"
    )
    print_round_ratios(loads, rounds, TLS_AUTH, NO_LIMITS)
    print_cpu_by_part(loads, [NO_LIMITS, *([LOOK_ONLY] if LOOK_ONLY in paths else []), TLS_AUTH])
    if LOOK_ONLY in paths:
        look = total_rate(loads, LOOK_ONLY)
        print(
            f"   the look at RCPT alone (587 look only against 2588): {look / no_limits:.3f}; "
            f"rspamd's count (587 full against 587 look only): {full / look:.3f}"
        )
        print_round_ratios(loads, rounds, LOOK_ONLY, NO_LIMITS, "look only / 2588")
        print_round_ratios(loads, rounds, TLS_AUTH, LOOK_ONLY, "full / look only")
    return full, bare_rate


def print_cpu_by_part(loads: list[Load], paths: list[Entry]) -> None:
    """Relay CPU a message over all rounds, whole and by part, of `paths`, and what each path
    adds to the one before it (less noisy than accepted/s: CPU is what the limits cost here)."""
    rows = []
    for path in paths:
        mine = [ld for ld in loads if ld.path == path]
        n = sum(ld.accepted for ld in mine)
        if None in (ld.relay_cpu for ld in mine):
            return
        row = {"relay": sum(ld.relay_cpu or 0.0 for ld in mine) / n * 1000}
        row |= {part: sum(ld.parts.get(part, 0.0) for ld in mine) / n * 1000 for part in PARTS}
        rows.append((path, row))
    print(
        "   relay CPU a message, all rounds (ms): "
        + "; ".join(
            f"{path.label} {row['relay']:.2f} ("
            + ", ".join(f"{part} {row[part]:.3f}" for part in PARTS)
            + ")"
            for path, row in rows
        )
    )
    for (prev, a), (path, b) in itertools.pairwise(rows):
        print(
            f"      {path.label} less {prev.label}: {b['relay'] - a['relay']:+.2f} ms "
            f"({(b['relay'] / a['relay'] - 1) * 100:+.1f} %; "
            + ", ".join(f"{part} {b[part] - a[part]:+.3f}" for part in PARTS)
            + ")"
        )


def print_round_ratios(
    loads: list[Load], rounds: int, a: Entry, b: Entry, label: str = "per round"
) -> None:
    """Accepted/s of `a` over `b`, round by round, and their median."""
    if rounds < 2:
        return
    per_round = len(loads) // rounds
    ratios = [
        next(ld for ld in mine if ld.path == a).rate / next(ld for ld in mine if ld.path == b).rate
        for mine in (loads[r * per_round : (r + 1) * per_round] for r in range(rounds))
    ]
    print(
        f"      {label}: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f" (median {statistics.median(ratios):.3f})"
    )


def total_rate(loads: list[Load], path: Entry) -> float:
    """Accepted messages/s of a path over all its rounds."""
    mine = [ld for ld in loads if ld.path == path]
    return sum(ld.accepted for ld in mine) / sum(ld.seconds for ld in mine)


# Run inside the relay: CLIENTS concurrent connections to the policy service's socket, each
# sending PAIRS requests as Postfix does for a one-recipient message (its RCPT, a new message
# each time), as the bench tenant's login; prints requests, seconds and refusals as JSON.
POLICY_CLIENT = """
import asyncio, json, time, uuid
SOCKET, LOGIN, CLIENTS, PAIRS = %r, %r, %d, %d

def request(state, instance):
    return ("request=smtpd_access_policy\\nprotocol_state=%%s\\nprotocol_name=ESMTP\\n"
            "client_address=10.0.0.1\\nsasl_username=%%s\\ninstance=%%s\\nqueue_id=Q%%s\\n"
            "recipient=sink@dest.test\\n\\n" %% (state, LOGIN, instance, instance)).encode()

async def client(results):
    reader, writer = await asyncio.open_unix_connection(SOCKET)
    for _ in range(PAIRS):
        instance = uuid.uuid4().hex[:12]
        writer.write(request("RCPT", instance))
        await writer.drain()
        reply = (await reader.readuntil(b"\\n\\n")).decode()
        results["requests"] += 1
        if reply.strip() != "action=DUNNO":
            results["refused"] += 1
            results["last"] = reply.strip()
    writer.close()

async def main():
    results = {"requests": 0, "refused": 0, "last": ""}
    started = time.monotonic()
    await asyncio.gather(*(client(results) for _ in range(CLIENTS)))
    results["seconds"] = time.monotonic() - started
    print(json.dumps(results))

asyncio.run(main())
"""


def policy_service_rate(clients: int, pairs: int) -> dict:
    """The policy service alone, on the relay: requests/s from `clients` concurrent clients."""
    import json

    script = POLICY_CLIENT % (POLICY_SOCKET, SENDER, clients, pairs)
    proc = bl.LAB.podman.run(
        "exec", "-i", RELAY.container, "python3", "-", stdin=script, timeout=600
    )
    return json.loads(proc.stdout)


POLICY_SOCKET = "/var/spool/postfix/smtpgw-policy/policy.sock"
BENCH_COUNTER = "smtpgw:limits:tenant:bench"
POLICY_RESET = REDIS_CLI + f"DEL {BENCH_COUNTER} >/dev/null"
# The counter script as rspamd runs it for a message (commit 1, the bench tenant's limits), by
# redis-benchmark: CLIENTS connections, REQUESTS runs, a random member each.
COUNT_BENCH = (
    "set -e\n"
    'pw=$(python3 -c \'import json; print(json.load(open("/etc/smtpgw/policy.json"))'
    '["redis"]["password"])\')\n'
    'sha=$(redis-cli --no-auth-warning -a "$pw" SCRIPT LOAD '
    '"$(cat /usr/local/lib/smtpgw/limits_count.lua)")\n'
    'redis-benchmark -a "$pw" -q -c %d -n %d -r 100000000 '
    'EVALSHA "$sha" 1 smtpgw:limits:tenant:benchcount m:__rand_int__ 1 10000000 1000000\n'
    'redis-cli --no-auth-warning -a "$pw" DEL smtpgw:limits:tenant:benchcount >/dev/null\n'
)


def count_script_rate(clients: int, requests: int) -> float:
    """Runs of the counter script a second in the relay's Redis, `clients` at once."""
    import re

    out = bl.on("relay1", "sh", "-c", COUNT_BENCH % (clients, requests))
    found = re.search(r"([\d.]+) requests per second", out)
    if not found:
        raise bl.BenchError(f"redis-benchmark said: {out[-300:]}")
    return float(found.group(1))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1000 messages, 1 round, 10 probes")
    p.add_argument("--messages", type=int, help="messages per path and round (default 2000)")
    p.add_argument("--rounds", type=int, help="rounds, each path once a round (default 3)")
    p.add_argument("--sessions", type=int, default=10, help="parallel sessions (default 10)")
    p.add_argument("--per-session", type=int, default=20, help="messages a session (default 20)")
    p.add_argument("--size", type=int, default=5 * 1024, help="message size, bytes (default 5120)")
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds per path and round")
    p.add_argument("--probes", type=int, help="sequential sessions per latency probe (default 30)")
    p.add_argument("--keep", action="store_true", help="leave the bench lab running afterwards")
    p.add_argument(
        "--rspamd-ratelimit",
        action="store_true",
        help="a fifth path: rspamd's ratelimit module in place of the policy service",
    )
    p.add_argument(
        "--split-limits",
        action="store_true",
        help="a path more: 587 with the look at RCPT but not rspamd's count",
    )
    p.add_argument(
        "--policy-clients", type=int, default=50, help="concurrent clients of the policy service"
    )
    p.add_argument(
        "--policy-pairs", type=int, default=200, help="requests a client of the counting parts"
    )
    args = p.parse_args(argv)
    args.messages = args.messages or (1000 if args.quick else 2000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.probes = args.probes or (10 if args.quick else 30)
    if min(args.messages, args.rounds, args.sessions, args.per_session, args.probes) < 1:
        p.error("counts must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    rerun = bl.rerun_command("bench_throughput.py", argv)
    print(
        f"smtpgw bench: relay throughput, the full path on 587 against a bare smtpd\nrerun: {rerun}"
    )
    print(f"source: {bl.source_version()}")
    started = time.monotonic()
    try:
        with bl.BenchLab(["dns1", "relay1", "mx1"], keep=args.keep):
            bl.section("Lab services and the gateway (playbooks/lab.yml, playbooks/site.yml)")
            client_ip = client_address()
            bl.write_tenants(bench_tenant(client_ip))
            for playbook in ("lab.yml", "site.yml"):
                run = bl.run_playbook(playbook)
                bl.log(f"{playbook}: {run.seconds:.0f} s")
            bl.log(f"tenant 'bench': login {SENDER}, network {client_ip}/32 (this machine)")

            bl.section(f"The bench's own smtpd services on {RELAY.container} (for the bench only)")
            paths = LOAD_PATHS + ([RSPAMD_RL] if args.rspamd_ratelimit else [])
            paths += [LOOK_ONLY] if args.split_limits else []
            services = (*BENCH_SERVICES, copy_of_587(NO_LIMITS.port))
            services += (copy_of_587(RSPAMD_RL.port),) if args.rspamd_ratelimit else ()
            for service in services:
                bl.on("relay1", "postconf", "-M", "-e", service)
                bl.log(service)
            bl.on("relay1", "postfix", "reload")
            bl.on("relay1", "sh", "-c", NO_LIMITS_SETUP)
            bl.log(f"2588 logs in as {NL_USER}: rspamd's count (SMTPGW_LIMITS) skips it")
            if args.rspamd_ratelimit:
                bl.on("relay1", "sh", "-c", RSPAMD_RL_SETUP)
                bl.log(f"rspamd's ratelimit module: {RL_USER}'s messages counted in Redis")
            time.sleep(1)

            bl.section(f"Sink: smtp-sink on {MX.container} port 25 instead of Postfix")
            sink_start()
            # One message each way.
            checks = [(BARE, 0), (NO_MILTER, 0), (TLS_AUTH, 2), (NO_LIMITS, 2)]
            checks += [(RSPAMD_RL, 2)] if args.rspamd_ratelimit else []
            checks += [(LOOK_ONLY, 2)] if args.split_limits else []
            for path, signatures in checks:
                sink_clear()
                smtp = open_session(path, tls_context())
                smtp.sendmail(SENDER, [RECIPIENT], message(args.size, "check"))
                smtp.quit()
                got, _ = wait_delivered(1, timeout=30)
                if got != 1:
                    raise bl.BenchError(f"{path.label}: the test message never reached the sink")
                found = sink_signatures()
                if found != signatures:
                    raise bl.BenchError(
                        f"{path.label}: {found} DKIM-Signature header(s) at the sink, not "
                        f"{signatures}"
                    )
            bl.log("one message by each path reached the sink: 587 signed twice, the others not")

            bl.section(f"Session set-up: {args.probes} sequential sessions a column (ms)")
            latency_report(args)

            bl.section(
                f"Load: {args.messages} x {args.size} B messages per path and round, "
                f"{args.sessions} sessions of {args.per_session} messages, {args.rounds} round(s)"
            )
            loads: list[Load] = []
            bl.on("relay1", "sh", "-c", POLICY_RESET)
            for rnd in range(args.rounds):
                shift = rnd % len(paths)
                order = paths[shift:] + paths[:shift]
                for path in order:
                    load = run_load(path, args)
                    setup_ms = statistics.median(load.setup) * 1000 if load.setup else 0.0
                    bl.log(
                        f"round {rnd + 1} {path.label}: {load.accepted} accepted in "
                        f"{load.seconds:.1f} s, {load.delivered} at the sink after "
                        f"{load.drained:.1f} s; session set-up under load {setup_ms:.1f} ms median"
                    )
                    loads.append(load)
                    if load.errors:
                        raise bl.BenchError(
                            f"{path.label}: {len(load.errors)} error(s), first: {load.errors[0]}"
                        )
                    if load.delivered < load.accepted:
                        raise bl.BenchError(
                            f"{path.label}: {load.accepted} accepted but only {load.delivered} "
                            f"reached the sink; see `postqueue -p` on {RELAY.container}"
                        )
            wait_queue_empty(timeout=30)
            # 587's messages, and no others, were counted (by rspamd at the end of DATA).
            counted = int(bl.on("relay1", "sh", "-c", REDIS_CLI + f"ZCARD {BENCH_COUNTER}"))
            full_accepted = sum(ld.accepted for ld in loads if ld.path == TLS_AUTH)
            if counted != full_accepted:
                raise bl.BenchError(
                    f"{counted} message(s) counted in Redis, not the {full_accepted} of 587 full"
                )
            bl.log(f"counted in Redis: {counted}, the messages 587 full accepted")
            bl.section("Results (same run, same relay, same onward path)")
            report(loads, args.rounds, paths)
            if args.rspamd_ratelimit:
                # rspamd's module really counted: its buckets are in the relay's Redis.
                buckets = bl.on("relay1", "sh", "-c", REDIS_CLI + "--scan --pattern 'RL*'")
                if len(buckets.split()) != 1:
                    raise bl.BenchError(
                        f"rspamd's ratelimit module left {len(buckets.split())} bucket(s) in "
                        f"Redis, not one ({RL_USER}'s)"
                    )
                rl, nolim = total_rate(loads, RSPAMD_RL), total_rate(loads, NO_LIMITS)
                full = total_rate(loads, TLS_AUTH)
                print(
                    f"   rspamd ratelimit (2589 against 2588 no limits): {rl / nolim:.3f}, "
                    f"a cost of {(1 - rl / nolim) * 100:.1f} % of accepted/s; "
                    f"the policy service against it (587 full / 2589): {full / rl:.3f}; "
                    f"{len(buckets.split())} bucket(s) in Redis"
                )

            bl.section(
                f"The counting parts alone, {args.policy_clients} concurrent clients, on "
                f"{RELAY.container}"
            )
            # The bench tenant's counter holds every message of this run: start it empty.
            bl.on("relay1", "sh", "-c", POLICY_RESET)
            got = policy_service_rate(args.policy_clients, args.policy_pairs)
            print(
                f"   the policy service (a message's first RCPT each, the bench tenant far below "
                f"its limits): {got['requests']} requests in {got['seconds']:.2f} s: "
                f"{got['requests'] / got['seconds']:.0f} requests/s, {got['refused']} refused"
            )
            if got["refused"]:
                raise bl.BenchError(f"the policy service refused: {got['last']}")
            rate = count_script_rate(args.policy_clients, args.policy_pairs * args.policy_clients)
            print(
                f"   the counter script in the relay's Redis (rspamd's count of a message, "
                f"redis-benchmark): {rate:.0f} requests/s"
            )
    except (bl.BenchError, OSError, smtplib.SMTPException, ssl.SSLError) as exc:
        return bl.fail(f"{exc}\nrerun: {rerun}")
    except KeyboardInterrupt:
        return bl.fail("interrupted; the bench lab was removed")
    print(f"\nfinished in {time.monotonic() - started:.0f} s; playbook logs in {bl.LOGS}")
    print(f"rerun: {rerun}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
