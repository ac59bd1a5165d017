"""The DKIM rotation's state machine (smtpgw.dkim_rotation) and its state files in the key store
(smtpgw.dkim_rotation_ops, the parts without DNS)."""

from __future__ import annotations

import json
import stat

import pytest

from smtpgw import dkim_keys, dkim_rotation_ops, relay_files
from smtpgw.dkim_rotation import (
    Rotation,
    RotationProblem,
    from_json,
    start,
    status,
    to_json,
)

BASE = {"rsa": "smtpgw-rsa", "ed25519": "smtpgw-ed25519"}
R1 = {"rsa": "smtpgw-rsa-r1", "ed25519": "smtpgw-ed25519-r1"}
RELAYS = ["relay1", "relay2"]


def started(now: float = 1000.0, grace: int = 60) -> Rotation:
    return start("acme.test", None, BASE, grace, now)


def test_a_first_rotation_goes_from_the_base_selectors_to_generation_1():
    rotation = started()
    assert (rotation.old, rotation.new, rotation.generation) == (BASE, R1, 1)
    state = status(rotation, 1000.0, RELAYS)
    assert state.phase == "publish"
    assert state.signing == BASE
    assert state.publish == [BASE, R1]
    assert state.not_before is None  # waits for the records, not for a time


def test_the_phases_of_a_full_cycle_in_order():
    rotation = started(grace=60)
    rotation.published, rotation.ttl = 1010.0, 300
    state = status(rotation, 1100.0, RELAYS)
    assert (state.phase, state.signing, state.not_before) == ("propagate", BASE, 1310.0)
    assert state.publish == [BASE, R1]

    state = status(rotation, 1310.0, RELAYS)  # TTL over: relays may switch
    assert (state.phase, state.signing, state.pending_relays) == ("switch", R1, RELAYS)
    assert state.publish == [BASE, R1]

    rotation.switched["relay1"] = 1320.0
    assert status(rotation, 1400.0, RELAYS).pending_relays == ["relay2"]
    rotation.switched["relay2"] = 1330.0
    state = status(rotation, 1340.0, RELAYS)
    # the grace runs from the last relay's switch
    assert (state.phase, state.signing, state.not_before) == ("grace", R1, 1390.0)
    assert state.publish == [BASE, R1]

    state = status(rotation, 1390.0, RELAYS)
    assert (state.phase, state.signing, state.publish) == ("retire", R1, [R1])

    rotation.retired = 1391.0
    state = status(rotation, 5000.0, RELAYS)
    assert (state.phase, state.signing, state.publish) == ("done", R1, [R1])


def test_old_records_stay_while_a_relay_has_not_switched_however_long_ago():
    rotation = started(grace=0)
    rotation.published, rotation.ttl = 1000.0, 0
    rotation.switched["relay1"] = 1000.0
    state = status(rotation, 10**9, RELAYS)
    assert state.phase == "switch"
    assert state.publish == [BASE, R1]


def test_a_relay_added_during_the_grace_must_switch_before_the_old_records_go():
    rotation = started(grace=10)
    rotation.published, rotation.ttl = 1000.0, 0
    rotation.switched = {"relay1": 1000.0, "relay2": 1000.0}
    assert status(rotation, 2000.0, RELAYS).phase == "retire"
    assert status(rotation, 2000.0, [*RELAYS, "relay3"]).phase == "switch"


def test_the_next_rotation_starts_from_the_finished_one():
    first = started()
    first.retired = 2000.0
    second = start("acme.test", first, BASE, 60, 3000.0)
    assert second.old == R1
    assert second.new == {"rsa": "smtpgw-rsa-r2", "ed25519": "smtpgw-ed25519-r2"}
    assert second.generation == 2


def test_no_second_cycle_while_one_is_under_way():
    with pytest.raises(RotationProblem, match=r"acme\.test: a rotation .* is under way"):
        start("acme.test", started(), BASE, 60, 2000.0)


def test_bad_starts_are_refused_with_the_reason():
    with pytest.raises(RotationProblem, match="grace period -1 s is negative"):
        start("acme.test", None, BASE, -1, 0.0)
    with pytest.raises(RotationProblem, match="relay_dkim_selectors: needs a selector"):
        start("acme.test", None, {"rsa": "x"}, 1, 0.0)
    with pytest.raises(RotationProblem, match="equal the old ones"):
        start("acme.test", None, {"rsa": "a-r1", "ed25519": "a"}, 1, 0.0)


