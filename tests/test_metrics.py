"""The mail-flow service's pure parts (src/smtpgw/metrics.py), the firewall sets and trace's
following of hops: Postfix log lines in, counts, log records, Prometheus text and health out."""

from __future__ import annotations

import json

import pytest

from smtpgw import firewall, metrics, trace

LIMITS = {
    "tenants": {"routed": {}, "acme": {}},
    "logins": {"App@Routed.test": {"tenant": "routed"}},
    "networks": [["192.0.2.0/28", "acme"]],
}
Q = "4B1C52A0F3"
LINES = [
    (
        "postfix/submission/smtpd",
        f"{Q}: client=unknown[10.9.9.1], sasl_method=PLAIN, sasl_username=app@routed.test",
    ),
    ("postfix/cleanup", f"{Q}: message-id=<tok-1@smtpgw.test>"),
    ("postfix/qmgr", f"{Q}: from=<app@routed.test>, size=512, nrcpt=1 (queue active)"),
    (
        "postfix/smtp",
        f"{Q}: to=<x@dest.test>, relay=none, delay=0.05, delays=0.01/0.01/0.03/0, dsn=4.4.1, "
        "status=deferred (connect to upstream1.lab.test[10.9.9.26]:587: Connection refused)",
    ),
    ("postfix/qmgr", f"{Q}: from=<app@routed.test>, size=512, nrcpt=1 (queue active)"),
    (
        "postfix/smtp",
        f"{Q}: to=<x@dest.test>, relay=upstream1.lab.test[10.9.9.26]:587, delay=31, "
        "delays=30/0.01/0.1/0.05, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 5D6E7F8A9B)",
    ),
    ("postfix/qmgr", f"{Q}: removed"),
]


def feed(lines, tracker):
    out = []
    for ident, message in lines:
        event = metrics.parse_line(ident, message)
        if event is not None:
            record = tracker.feed(event, 1_700_000_000.0)
            if record:
                out.append(record)
    return out


def test_parse_line_reads_each_kind():
    events = [metrics.parse_line(i, m) for i, m in LINES]
    assert events[0] == {
        "event": "client",
        "qid": Q,
        "client": "unknown[10.9.9.1]",
        "ip": "10.9.9.1",
        "login": "app@routed.test",
    }
    assert events[1] == {"event": "message_id", "qid": Q, "message_id": "<tok-1@smtpgw.test>"}
    assert events[2] == {"event": "from", "qid": Q, "sender": "app@routed.test"}
    assert events[3]["status"] == "deferred" and events[3]["relay"] == "none"
    assert events[3]["text"] == "connect to upstream1.lab.test[10.9.9.26]:587: Connection refused"
    assert events[5]["queued_as"] == "5D6E7F8A9B"
    assert events[5]["relay"] == "upstream1.lab.test[10.9.9.26]:587"
    assert events[5]["dsn"] == "2.0.0" and events[5]["transport"] == "smtp"
    assert events[6] == {"event": "removed", "qid": Q}


@pytest.mark.parametrize(
    ("ident", "message"),
    [
        ("postfix/smtpd", "connect from unknown[10.9.9.1]"),
        ("postfix/smtpd", "NOQUEUE: reject: RCPT from unknown[10.9.9.1]: 554 5.7.1 denied"),
        ("postfix/qmgr", f"{Q}: skipped, still being delivered"),
        ("dovecot", f"{Q}: client=unknown[10.9.9.1]"),
        ("postfix/smtp", f"{Q}: to=<x@dest.test>, relay=none"),
    ],
)
def test_parse_line_leaves_other_lines(ident, message):
    assert metrics.parse_line(ident, message) is None


def test_tracker_counts_per_tenant_and_logs_each_attempt():
    tracker = metrics.Tracker(metrics.Tenants(LIMITS), "relay2")
    records = feed(LINES, tracker)
    assert tracker.counts == {
        ("routed", "accepted"): 1,  # once, though qmgr logged from= twice
        ("routed", "deferred"): 1,
        ("routed", "delivered"): 1,
    }
    assert [r["result"] for r in records] == ["deferred", "delivered"]
    assert records[1]["queued_as"] == "5D6E7F8A9B" and records[1]["relay"] == "relay2"
    assert records[1]["message_id"] == "<tok-1@smtpgw.test>"
    assert records[1]["route"] == "smtp upstream1.lab.test[10.9.9.26]:587"
    assert tracker.messages == {}  # removed
    assert "Connection refused" in tracker.last_deferral


def test_tracker_tenant_by_network_and_none():
    tracker = metrics.Tracker(metrics.Tenants(LIMITS), "r")
    lines = [
        ("postfix/smtpd", "AAAAAA1: client=dev[192.0.2.7]"),
        ("postfix/qmgr", "AAAAAA1: from=<d@acme.test>, size=1, nrcpt=1 (queue active)"),
        ("postfix/smtpd", "BBBBBB2: client=x[198.51.100.1]"),
        ("postfix/qmgr", "BBBBBB2: from=<>, size=1, nrcpt=1 (queue active)"),
        (
            "postfix/smtp",
            "BBBBBB2: to=<y@z.test>, relay=z.test[198.51.100.2]:25, delay=1, delays=0/0/0/1, "
            "dsn=5.1.1, status=bounced (host said: 550 no such user)",
        ),
    ]
    feed(lines, tracker)
    assert tracker.counts[("acme", "accepted")] == 1
    assert tracker.counts[("none", "bounced")] == 1
    assert tracker.queued_by_tenant() == {"acme": 1, "routed": 0, "none": 1}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_record_round_trip(fmt):
    tracker = metrics.Tracker(metrics.Tenants(LIMITS), "relay2")
    record = feed(LINES, tracker)[0]
    line = metrics.format_record(record, fmt)
    assert "\n" not in line
    back = metrics.parse_record(line)
    assert {k: v for k, v in back.items() if v != ""} == {
        k: v for k, v in record.items() if v != ""
    }
    if fmt == "text":
        assert line.startswith(
            "time=2023-11-14T22:13:20.000Z relay=relay2 tenant=routed queue_id=4B1C52A0F3 "
        )
        assert 'detail="connect to upstream1.lab.test[10.9.9.26]:587: Connection refused"' in line
    else:
        assert json.loads(line)["result"] == "deferred"
    assert metrics.parse_record("listening on 0.0.0.0:9155") is None


