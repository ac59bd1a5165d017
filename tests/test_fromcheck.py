"""fromcheck, the milter that keeps a login to its tenant's domains in header From.

Unit tests of the pure parts, then the real server (as the relay runs it: `python3 fromcheck.py`)
driven over a unix socket the way Postfix's milter8 client drives it.
"""

from __future__ import annotations

import ast
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smtpgw import fromcheck as fc

SCRIPT = Path(fc.__file__)
TABLE = """\
# Ansible managed
@acme.test a@acme.test,b@acme.test
@mail.acme.test a@acme.test b@acme.test
@globex.test g@globex.test
@xn--bcher-kva.test a@acme.test
"""
REJECT_FOREIGN = "550 5.7.1 header From <{addr}> is not a domain of login {login}"
REQUIRED = "550 5.7.1 a From header with an address of login {login}'s domains is required"

# Postfix milter8.c: every event flag a version 6 MTA knows, and the "no reply" flags.
V6_PROTO_MASK = (1 << 21) - 1  # bits 0-20, SMFIP_NOCONNECT up to SMFIP_HDR_LEADSPC
NOREPLY_MASK = 1 << 7 | 0xFF << 12
NOHDRS, NOEOH = 1 << 5, 1 << 6


@pytest.fixture
def table():
    return fc.parse_logins(TABLE)[0]


# --- The table -----------------------------------------------------------------------------------


def test_parse_logins_maps_each_login_to_its_domains(table):
    assert table == {
        "a@acme.test": {"acme.test", "mail.acme.test", "xn--bcher-kva.test"},
        "b@acme.test": {"acme.test", "mail.acme.test"},
        "g@globex.test": {"globex.test"},
    }


def test_parse_logins_reads_postfix_syntax_and_reports_what_it_ignores():
    text = (
        "\n  # indented comment\n@ACME.Test\tA@acme.test,\n  b@acme.test\n"
        "@bücher.test a@acme.test\nuser@acme.test a@acme.test\n@lonely.test\n"
    )
    table, ignored = fc.parse_logins(text)
    assert table == {
        "a@acme.test": {"acme.test", "xn--bcher-kva.test"},
        "b@acme.test": {"acme.test"},
    }
    assert len(ignored) == 2
    assert ignored[0].startswith("line 6: 'user@acme.test a@acme.test'")
    assert ignored[1].startswith("line 7: '@lonely.test'")


def test_ascii_domain():
    assert fc.ascii_domain("ACME.Test.") == "acme.test"
    assert fc.ascii_domain("Bücher.test") == "xn--bcher-kva.test"
    for bad in ("", "a..test", "x" * 64 + ".test"):
        with pytest.raises(ValueError):
            fc.ascii_domain(bad)


def test_login_table_rereads_a_changed_file_at_most_once_a_second(tmp_path):
    path = tmp_path / "sender_logins"
    path.write_text("@acme.test a@acme.test\n")
    now = [100.0]
    logins = fc.LoginTable(str(path), clock=lambda: now[0])
    assert logins.current() == {"a@acme.test": {"acme.test"}}

    path.write_text("@globex.test a@acme.test\n")
    os.utime(path, ns=(0, 10**9))
    now[0] += 0.5
    assert logins.current() == {"a@acme.test": {"acme.test"}}, "looked again within a second"
    now[0] += 0.6
    assert logins.current() == {"a@acme.test": {"globex.test"}}

    path.unlink()
    now[0] += 1.1
    assert logins.current() is None
    path.write_text("@acme.test a@acme.test\n")
    now[0] += 1.1
    assert logins.current() == {"a@acme.test": {"acme.test"}}


# --- The decision --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        ("A <a@ACME.TEST>", ["a@acme.test"]),
        ('"ceo@acme.test" <x@evil.test>', ["x@evil.test"]),
        ("a@acme.test, b@EVIL.test", ["a@acme.test", "b@evil.test"]),
        ("Group: a@acme.test;", ["a@acme.test"]),
        ("x <a@bücher.test>", ["a@xn--bcher-kva.test"]),
        ("A\n\t<a@acme.test>", ["a@acme.test"]),
        ("root", ["root"]),
        ("", None),
        ("undisclosed:;", None),
        ("<<<>>>", None),
        ("a@acme.test@evil.test", None),
        ("alice@acme.test)<bob@evil.test>", None),
    ],
)
def test_header_addresses(value, addresses):
    assert fc.header_addresses(value) == addresses


def test_header_addresses_count_what_either_parser_sees():
    # A header read differently by two parsers yields both readings: one of them is foreign.
    assert fc.header_addresses("a@acme.test <b@evil.test>") == ["a@acme.test", "b@evil.test"]


