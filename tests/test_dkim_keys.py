"""DKIM keys: made in the forms the store and rspamd want, read back, checked."""

from __future__ import annotations

import base64
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from smtpgw.dkim_keys import (
    KeyProblem,
    generate,
    key_specs,
    load_private,
    mode_problem,
    rspamd_private,
    txt_value,
)

# Made by `rspamadm dkim_keygen -t ed25519 -d x.test -s s1` (rspamd 3.4) on a lab relay: the
# private key file and the p= of the record it printed.
RSPAMADM_ED25519 = (
    "x0+ns3cUaCyT91RLn2zS2QjH6I5wB2YBMw1HEB3ZqyLuUjbdJIaXP8Bp1R6DzjbYqH/2SJCnYsdjgdB465FmlA=="
)
RSPAMADM_ED25519_P = "7lI23SSGlz/AadUeg8422Kh/9kiQp2LHY4HQeOuRZpQ="


def test_rsa_key_is_2048_bit_pkcs8_pem():
    pem = generate("rsa")
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = load_private(pem, "rsa", "d.s.key")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert rspamd_private(key).startswith("-----BEGIN RSA PRIVATE KEY-----\n")


def test_ed25519_key_for_rspamd_is_base64_of_seed_and_public_key():
    key = load_private(generate("ed25519"), "ed25519", "d.s.key")
    text = rspamd_private(key)
    assert text.endswith("\n") and "\n" not in text[:-1]
    raw = base64.b64decode(text)
    assert len(raw) == 64
    again = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
    public = again.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert raw[32:] == public
    assert txt_value(key) == f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"


def test_ed25519_form_matches_rspamadm_output():
    """rspamadm's own key, read as seed + public key, gives the record rspamadm printed."""
    raw = base64.b64decode(RSPAMADM_ED25519)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
    assert rspamd_private(key) == RSPAMADM_ED25519 + "\n"
    assert txt_value(key) == f"v=DKIM1; k=ed25519; p={RSPAMADM_ED25519_P}"


def test_rsa_txt_value_is_the_spki_der():
    key = load_private(generate("rsa"), "rsa", "d.s.key")
    value = txt_value(key)
    assert value.startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")
    der = base64.b64decode(value.split("p=", 1)[1])
    assert (
        serialization.load_der_public_key(der).public_numbers() == key.public_key().public_numbers()
    )


def test_wrong_or_broken_keys_are_named_with_a_fix():
    with pytest.raises(KeyProblem, match=r"^store/a\.test\.s\.key: cannot read the private key"):
        load_private(b"garbage", "rsa", "store/a.test.s.key")
    with pytest.raises(KeyProblem, match=r"not an rsa key; restore it from a backup"):
        load_private(generate("ed25519"), "rsa", "store/a.test.s.key")


def test_one_key_per_domain_and_algorithm_with_distinct_selectors():
    specs = key_specs(["b.test", "a.test", "a.test"], {"rsa": "r1", "ed25519": "e1"})
    assert [s.key_file for s in specs] == [
        "a.test.r1.key",
        "a.test.e1.key",
        "b.test.r1.key",
        "b.test.e1.key",
    ]
    assert specs[1].txt_file == "a.test.e1.txt"
    with pytest.raises(KeyProblem, match="each key needs a selector of its own"):
        key_specs(["a.test"], {"rsa": "s", "ed25519": "s"})
    with pytest.raises(KeyProblem, match="no selector for ed25519"):
        key_specs(["a.test"], {"rsa": "s"})


@pytest.mark.parametrize(
    ("mode", "directory", "expected"),
    [
        (0o700, True, None),
        (0o600, False, None),
        (0o400, False, None),
        (0o755, True, "lets everyone read or change"),
        (0o750, True, "lets its group read or change"),
        (0o644, False, "run `chmod 0600 k`"),
    ],
)
def test_modes(mode, directory, expected):
    kind = stat.S_IFDIR if directory else stat.S_IFREG
    problem = mode_problem("k", kind | mode, directory)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem
    assert "not a regular file" in mode_problem("k", stat.S_IFDIR | 0o700, directory=False)
