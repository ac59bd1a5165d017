"""The policy service's pure parts: whose message, which counters, the refusal's text."""

from __future__ import annotations

from smtpgw import policyd
from smtpgw.relay_files import limits_document

TENANTS = [
    {
        "name": "acme",
        "users": [{"login": "app@acme.test"}, {"login": "capped@acme.test"}],
        "networks": ["192.0.2.0/24", "192.0.2.128/25"],
        "limits": {
            "messages_per_day": 5,
            "messages_per_hour": None,
            "recipients_per_message": 3,
            "logins": {"capped@acme.test": {"messages_per_day": 2}},
        },
    },
    {
        "name": "beta",
        "users": [],
        "networks": ["192.0.2.200/32"],
        "limits": {"messages_per_day": None, "recipients_per_message": 50, "logins": {}},
    },
]


def limits() -> policyd.Limits:
    return policyd.Limits(limits_document(TENANTS))


def request(address: str, instance: str, state: str = "RCPT") -> bytes:
    """A policy request as Postfix sends it (the attributes the service reads, and some more)."""
    return (
        f"request=smtpd_access_policy\nprotocol_state={state}\nclient_address={address}\n"
        f"sasl_username=\ninstance={instance}\nqueue_id=ABC\nrecipient=r@dest.test\n\n"
    ).encode()


def talk(policy: policyd.Policy, socket: str, writes: list[bytes], count: int) -> list[str]:
    """The service on a unix socket at `socket`: `writes` sent in turn, its first `count`
    replies (the action of each)."""
    import asyncio

    async def run() -> list[str]:
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: policyd.Connection(policy), path=socket
        )
        async with server:
            reader, writer = await asyncio.open_unix_connection(socket)
            for data in writes:
                writer.write(data)
            await writer.drain()
            replies = [(await reader.readuntil(b"\n\n")).decode() for _ in range(count)]
            writer.close()
            return [r.removeprefix("action=").strip() for r in replies]

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_wait_text_rounds_up_to_the_minute():
    assert policyd.wait_text(1) == "1m"
    assert policyd.wait_text(60_000) == "1m"
    assert policyd.wait_text(60_001) == "2m"
    assert policyd.wait_text((2 * 60 + 13) * 60_000) == "2h13m"
    assert policyd.wait_text(policyd.DAY_MS) == "24h00m"


def test_tenant_of_a_login_and_of_an_address():
    lim = limits()
    assert lim.tenant_of("APP@acme.test", "") == ("acme", None)
    assert lim.tenant_of("capped@acme.test", "") == ("acme", "capped@acme.test")
    assert lim.tenant_of("nobody@acme.test", "192.0.2.1") is None
    # The most specific network wins.
    assert lim.tenant_of("", "192.0.2.200") == ("beta", None)
    assert lim.tenant_of("", "192.0.2.7") == ("acme", None)
    assert lim.tenant_of("", "198.51.100.1") is None


def test_counters_of_a_message():
    lim = limits()
    assert [c[1] for c in lim.counters("acme", "capped@acme.test")] == [
        "tenant acme",
        "login capped@acme.test",
    ]
    assert lim.counters("beta", None) == []  # nothing to count: Redis is not asked
    assert lim.effective("acme", "capped@acme.test")["recipients_per_message"] == 3


def test_refusal_text_names_the_limit_and_the_wait():
    counters = limits().counters("acme", None)
    text = policyd.over_text(counters, [1, "day", 5, (2 * 60 + 13) * 60_000])
    assert text == "452 4.7.1 tenant acme: 5 messages per day reached; next slot in 2h13m"


def test_the_service_answers_over_its_socket(tmp_path):
    """Requests over the service's unix socket, as Postfix sends them (two in one write too):
    a tenant with no message limits is answered without Redis, its recipients counted; any
    state but RCPT is passed (the count at the end of DATA is rspamd's)."""
    import json

    tenant = {
        "name": "gamma",
        "users": [],
        "networks": ["192.0.2.64/26"],
        "limits": {"messages_per_day": None, "recipients_per_message": 2, "logins": {}},
    }
    limits_file = tmp_path / "limits.json"
    limits_file.write_text("# Ansible managed\n" + json.dumps(limits_document([tenant])))
    # Redis at a closed port: a request that needed it would be answered 451.
    config = {"limits_file": str(limits_file), "redis": {"host": "127.0.0.1", "port": 1}}
    policy = policyd.Policy(config)

    rcpt = request("192.0.2.70", "m1")
    writes = [rcpt + rcpt, rcpt, request("192.0.2.70", "m1", "END-OF-MESSAGE")]
    assert talk(policy, str(tmp_path / "policy.sock"), writes, 4) == [
        "DUNNO",
        "DUNNO",
        "550 5.5.3 tenant gamma: at most 2 recipients per message",
        "DUNNO",
    ]


