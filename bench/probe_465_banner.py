#!/usr/bin/env python3
"""Where a 465 session's set-up time goes: the wait for the banner after the TLS handshake.

Against a running relay (the lab's, or a Molecule scenario's), sequential sessions of three kinds:
587 with STARTTLS (TCP, banner, EHLO, STARTTLS, handshake, EHLO), and 465 (TCP, handshake, banner,
EHLO) through Python's smtplib.SMTP_SSL and through the project's client (smtpgw.smtpclient's
ImplicitTLS, which acknowledges the server's last handshake flight at once). Prints the median,
fastest and slowest set-up of each and how many sessions stalled (30 ms or more), for TLS 1.3 and
1.2. Not a bench_*.py: it needs a relay to be running and starts none (`make bench` skips it).

    python bench/probe_465_banner.py --relay 10.89.60.11 --ca .lab/pki/ca.crt
"""

from __future__ import annotations

import argparse
import smtplib
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from smtpgw.smtpclient import ImplicitTLS


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--relay", required=True, help="the relay's address")
    p.add_argument("--name", default="relay1.lab.test", help="name on its certificate")
    p.add_argument("--ca", required=True, help="CA file that issued its certificate")
    p.add_argument("--sessions", type=int, default=30, help="sessions a column (default 30)")
    args = p.parse_args(argv)

    def context(version: ssl.TLSVersion | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=args.ca)
        if version is not None:
            ctx.maximum_version = version
        return ctx

    def starttls(ctx: ssl.SSLContext) -> smtplib.SMTP:
        smtp = smtplib.SMTP(timeout=30, local_hostname="probe.test")
        smtp.connect(args.relay, 587)
        smtp._host = args.name
        smtp.ehlo()
        smtp.starttls(context=ctx)
        smtp.ehlo()
        return smtp

    def implicit(cls: type[smtplib.SMTP_SSL]) -> Callable[[ssl.SSLContext], smtplib.SMTP]:
        def open_(ctx: ssl.SSLContext) -> smtplib.SMTP:
            smtp = cls(timeout=30, local_hostname="probe.test", context=ctx)
            smtp._host = args.name
            smtp.connect(args.relay, 465)
            smtp.ehlo()
            return smtp

        return open_

    kinds = [
        ("587 STARTTLS", starttls),
        ("465 smtplib.SMTP_SSL", implicit(smtplib.SMTP_SSL)),
        ("465 smtpgw ImplicitTLS", implicit(ImplicitTLS)),
    ]
    print(f"{args.sessions} sequential sessions a row, set-up in ms (TCP to the first EHLO's reply")
    print("in TLS); a stall is a session of 30 ms or more\n")
    print(f"{'':<24}{'TLS':>5}{'median':>9}{'fastest':>9}{'slowest':>9}{'stalls':>8}")
    for version, label in ((None, "1.3"), (ssl.TLSVersion.TLSv1_2, "1.2")):
        ctx = context(version)
        for name, open_session in kinds:
            times = []
            for _ in range(args.sessions):
                start = time.perf_counter()
                smtp = open_session(ctx)
                times.append((time.perf_counter() - start) * 1000)
                smtp.quit()
            stalls = sum(t >= 30 for t in times)
            print(
                f"{name:<24}{label:>5}{statistics.median(times):>9.1f}{min(times):>9.1f}"
                f"{max(times):>9.1f}{stalls:>5}/{len(times)}"
            )
    print(f"\nrerun: python bench/probe_465_banner.py {' '.join(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