def test_state_round_trips_and_bad_files_name_themselves():
    rotation = started()
    rotation.switched["relay1"] = 5.0
    assert from_json(to_json(rotation), "x") == rotation
    with pytest.raises(RotationProblem, match=r"^/k/acme.test.rotation.json: not a DKIM rotation"):
        from_json("{}", "/k/acme.test.rotation.json")
    with pytest.raises(RotationProblem, match="not a DKIM rotation"):
        from_json("not json", "f")


# --- The state files and keys in the store (no DNS) -----------------------------------------


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "dkim"
    path.mkdir(mode=0o700)
    return path


def test_state_files_are_written_whole_with_mode_0600_and_read_back(store):
    rotation = started()
    dkim_rotation_ops.save(store, rotation)
    path = store / "acme.test.rotation.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["new"] == R1
    assert dkim_rotation_ops.load(store, "acme.test") == rotation
    assert dkim_rotation_ops.load(store, "globex.test") is None
    assert [p.name for p in store.iterdir()] == ["acme.test.rotation.json"]  # no temporary left


def test_a_state_file_of_another_domain_is_refused(store):
    dkim_rotation_ops.save(store, started())
    (store / "acme.test.rotation.json").rename(store / "globex.test.rotation.json")
    with pytest.raises(RotationProblem, match=r"holds the state of acme\.test"):
        dkim_rotation_ops.load(store, "globex.test")


def test_new_keys_are_made_once_and_never_replaced(store):
    made = dkim_rotation_ops.ensure_keys(store, "acme.test", R1)
    assert sorted(made) == sorted(str(store / f"acme.test.{s}.key") for s in R1.values())
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    assert dkim_rotation_ops.ensure_keys(store, "acme.test", R1) == []
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    txt = (store / "acme.test.smtpgw-ed25519-r1.txt").read_text()
    assert txt.startswith("v=DKIM1; k=ed25519; p=")


def test_a_switch_is_recorded_once_and_only_when_the_phase_lets_it(store):
    rotation = started(now=1000.0)
    dkim_rotation_ops.save(store, rotation)
    domains = ["acme.test", "globex.test"]
    assert dkim_rotation_ops.record_switch(store, domains, RELAYS, "relay1", now=1100.0) == []
    rotation.published, rotation.ttl = 1000.0, 50
    dkim_rotation_ops.save(store, rotation)
    assert dkim_rotation_ops.record_switch(store, domains, RELAYS, "relay1", now=1040.0) == []
    assert dkim_rotation_ops.record_switch(
        store, domains, RELAYS, "relay1", now=1060.0, check=True
    ) == ["acme.test"]
    assert dkim_rotation_ops.load(store, "acme.test").switched == {}  # check mode wrote nothing
    assert dkim_rotation_ops.record_switch(store, domains, RELAYS, "relay1", now=1060.0) == [
        "acme.test"
    ]
    assert dkim_rotation_ops.record_switch(store, domains, RELAYS, "relay1", now=1070.0) == []
    assert dkim_rotation_ops.load(store, "acme.test").switched == {"relay1": 1060.0}


def test_selectors_each_phase_gives_the_key_store_the_signing_table_and_the_records():
    rotation = started()
    states = {"acme.test": status(rotation, 1000.0, RELAYS)}
    signing = dkim_rotation_ops.signing_selectors(states)
    publish = dkim_rotation_ops.publish_selectors(states)
    assert signing == {"acme.test": [BASE]}
    assert publish == {"acme.test": [BASE, R1]}
    specs = dkim_keys.key_specs(["acme.test", "globex.test"], BASE, publish)
    assert [(s.domain, s.selector) for s in specs] == [
        ("acme.test", "smtpgw-rsa"),
        ("acme.test", "smtpgw-ed25519"),
        ("acme.test", "smtpgw-rsa-r1"),
        ("acme.test", "smtpgw-ed25519-r1"),
        ("globex.test", "smtpgw-rsa"),
        ("globex.test", "smtpgw-ed25519"),
    ]
    tenants = [{"name": "acme", "domains": ["acme.test"]}, {"name": "g", "domains": ["g.test"]}]
    lines = relay_files.dkim_signing_lines(
        tenants, BASE, relay_files.RelayPaths(), {"acme.test": [R1]}
    )
    text = "\n".join(lines)
    assert 'acme.test.smtpgw-rsa-r1.key"; selector = "smtpgw-rsa-r1"' in text
    assert 'g.test.smtpgw-rsa.key"; selector = "smtpgw-rsa"' in text
    assert 'acme.test.smtpgw-rsa.key"' not in text