def test_exposition():
    text = metrics.exposition(
        {("routed", "delivered"): 3, ("none", "bounced"): 1},
        ["routed", 'we"ird'],
        {"routed": 2},
        {"queues": {"active": 1, "deferred": 2}, "oldest": 41.5},
    )
    lines = text.splitlines()
    assert 'smtpgw_messages_total{tenant="routed",result="delivered"} 3' in lines
    assert 'smtpgw_messages_total{tenant="routed",result="accepted"} 0' in lines
    assert 'smtpgw_messages_total{tenant="none",result="bounced"} 1' in lines
    assert 'smtpgw_messages_total{tenant="we\\"ird",result="deferred"} 0' in lines
    assert 'smtpgw_tenant_queued_messages{tenant="routed"} 2' in lines
    assert 'smtpgw_queue_messages{queue="deferred"} 2' in lines
    assert "smtpgw_queue_oldest_message_age_seconds 41.5" in lines
    assert "smtpgw_postfix_up 1" in lines
    # every sample's name has its TYPE line
    types = {ln.split()[2] for ln in lines if ln.startswith("# TYPE")}
    assert {ln.split("{")[0].split()[0] for ln in lines if not ln.startswith("#")} <= types
    assert "smtpgw_postfix_up 0" in metrics.exposition({}, [], {}, None)


def test_queue_summary_and_health():
    out = "\n".join(
        json.dumps({"queue_name": q, "arrival_time": t, "queue_id": "X"})
        for q, t in (("deferred", 1000), ("active", 1090))
    )
    summary = metrics.queue_summary(out + "\n", now=1100.0)
    assert summary["queues"]["deferred"] == 1 and summary["queues"]["active"] == 1
    assert summary["oldest"] == 100.0
    ok, why = metrics.health(summary, "", 600, "")
    assert ok and why == "2 queued, oldest 100 s (limit 600 s)"
    ok, why = metrics.health(summary, "", 20, "x@dest.test: Connection refused")
    assert not ok
    assert why == (
        "oldest message in the queue is 100 s old (limit 20 s), 2 queued; "
        "last deferral: x@dest.test: Connection refused"
    )
    ok, why = metrics.health(None, "postqueue: fatal: Queue report unavailable", 20, "")
    assert not ok and why.startswith("Postfix does not answer: postqueue: fatal")
    assert metrics.queue_summary("", 5.0) == {
        "queues": {"maildrop": 0, "incoming": 0, "active": 0, "deferred": 0, "hold": 0},
        "oldest": 0.0,
    }


def test_nft_sets():
    assert firewall.nft_sets(["10.0.0.7", "10.0.0.9/24", "2001:db8::1", "2001:db8::/64"]) == {
        "ip": ["10.0.0.0/24", "10.0.0.7"],
        "ip6": ["2001:db8::/64", "2001:db8::1"],
    }
    assert firewall.nft_sets([]) == {"ip": [], "ip6": []}
    with pytest.raises(firewall.FirewallError, match=r"relay_metrics_allowed\[1\]: 'prom.example'"):
        firewall.nft_sets(["10.0.0.1", "prom.example"])
    with pytest.raises(firewall.FirewallError, match="must be a list"):
        firewall.nft_sets("10.0.0.1")


def test_trace_follows_hops_across_relays():
    logs = {
        "relay2": [
            {
                "time": "t1",
                "relay": "relay2",
                "queue_id": "AAA111",
                "message_id": "<m@x>",
                "queued_as": "BBB222",
                "result": "delivered",
            },
            {
                "time": "t0",
                "relay": "relay2",
                "queue_id": "ZZZ999",
                "message_id": "<other@x>",
                "queued_as": "",
                "result": "delivered",
            },
        ],
        "relay1": [
            {
                "time": "t2",
                "relay": "relay1",
                "queue_id": "BBB222",
                "message_id": "<m@x>",
                "queued_as": "CCC333",
                "result": "delivered",
            },
        ],
    }
    asked = []

    def search(ids):
        asked.append(ids)
        return [r for rows in logs.values() for r in rows if any(i in json.dumps(r) for i in ids)]

    hops = trace.follow(search, ["AAA111"])
    assert [h["queue_id"] for h in hops] == ["AAA111", "BBB222"]
    assert trace.follow(search, ["m@x"]) == hops
    assert trace.follow(search, ["NOPE00"]) == []
    text = trace.hops_text(hops)
    assert "relay2" in text.splitlines()[0] and "next hop's queue BBB222" in text
