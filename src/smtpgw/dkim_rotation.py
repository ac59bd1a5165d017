"""Staged DKIM key rotation: the state of one domain's cycle and what follows from it (pure).

A rotation replaces both keys of a domain (RSA and Ed25519) together: the domain moves from its
old pair of selectors to a new pair, ``<base>-r<N>`` for generation N (``smtpgw-rsa-r1``,
``smtpgw-ed25519-r1``; the bases are ``relay_dkim_selectors``). The cycle goes through these
phases, each computed from the stored :class:`Rotation`, the time and the inventory's relays:

``publish``
    The new keys exist; their records are published beside the old ones. Relays sign with the
    old keys. Waits for the new records at every authoritative server of the zone (observed by
    ``playbooks/dns.yml`` or ``smtpgw dkim rotate --continue``; it records the time and the
    largest TTL seen on the old and new records).
``propagate``
    Seen everywhere; waits until that time plus the TTL, so no resolver still holds an answer
    from before.
``switch``
    Relays may sign with the new keys: a ``playbooks/site.yml`` run switches each relay and
    records it. Waits for every relay of the inventory.
``grace``
    Every relay signs with the new keys; the old records stay until the last switch plus the
    grace period (set when the cycle starts), for mail signed before the switch still in flight.
``retire``
    The old records are no longer wanted; waits for them to be gone from every authoritative
    server (observed as above; the old key files are then removed from the store).
``done``
    Only the new records remain. The state file stays: it names the domain's selectors, and the
    next cycle starts from them.

The I/O (the state files in the key store, DNS observations, the commands) is in
:mod:`smtpgw.dkim_rotation_ops`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .dkim_keys import ALGORITHMS

__all__ = [
    "DEFAULT_GRACE",
    "PHASES",
    "Rotation",
    "RotationProblem",
    "Status",
    "from_json",
    "start",
    "status",
    "to_json",
]

#: Grace period when neither ``--grace`` nor ``smtpgw_dkim_rotation_grace`` names one: 7 days.
DEFAULT_GRACE = 7 * 24 * 3600
PHASES = ("publish", "propagate", "switch", "grace", "retire", "done")
FORMAT = 1


class RotationProblem(ValueError):
    """A rotation that cannot start or go on; the message says why and what to do."""


@dataclass
class Rotation:
    """One domain's cycle as stored (``<domain>.rotation.json`` in the key store)."""

    domain: str
    generation: int
    old: dict[str, str]
    new: dict[str, str]
    grace: int
    started: float
    published: float | None = None  # new records first seen at every authoritative server
    ttl: int = 0  # the largest TTL seen on the old and new records then
    switched: dict[str, float] = field(default_factory=dict)  # relay -> when it switched
    retired: float | None = None  # old records seen gone everywhere


@dataclass
class Status:
    """Where a cycle is: its phase, the selectors to sign with and to publish, what it waits for."""

    domain: str
    phase: str
    signing: dict[str, str]
    publish: list[dict[str, str]]
    waits_for: str
    not_before: float | None  # when the wait ends by time alone (None: waits for an event)
    pending_relays: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _selectors(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or any(not value.get(a) for a in ALGORITHMS):
        raise RotationProblem(f"{where}: needs a selector for each of {', '.join(ALGORITHMS)}")
    return {a: str(value[a]) for a in ALGORITHMS}


def start(
    domain: str,
    current: Rotation | None,
    base: Mapping[str, str],
    grace: int,
    now: float,
) -> Rotation:
    """A new cycle for ``domain``, from its finished one (``current``) or the base selectors."""
    if grace < 0:
        raise RotationProblem(f"{domain}: grace period {grace} s is negative; give seconds >= 0")
    if current is not None and current.retired is None:
        raise RotationProblem(
            f"{domain}: a rotation (generation {current.generation}) is under way; go on with "
            "`smtpgw dkim rotate --continue` and the playbooks, see `smtpgw dkim status`"
        )
    base = _selectors(base, "relay_dkim_selectors")
    old = dict(current.new) if current else dict(base)
    generation = (current.generation if current else 0) + 1
    new = {a: f"{base[a]}-r{generation}" for a in ALGORITHMS}
    if set(new.values()) & set(old.values()):
        raise RotationProblem(
            f"{domain}: the new selectors {sorted(new.values())} equal the old ones; change "
            "relay_dkim_selectors or remove the state file to start afresh"
        )
    return Rotation(domain, generation, old, new, int(grace), float(now))


def status(rotation: Rotation, now: float, relays: Iterable[str]) -> Status:
    """The phase of ``rotation`` at ``now`` for the inventory's ``relays``."""
    old, new = dict(rotation.old), dict(rotation.new)
    both = [old, new]

    def at(
        phase: str,
        signing: dict[str, str],
        publish: list[dict[str, str]],
        waits: str,
        until: float | None = None,
        pending: list[str] | None = None,
    ) -> Status:
        return Status(rotation.domain, phase, signing, publish, waits, until, pending or [])

    if rotation.retired is not None:
        return at("done", new, [new], "nothing (the cycle is complete)")
    if rotation.published is None:
        return at(
            "publish",
            old,
            both,
            "the new records at every authoritative server "
            "(run playbooks/dns.yml or `smtpgw dkim rotate --continue`)",
        )
    switch_at = rotation.published + rotation.ttl
    if now < switch_at:
        return at(
            "propagate",
            old,
            both,
            f"the old records' TTL ({rotation.ttl} s) to pass since the new ones were seen",
            switch_at,
        )
    relays = sorted(set(relays))
    pending = [r for r in relays if r not in rotation.switched]
    if pending:
        return at(
            "switch",
            new,
            both,
            f"playbooks/site.yml to switch relay(s) {', '.join(pending)} to the new selectors",
            None,
            pending,
        )
    last = max([rotation.switched[r] for r in relays] or [switch_at])
    retire_at = last + rotation.grace
    if now < retire_at:
        return at(
            "grace",
            new,
            both,
            f"the grace period ({rotation.grace} s) to pass since the last relay switched",
            retire_at,
        )
    return at(
        "retire",
        new,
        [new],
        "the old records to be gone from every authoritative server "
        "(run playbooks/dns.yml or `smtpgw dkim rotate --continue`)",
    )


def to_json(rotation: Rotation) -> str:
    return json.dumps({"format": FORMAT, **asdict(rotation)}, indent=2, sort_keys=True) + "\n"


def from_json(text: str, shown: str) -> Rotation:
    """A stored rotation; ``shown`` names the file in errors."""
    fix = "restore it from a backup, or remove it (the domain then signs with relay_dkim_selectors)"
    try:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"not format {FORMAT}")
        rotation = Rotation(**data)
        rotation.old = _selectors(rotation.old, f"{shown}: old")
        rotation.new = _selectors(rotation.new, f"{shown}: new")
        rotation.switched = {str(k): float(v) for k, v in dict(rotation.switched).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise RotationProblem(f"{shown}: not a DKIM rotation state ({exc}); {fix}") from None
    return rotation
