#!/usr/bin/env python3
"""Controller time to load, validate and hash the tenants: first run and rerun, with the cache.

No lab needed. For 1 and 1,000 generated tenants (the bench_deploy ones: a domain, one login
with a literal password, one /32 network each), in a temporary directory, it times what the
smtpgw_tenants action does besides templating (read the files, validate, hash the passwords):
a first run with an empty password cache, a second run (nothing changed), and a run without
the cache. Each run uses a fresh cache object, as each ansible-playbook run does.

    PYTHONPATH=src .venv/bin/python bench/bench_tenant_hashing.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchlab as bl  # also puts this checkout's src/ first
from smtpgw import passwords
from smtpgw.password_cache import PasswordCache, hash_passwords
from smtpgw.tenant_files import load_tenant_dir
from smtpgw.tenant_schema import validate_tenants

SALT_KEY = "bench"


def one_run(directory: Path, cache_dir: Path | None) -> tuple[float, int, int]:
    """Seconds for load + validate + hash, hashes made, cache writes."""
    made = 0

    def counting_hash(login: str, password: str, salt_key: str) -> str:
        nonlocal made
        made += 1
        return passwords.dovecot_hash(login, password, salt_key)

    started = time.perf_counter()
    result = validate_tenants(load_tenant_dir(directory))
    result.raise_for_errors()
    cache = PasswordCache(cache_dir) if cache_dir else None
    hash_passwords(result.tenants, SALT_KEY, cache=cache, hasher=counting_hash)
    elapsed = time.perf_counter() - started
    return elapsed, made, cache.writes if cache else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="reruns to take the median of")
    args = parser.parse_args()
    print(f"glibc crypt in use: {passwords._crypt is not None}")
    print(f"{'tenants':>8} {'run':<22} {'seconds':>9} {'hashes':>7} {'writes':>7}")
    with tempfile.TemporaryDirectory(prefix="smtpgw-bench-") as tmp:
        for count in (1, 1000):
            directory = Path(tmp) / f"tenants-{count}"
            directory.mkdir()
            for name, text in bl.generated_tenants(count).items():
                (directory / f"{name}.yml").write_text(text)
            cache_dir = Path(tmp) / f"cache-{count}"
            rows = [("first run, empty cache", one_run(directory, cache_dir))]
            reruns = [one_run(directory, cache_dir) for _ in range(args.repeat)]
            rows.append((f"rerun (median of {args.repeat})", _median(reruns)))
            uncached = [one_run(directory, None) for _ in range(args.repeat)]
            rows.append(("no cache", _median(uncached)))
            for label, (seconds, made, writes) in rows:
                print(f"{count:>8} {label:<22} {seconds:>9.3f} {made:>7} {writes:>7}")
    print("rerun: PYTHONPATH=src .venv/bin/python bench/bench_tenant_hashing.py")
    return 0


def _median(runs: list[tuple[float, int, int]]) -> tuple[float, int, int]:
    return (statistics.median(r[0] for r in runs), max(r[1] for r in runs), max(r[2] for r in runs))


if __name__ == "__main__":
    sys.exit(main())
