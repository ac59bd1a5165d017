"""DKIM keys of the tenant domains: made once on the controller, kept beside the inventory.

Every tenant domain is signed twice, with an RSA-2048 key and an Ed25519 key, each under a
selector of its own. The key store is one directory (``relay_dkim_keys_dir``, mode 0700) holding,
for each domain and selector:

- ``<domain>.<selector>.key``: the private key, PKCS#8 PEM, mode 0600 (``openssl pkey`` reads it;
  ``ansible-vault encrypt`` may encrypt it in place, the action plugin decrypts it);
- ``<domain>.<selector>.txt``: the public key as the value of the DNS TXT record
  ``<selector>._domainkey.<domain>`` (``v=DKIM1; k=rsa; p=...``), one line, for the DNS work.

A key is made only when its file is missing: a rerun never replaces one. This module holds the
pure parts (making, reading and converting keys, names, checks of modes); the action plugin
``smtpgw_dkim_keys`` does the file I/O on the controller.

rspamd 3.4 reads RSA keys in PEM but Ed25519 keys only in the form ``rspamadm dkim_keygen -t
ed25519`` writes: base64 of the 64-byte libsodium secret key (the 32-byte seed, then the 32-byte
public key), on one line. ``rspamd_private`` gives each key in the form rspamd reads.
"""

from __future__ import annotations

import base64
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

__all__ = [
    "ALGORITHMS",
    "DEFAULT_SELECTORS",
    "KeyProblem",
    "KeySpec",
    "generate",
    "key_specs",
    "load_private",
    "mode_problem",
    "rspamd_private",
    "txt_value",
]

#: The two signatures of every domain, in signing order.
ALGORITHMS = ("rsa", "ed25519")
#: Selectors when the inventory names none (``relay_dkim_selectors``).
DEFAULT_SELECTORS = {"rsa": "smtpgw-rsa", "ed25519": "smtpgw-ed25519"}
RSA_BITS = 2048


class KeyProblem(ValueError):
    """A key file that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class KeySpec:
    """One key of one domain: where it lives (a file name in the store, and on the relay)."""

    domain: str
    selector: str
    algorithm: str

    @property
    def stem(self) -> str:
        return f"{self.domain}.{self.selector}"

    @property
    def key_file(self) -> str:
        return f"{self.stem}.key"

    @property
    def txt_file(self) -> str:
        return f"{self.stem}.txt"


def key_specs(
    domains: Iterable[str],
    selectors: Mapping[str, str],
    per_domain: Mapping[str, Iterable[Mapping[str, str]]] | None = None,
) -> list[KeySpec]:
    """Every key the domains need: one per domain and algorithm, sorted by domain.

    ``per_domain``: domain -> the selector pairs it uses instead of ``selectors`` (a domain in a
    DKIM rotation, :mod:`smtpgw.dkim_rotation`: one pair to sign with, two while both records
    are published)."""
    per_domain = per_domain or {}
    specs = []
    for domain in sorted(set(domains)):
        for pair in per_domain.get(domain) or [selectors]:
            specs += _pair_specs(domain, pair)
    return specs


def _pair_specs(domain: str, selectors: Mapping[str, str]) -> list[KeySpec]:
    missing = [a for a in ALGORITHMS if not selectors.get(a)]
    if missing:
        raise KeyProblem(f"relay_dkim_selectors: no selector for {', '.join(missing)}; name one")
    if selectors["rsa"] == selectors["ed25519"]:
        raise KeyProblem(
            f"relay_dkim_selectors: rsa and ed25519 both use '{selectors['rsa']}'; "
            "each key needs a selector of its own"
        )
    return [KeySpec(domain, str(selectors[algorithm]), algorithm) for algorithm in ALGORITHMS]


def generate(algorithm: str) -> bytes:
    """A new private key, PKCS#8 PEM (unencrypted: the store's modes, or vault, protect it)."""
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"unknown DKIM key algorithm {algorithm!r}")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def load_private(data: bytes, algorithm: str, shown: str) -> PrivateKey:
    """The private key in ``data`` (PEM), checked to be of ``algorithm``; ``shown`` names it."""
    fix = (
        "restore it from a backup, or delete it to have a new key made "
        f"(and publish the new {shown.removesuffix('.key')}.txt)"
    )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        reason = str(exc).split("\n")[0] or "not a PEM private key"
        raise KeyProblem(f"{shown}: cannot read the private key ({reason}); {fix}") from None
    if algorithm == "rsa" and isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise KeyProblem(f"{shown}: RSA key of {key.key_size} bits is too short; {fix}")
        return key
    if algorithm == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise KeyProblem(f"{shown}: holds a {type(key).__name__}, not an {algorithm} key; {fix}")


def rspamd_private(key: PrivateKey) -> str:
    """The private key in the form rspamd 3.4 reads: PEM for RSA, base64 seed+public for Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(seed + public).decode() + "\n"
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def txt_value(key: PrivateKey) -> str:
    """The DKIM record's value (RFC 6376 3.6.1; RFC 8463 for Ed25519), unchunked."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def mode_problem(shown: str, mode: int, directory: bool) -> str | None:
    """Why a store directory or private key file with ``mode`` (st_mode) may not be used."""
    if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
        kind = "a directory" if directory else "a regular file"
        return f"{shown}: is not {kind}; move it away (the key store holds only key files)"
    open_bits = stat.S_IMODE(mode) & 0o077
    if not open_bits:
        return None
    want = "0700" if directory else "0600"
    who = "everyone" if open_bits & 0o007 else "its group"
    return (
        f"{shown}: mode {stat.S_IMODE(mode):04o} lets {who} read or change the DKIM private keys; "
        f"run `chmod {want} {shown}`{'' if not directory else ' and chmod 0600 the files in it'}"
        " (and make new keys if others may have copied them)"
    )