@pytest.mark.parametrize(
    "headers",
    [
        ["a@acme.test"],
        ["A Person <a@ACME.test>"],
        ["a@acme.test, b@mail.acme.test"],
        ["x <x@bücher.test>"],
        ["a@acme.test", "b@acme.test"],
    ],
)
def test_decide_lets_own_domains_through(table, headers):
    assert fc.decide("a@acme.test", headers, table) is None
    assert fc.decide("A@ACME.TEST", headers, table) is None


@pytest.mark.parametrize(
    ("headers", "addr"),
    [
        (["g@globex.test"], "g@globex.test"),
        (['"ceo@acme.test" <x@evil.test>'], "x@evil.test"),
        (["a@acme.test, boss@globex.test"], "boss@globex.test"),
        (["a@acme.test", "boss@globex.test"], "boss@globex.test"),
        (["a@sub.acme.test"], "a@sub.acme.test"),
        (["root"], "root"),
    ],
)
def test_decide_rejects_foreign_domains(table, headers, addr):
    assert fc.decide("a@acme.test", headers, table) == REJECT_FOREIGN.format(
        addr=addr, login="a@acme.test"
    )


def test_decide_requires_a_parsable_from_of_a_login(table):
    required = REQUIRED.format(login="a@acme.test")
    assert fc.decide("a@acme.test", [], table) == required
    assert fc.decide("a@acme.test", [""], table) == required
    assert fc.decide("a@acme.test", ["a@acme.test", "<<<>>>"], table) == required


def test_decide_rejects_a_login_missing_from_the_table(table):
    assert fc.decide("stranger", ["a@acme.test"], table) == REJECT_FOREIGN.format(
        addr="a@acme.test", login="stranger"
    )


def test_decide_leaves_unauthenticated_sessions_alone(table):
    assert fc.decide(None, ["x@evil.test"], table) is None
    assert fc.decide("", [], table) is None


def test_decide_quotes_long_addresses_shortened(table):
    reply = fc.decide("a@acme.test", ["x" * 500 + "@evil.test"], table)
    assert reply is not None and len(reply) < 300


# --- Packets -------------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    packet = fc.encode(b"L", b"From\0a@acme.test\0")
    assert packet == struct.pack("!I", 18) + b"LFrom\0a@acme.test\0"
    assert fc.decode(packet + b"rest") == (b"L", b"From\0a@acme.test\0", b"rest")
    assert fc.decode(fc.encode(b"N")) == (b"N", b"", b"")
    for bad in (b"\0\0", struct.pack("!I", 0), struct.pack("!I", 5) + b"L", b"\xff" * 5):
        with pytest.raises(fc.ProtocolError):
            fc.decode(bad)


def test_optneg_reply_is_what_postfix_reads():
    # Postfix offers version 6, every action and every protocol flag it knows.
    reply = fc.optneg_reply(struct.pack("!III", 6, 0x1FF, V6_PROTO_MASK))
    cmd, data, rest = fc.decode(reply)
    assert (cmd, rest) == (b"O", b"")
    assert len(data) == 12, "version, actions, protocol: three 4-byte ints and nothing else"
    version, actions, protocol = struct.unpack("!III", data)
    assert (version, actions) == (6, 0)
    assert protocol & ~V6_PROTO_MASK == 0
    assert protocol & (NOHDRS | NOEOH) == 0, "headers and end-of-headers are wanted"
    assert protocol & NOREPLY_MASK == 0, "we reply to every event"
    assert protocol == fc.PROTOCOL == 0x31B  # no connect, helo, rcpt, body, unknown, data


def test_optneg_reply_never_asks_more_than_the_mta_offers():
    version, _, protocol = struct.unpack("!III", fc.decode(fc.optneg_reply(b"\0\0\0\2" * 3))[1])
    assert (version, protocol) == (2, 2)
    with pytest.raises(fc.ProtocolError):
        fc.optneg_reply(b"\0\0\0\6")


def test_parse_macros_and_header():
    data = b"Mi\0004ABC\0{auth_authen}\0a@acme.test\0{mail_addr}\0\0"
    assert fc.parse_macros(data) == (
        "M",
        {"i": "4ABC", "auth_authen": "a@acme.test", "mail_addr": ""},
    )
    assert fc.parse_header(b"From\0A <a@acme.test>\0") == ("From", "A <a@acme.test>")
    with pytest.raises(fc.ProtocolError):
        fc.parse_header(b"From")


def test_replycode_is_one_nul_terminated_line_with_percent_doubled():
    assert fc.replycode("550 5.7.1 <a%b@x>\r\n250 ok") == fc.encode(
        b"y", b"550 5.7.1 <a%%b@x>??250 ok\0"
    )


