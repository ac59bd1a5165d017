"""The pure parts of `smtpgw doctor`: the verdicts on what was seen, the walk and its output.
The end-to-end test against the lab is molecule/cluster/tests/test_doctor.py."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from smtpgw import cli
from smtpgw.doctor import (
    LAYERS,
    CertInfo,
    Check,
    cert_check,
    deferral_reasons,
    fcrdns,
    queue_checks,
    render,
    smarthost_moved,
    tcp_fix,
    walk,
)

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


# --- forward-confirmed reverse DNS and HELO -------------------------------------------------


def test_fcrdns_ok_when_ptr_name_resolves_back_and_is_the_helo():
    check = fcrdns(
        "relay1",
        "10.0.0.11",
        ["relay1.lab.test"],
        {"relay1.lab.test": ["10.0.0.11"]},
        "relay1.lab.test",
    )
    assert check.status == "ok"
    assert check.detail == "PTR relay1.lab.test -> 10.0.0.11; HELO relay1.lab.test"


def test_fcrdns_fails_without_ptr_and_says_what_to_publish():
    check = fcrdns("relay1", "10.0.0.11", [], {}, "relay1.lab.test", "NXDOMAIN")
    assert check.status == "fail"
    assert check.detail == "no PTR record for 10.0.0.11 (NXDOMAIN)"
    assert "publish a PTR record for 10.0.0.11 naming relay1.lab.test" in check.fix


def test_fcrdns_fails_when_ptr_names_a_host_that_does_not_resolve_back():
    check = fcrdns(
        "relay1", "10.0.0.11", ["mx1.lab.test"], {"mx1.lab.test": ["10.0.0.25"]}, "relay1.lab.test"
    )
    assert check.status == "fail"
    assert "names mx1.lab.test, which does not resolve back to 10.0.0.11" in check.detail
    assert "mx1.lab.test -> 10.0.0.25" in check.detail


def test_fcrdns_fails_when_helo_is_another_name_than_the_confirmed_ptr():
    check = fcrdns(
        "relay1",
        "10.0.0.11",
        ["mail.example.test."],
        {"mail.example.test.": ["10.0.0.11"]},
        "relay1.lab.test",
    )
    assert check.status == "fail"
    assert check.detail == (
        "PTR of 10.0.0.11 names mail.example.test, but the relay says HELO relay1.lab.test"
    )
    assert "relay_hostname to mail.example.test" in check.fix


def test_fcrdns_names_compare_without_case_or_final_dot():
    check = fcrdns(
        "r",
        "10.0.0.11",
        ["Relay1.Lab.Test."],
        {"Relay1.Lab.Test.": ["10.0.0.11"]},
        "relay1.lab.test",
    )
    assert check.status == "ok"


# --- smart host addresses against the deploy's record -------------------------------------------


def test_smarthost_same_addresses_as_deployed_in_any_order():
    check = smarthost_moved(
        "relay1", "up", "up.test", ["10.0.0.2", "10.0.0.1"], ["10.0.0.1", "10.0.0.2"]
    )
    assert check.status == "ok"
    assert check.layer == "names"


def test_smarthost_moved_names_both_addresses():
    check = smarthost_moved("relay1", "up", "up.test", ["10.0.0.9"], ["10.0.0.1"])
    assert check.status == "fail"
    assert "up.test now resolves to 10.0.0.9; when relay1 was deployed it resolved to 10.0.0.1" in (
        check.detail
    )
    assert "redeploy" in check.fix


def test_smarthost_not_resolving_fails_and_never_recorded_warns():
    assert (
        smarthost_moved("r", "up", "up.test", [], ["10.0.0.1"], "Name or service not known").status
        == "fail"
    )
    warn = smarthost_moved("r", "up", "up.test", ["10.0.0.1"], None)
    assert warn.status == "warn"
    assert "no address recorded at deploy time" in warn.detail


# --- the queue ----------------------------------------------------------------------------------


def test_deferral_reasons_count_one_cause_once_whatever_the_address():
    lines = [
        "postfix/smtp[1]: 4A: to=<a@x.test>, relay=none, delay=3, status=deferred "
        "(connect to upstream1.lab.test[10.0.0.26]:587: Connection refused)",
        "postfix/smtp[2]: 4B: to=<b@x.test>, relay=none, delay=9, status=deferred "
        "(connect to upstream1.lab.test[10.0.0.27]:587: Connection refused)",
        "postfix/smtp[3]: 4C: to=<c@x.test>, status=deferred (host mx said: 451 try later)",
        "postfix/smtp[3]: 4D: to=<c@x.test>, status=sent (250 ok)",
    ]
    assert deferral_reasons(lines) == [
        ("connect to upstream1.lab.test*:587: Connection refused", 2),
        ("host mx said: 451 try later", 1),
    ]


def test_queue_empty_is_ok():
    assert queue_checks("relay1", [], [], 1000.0) == Check("queue", "relay1", "ok", "empty")


def test_queue_reports_size_age_and_reasons_and_fails_when_too_old():
    entries = [
        {"arrival_time": 1000, "reasons": ["connect refused", "connect refused"]},
        {"arrival_time": 1500, "reasons": ["451 later"]},
    ]
    young = queue_checks("relay1", entries, [], 1600.0, max_age=3600)
    assert young.status == "ok"
    assert young.detail == "2 message(s), oldest 10 min old; 2x connect refused; 1x 451 later"
    old = queue_checks("relay1", entries, [], 1000.0 + 7300, max_age=3600)
    assert old.status == "fail"
    assert "oldest 2 h 1 min old" in old.detail
    assert "postqueue -f" in old.fix


def test_queue_without_reasons_in_the_queue_takes_them_from_the_log():
    log = [
        "x status=deferred (lost connection with up[10.0.0.1] while receiving the initial greeting)"
    ]
    check = queue_checks("relay1", [{"arrival_time": 990, "reasons": [""]}], log, 1000.0)
    assert check.detail.endswith("1x lost connection with up* while receiving the initial greeting")


# --- TLS ----------------------------------------------------------------------------------------


def cert(days: float, names=("relay1.lab.test",), error="") -> CertInfo:
    return CertInfo("TLSv1.3", list(names), NOW + dt.timedelta(days=days), error)


def test_cert_ok_says_protocol_name_and_days():
    check = cert_check("relay1.lab.test:587", cert(90.5), "relay1.lab.test", NOW)
    assert check == Check(
        "tls",
        "relay1.lab.test:587",
        "ok",
        "TLSv1.3, certificate for relay1.lab.test, expires in 90 days",
    )


def test_cert_expired_fails_before_anything_else():
    check = cert_check("s", cert(-3.5, error="certificate has expired"), "relay1.lab.test", NOW)
    assert check.status == "fail"
    assert "expired 3 day(s) ago (2026-11-27)" in check.detail
    assert "renewed certificate" in check.fix


def test_cert_soon_expiring_warns():
    assert cert_check("s", cert(5), "relay1.lab.test", NOW).status == "warn"


@pytest.mark.parametrize(
    ("names", "fix_part"),
    [
        (["other.lab.test"], "must carry relay1.lab.test"),
        (["relay1.lab.test"], "CA the clients trust"),
        (["*.lab.test"], "CA the clients trust"),
    ],
)
def test_cert_not_verified_says_whether_the_name_or_the_chain(names, fix_part):
    check = cert_check("s", cert(90, names, "unable to get local issuer"), "relay1.lab.test", NOW)
    assert check.status == "fail"
    assert "not verified: unable to get local issuer" in check.detail
    assert fix_part in check.fix


def test_tcp_fix_tells_refused_from_dropped():
    assert "start Postfix" in tcp_fix("relay1", 587, "Connection refused", "inactive")
    assert "(Postfix on relay1 is inactive)" in tcp_fix(
        "relay1", 587, "Connection refused", "inactive"
    )
    assert "a firewall drops it" in tcp_fix("relay1", 587, "timed out after 5 s")


# --- the walk and the output ---------------------------------------------------------------------


def test_walk_stops_at_the_first_failing_layer():
    ran = []

    def layer(key, status):
        def run():
            ran.append(key)
            return [Check(key, "x", status, "d", "do this")]

        return key, run

    report = walk([layer("names", "ok"), layer("reach", "fail"), layer("tls", "ok")])
    assert ran == ["names", "reach"]
    assert report.failed_layer == "reach"
    assert report.not_checked == ["tls"]
    assert not report.ok
    text = render(report)
    assert text.splitlines() == [
        "ok    names           x: d",
        "FAIL  reach           x: d",
        "                      fix: do this",
        "FAILED at reach (TCP reachability); not checked: tls",
    ]
    assert json.loads(json.dumps(report.as_dict()))["failed_layer"] == "reach"


def test_walk_warnings_and_skips_do_not_fail():
    report = walk(
        [
            ("names", lambda: [Check("names", "a", "warn", "w", "f")]),
            ("auth", lambda: [Check("auth", "-", "skip", "no --login given")]),
        ]
    )
    assert report.ok
    assert render(report).splitlines()[-1] == "all layers passed (0 checks): names, auth"


def test_layers_are_in_the_documented_order():
    assert [k for k, _ in LAYERS] == [
        "names",
        "relay-dns",
        "reach",
        "tls",
        "auth",
        "smarthost-auth",
        "queue",
        "tenant-dns",
    ]


# --- the command ---------------------------------------------------------------------------------


def test_doctor_host_mode_names_a_closed_port(capsys):
    """--host against this machine on a port nothing listens on: the reach layer fails."""
    import socket

    with socket.socket() as s:  # a free port, closed again: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["doctor", "--host", "127.0.0.1", "--port", str(port), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["failed_layer"] == "reach"
    assert out["checks"][0]["status"] == "skip"  # an address: nothing to resolve
    assert "refused" in out["checks"][1]["detail"].lower()
    assert out["not_checked"] == ["tls", "auth"]


def test_doctor_inventory_without_relays_is_an_error(tmp_path):
    (tmp_path / "hosts.yml").write_text("all:\n  hosts:\n    localhost: {}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "smtpgw.cli", "doctor", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "has no host in the group relays" in proc.stderr