def test_a_message_is_forgotten_ten_minutes_after_its_last_rcpt(tmp_path):
    """Postfix says nothing when a message ends (the count at the end of DATA is rspamd's), so
    the service forgets a message INSTANCE_TTL after its last RCPT, oldest first."""
    import json

    limits_file = tmp_path / "limits.json"
    limits_file.write_text(json.dumps(limits_document(TENANTS[1:])))
    policy = policyd.Policy({"limits_file": str(limits_file), "redis": {"port": 1}})
    rcpt = {"protocol_state": "RCPT", "client_address": "192.0.2.200"}

    for instance in ("m1", "m2", "m1"):  # m1's second RCPT makes m2 the oldest
        assert policy.answer({**rcpt, "instance": instance}) == "DUNNO"  # at once, no Redis
    assert list(policy.instances) == ["m2", "m1"]
    assert [entry[0] for entry in policy.instances.values()] == [1, 2]  # recipients of each
    policy.instances["m2"][2], policy.instances["m1"][2] = 100.0, 200.0  # last RCPTs' times
    policy._purge(100.0 + policyd.INSTANCE_TTL - 0.5)
    assert list(policy.instances) == ["m2", "m1"]
    policy._purge(100.0 + policyd.INSTANCE_TTL + 0.5)
    assert list(policy.instances) == ["m1"]
    policy._purge(200.0 + policyd.INSTANCE_TTL + 0.5)
    assert policy.instances == {}


def test_redis_unreachable_defers_or_passes_as_chosen(tmp_path):
    """A tenant with message limits whose look must ask Redis: with Redis unreachable, 451 4.3.0
    (fail_closed) or DUNNO (fail_open), and the message is not kept."""
    import asyncio
    import json

    limits_file = tmp_path / "limits.json"
    limits_file.write_text(json.dumps(limits_document(TENANTS)))
    rcpt = {"protocol_state": "RCPT", "sasl_username": "", "client_address": "192.0.2.5"}
    for mode, action in (
        ("fail_closed", "451 4.3.0 sending limits unavailable; try again later"),
        ("fail_open", "DUNNO"),
    ):
        config = {"limits_file": str(limits_file), "redis": {"port": 1}, "on_redis_failure": mode}
        policy = policyd.Policy(config)
        assert policy.limits.counters(*policy.limits.tenant_of("", "192.0.2.5"))
        look = policy.answer({**rcpt, "instance": "m1"})
        assert not isinstance(look, str)  # it must ask Redis
        assert asyncio.run(look) == action
        assert policy.instances == {}
        assert policy.failures == 0 and policy.down_since is not None  # reported once


def test_answers_keep_their_order_when_one_waits_for_redis(tmp_path):
    """Three requests in one write: the first must ask Redis (unreachable here: 451 from a task),
    the two behind it could be answered at once; they are answered after it, in order."""
    import json

    limits_file = tmp_path / "limits.json"
    limits_file.write_text(json.dumps(limits_document(TENANTS)))
    policy = policyd.Policy({"limits_file": str(limits_file), "redis": {"port": 1}})

    writes = [
        request("192.0.2.5", "a1") + request("192.0.2.200", "b1") + request("192.0.2.200", "b2")
    ]
    assert talk(policy, str(tmp_path / "policy.sock"), writes, 3) == [
        "451 4.3.0 sending limits unavailable; try again later",
        "DUNNO",
        "DUNNO",
    ]
    assert list(policy.instances) == ["b1", "b2"]


def test_the_counter_script_is_the_file_rspamd_runs_too():
    script = policyd.COUNT_SCRIPT
    assert "redis.call('ZADD', key, now, member)" in script
    assert script.startswith("-- smtpgw's sending-limit counter")