def test_session_replies_only_where_the_protocol_wants_a_reply(table):
    session = fc.Session(lambda: table)
    assert session.handle(b"D", b"Mi\0Q1\0{auth_authen}\0a@acme.test\0") is None
    assert session.handle(b"L", b"From\0x@evil.test\0") == fc.encode(b"c")
    assert session.handle(b"A", b"") is None
    assert session.macro("auth_authen") is None and session.from_headers == []
    assert session.handle(b"Q", b"") is None and session.closed
    with pytest.raises(fc.ProtocolError):
        session.handle(b"Z", b"")


def test_fromcheck_imports_only_the_standard_library():
    tree = ast.parse(SCRIPT.read_text())
    modules = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert modules - {"__future__"} <= sys.stdlib_module_names
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


# --- The server, driven like Postfix drives it ---------------------------------------------------


class Mta:
    """The MTA side of the milter protocol, as Postfix's milter8 client speaks it."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(fc.encode(cmd, data))

    def _read(self, size: int) -> bytes:
        buf = b""
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise EOFError("milter closed the connection")
            buf += chunk
        return buf

    def recv(self) -> tuple[bytes, bytes]:
        (length,) = struct.unpack("!I", self._read(4))
        body = self._read(length)
        return body[:1], body[1:]

    def call(self, cmd: bytes, data: bytes = b"") -> tuple[bytes, bytes]:
        self.send(cmd, data)
        return self.recv()

    def assert_silent(self) -> None:
        self.sock.settimeout(0.2)
        try:
            with pytest.raises(TimeoutError):
                self.sock.recv(1)
        finally:
            self.sock.settimeout(5)

    def negotiate(self) -> None:
        cmd, data = self.call(b"O", struct.pack("!III", 6, 0x1FF, V6_PROTO_MASK))
        assert cmd == b"O" and struct.unpack("!III", data) == (6, 0, fc.PROTOCOL)

    def message(self, login: str | None, froms: list[str]) -> tuple[bytes, bytes]:
        """One message up to the end of its headers; the reply to SMFIC_EOH."""
        macros = b"i\0Q1\0{auth_type}\0PLAIN\0" if login else b"i\0Q1\0"
        if login:
            macros += b"{auth_authen}\0" + login.encode() + b"\0"
        self.send(b"D", b"M" + macros)
        assert self.call(b"M", b"<a@acme.test>\0SIZE=100\0") == (b"c", b"")
        for name, value in [("Received", "from x by y"), *(("From", f) for f in froms)]:
            assert self.call(b"L", f"{name}\0{value}\0".encode()) == (b"c", b"")
        self.send(b"D", b"N")
        return self.call(b"N")

    def finish(self, reply: tuple[bytes, bytes]) -> None:
        """After EOH: the body (when not rejected), then the abort Postfix sends per message."""
        if reply[0] == b"c":
            assert self.call(b"E") == (b"c", b"")
        self.send(b"A")

    def close(self) -> None:
        self.send(b"Q")
        self.sock.close()


def reject(addr: str, login: str) -> tuple[bytes, bytes]:
    return b"y", REJECT_FOREIGN.format(addr=addr, login=login).encode() + b"\0"


def fromcheck_cmd(sock: Path, logins: Path) -> list[str]:
    """How the relay runs it: the single file, by python3, without the smtpgw package (-I)."""
    return [sys.executable, "-I", str(SCRIPT), "--socket", str(sock), "--logins", str(logins)]


class Server:
    def __init__(self, directory: Path, logins: Path) -> None:
        self.socket = directory / "fromcheck.sock"
        self.logins = logins
        self.stderr = directory / "stderr"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [*fromcheck_cmd(self.socket, logins), "--socket-mode", "0600"],
                stderr=err,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                Mta(self.socket).sock.close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"fromcheck did not listen: {self.log()}")

    def log(self) -> str:
        return self.stderr.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


@pytest.fixture
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fc")  # short: unix socket paths are limited to 108 bytes
    logins = directory / "sender_logins"
    logins.write_text(TABLE)
    srv = Server(directory, logins)
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log()


@pytest.fixture
def mta(server):
    client = Mta(server.socket)
    client.negotiate()
    yield client
    client.sock.close()


@pytest.mark.parametrize(
    ("login", "froms", "expected"),
    [
        ("a@acme.test", ["A <a@acme.test>"], (b"c", b"")),
        ("a@acme.test", ["a@ACME.Test"], (b"c", b"")),
        ("a@acme.test", ["g@globex.test"], reject("g@globex.test", "a@acme.test")),
        ("a@acme.test", ['"ceo@acme.test" <x@evil.test>'], reject("x@evil.test", "a@acme.test")),
        ("a@acme.test", ["a@acme.test, g@globex.test"], reject("g@globex.test", "a@acme.test")),
        ("a@acme.test", ["a@acme.test", "g@globex.test"], reject("g@globex.test", "a@acme.test")),
        ("a@acme.test", [], (b"y", REQUIRED.format(login="a@acme.test").encode() + b"\0")),
        (None, ["x@evil.test"], (b"c", b"")),
        (None, [], (b"c", b"")),
    ],
)
def test_server_decides_at_end_of_headers(mta, login, froms, expected):
    reply = mta.message(login, froms)
    assert reply == expected
    mta.finish(reply)
    mta.assert_silent()
    mta.close()


def test_server_logs_one_line_per_rejection(server, mta):
    mta.finish(mta.message("a@acme.test", ["boss@globex.test"]))
    mta.close()
    assert server.stop() == 0
    lines = [line for line in server.log().splitlines() if "reject" in line]
    assert lines == [
        "WARNING Q1: reject login=a@acme.test from='boss@globex.test': "
        + REJECT_FOREIGN.format(addr="boss@globex.test", login="a@acme.test")
    ]


def test_abort_resets_the_message_between_messages_on_one_connection(mta):
    mta.send(b"D", b"Mi\0Q1\0{auth_authen}\0a@acme.test\0")
    assert mta.call(b"M", b"<a@acme.test>\0") == (b"c", b"")
    assert mta.call(b"L", b"From\0boss@globex.test\0") == (b"c", b"")
    mta.send(b"A")  # e.g. RSET before DATA ended
    assert mta.message("a@acme.test", ["a@acme.test"]) == (b"c", b"")
    mta.finish((b"c", b""))
    # The login of the message before is gone, too: a device's message after it is let through.
    mta.send(b"D", b"Mi\0Q2\0")
    assert mta.call(b"M", b"<dev@acme.test>\0") == (b"c", b"")
    assert mta.call(b"N") == (b"c", b"")
    mta.assert_silent()


def test_quit_new_connection_forgets_the_login(mta):
    assert mta.message("a@acme.test", []) == (
        b"y",
        REQUIRED.format(login="a@acme.test").encode() + b"\0",
    )
    mta.send(b"A")
    mta.send(b"D", b"Cj\0relay.test\0{auth_authen}\0a@acme.test\0")  # even a connect-stage login
    mta.send(b"K")
    assert mta.message(None, []) == (b"c", b"")
    mta.assert_silent()


def test_table_change_takes_effect_without_restart(server, mta):
    assert mta.message("a@acme.test", ["g@globex.test"]) == reject("g@globex.test", "a@acme.test")
    mta.send(b"A")
    new = server.logins.with_name("sender_logins.new")
    new.write_text("@globex.test a@acme.test\n")
    new.replace(server.logins)  # as Ansible's template module writes it
    time.sleep(fc.RECHECK_SECONDS + 0.2)
    assert mta.message("a@acme.test", ["g@globex.test"]) == (b"c", b"")
    mta.send(b"A")
    assert mta.message("a@acme.test", ["a@acme.test"]) == reject("a@acme.test", "a@acme.test")


def test_missing_table_tempfails_logins_only(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fc")
    server = Server(directory, directory / "absent")
    try:
        mta = Mta(server.socket)
        mta.negotiate()
        assert mta.message("a@acme.test", ["a@acme.test"]) == (b"t", b"")
        mta.send(b"A")
        assert mta.message(None, ["a@acme.test"]) == (b"c", b"")
        mta.close()
    finally:
        assert server.stop() == 0
    assert "cannot read the sender_logins table" in server.log()


def test_server_replaces_a_stale_socket_and_removes_it_on_sigterm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fc")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(directory / "fromcheck.sock"))
    stale.close()  # the file stays, nobody listens: what a killed instance leaves
    logins = directory / "sender_logins"
    logins.write_text(TABLE)
    server = Server(directory, logins)
    assert oct(server.socket.stat().st_mode & 0o777) == "0o600"
    held = Mta(server.socket)
    held.negotiate()  # still connected when SIGTERM comes
    assert server.stop() == 0
    with pytest.raises((EOFError, ConnectionError)):
        held.recv()  # hung up on
    assert not server.socket.exists()
    assert "Traceback" not in server.log()


def test_server_refuses_to_steal_a_live_socket(server):
    second = subprocess.run(
        fromcheck_cmd(server.socket, server.logins),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert second.returncode == 1
    assert "another instance is listening" in second.stderr
    Mta(server.socket).negotiate()  # the first one still serves
