"""fromcheck: a Postfix milter that keeps each login to its own tenant's domains in header From.

Postfix already holds the envelope sender to the login (reject_authenticated_sender_login_mismatch
with smtpd_sender_login_maps); the header From - the address people see - needs content
inspection. At the end of the headers, a session authenticated as a login ({auth_authen}) gets:

- continue when every address of every From header has a domain that the login owns in the
  relay's sender_logins table (`@domain login,login` lines, the text source of the hash: map);
- 550 5.7.1 when one does not, or when there is no From address at all;
- tempfail when the table cannot be read (never accept on a missing table).

Sessions without a login (devices on tenant networks) are left alone.

Stdlib only and a single file: the relay role copies it onto Debian 12 relays and runs it with
their python3 (3.11) under systemd:

    python3 fromcheck.py --socket /var/spool/postfix/smtpgw/fromcheck.sock \
        --logins /etc/postfix/smtpgw/sender_logins --socket-group postfix

The Sendmail milter protocol (version 6, as Postfix speaks it): every packet is a 4-byte
big-endian length, then one command byte, then its data. Pure functions (table parsing, the
decision, packet coding, the per-connection state machine) are kept apart from the I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import grp
import logging
import os
import re
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.headerregistry import HeaderRegistry

log = logging.getLogger("fromcheck")

DEFAULT_LOGINS = "/etc/postfix/smtpgw/sender_logins"
RECHECK_SECONDS = 1.0
MAX_PACKET = 1 << 21  # Postfix's header_size_limit is 100 KiB; we never ask for the body.
MAX_SHOWN = 200  # characters of an address quoted back in a reply

Table = Mapping[str, frozenset[str]]

# Commands from the MTA (libmilter mfdef.h, Postfix milter8.c).
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies to the MTA.
SMFIR_CONTINUE = b"c"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Protocol flags: events the milter does not want (no NR_* flags: we always reply).
SMFIP_NOCONNECT = 1 << 0
SMFIP_NOHELO = 1 << 1
SMFIP_NOMAIL = 1 << 2
SMFIP_NORCPT = 1 << 3
SMFIP_NOBODY = 1 << 4
SMFIP_NOHDRS = 1 << 5
SMFIP_NOEOH = 1 << 6
SMFIP_NOUNKNOWN = 1 << 8
SMFIP_NODATA = 1 << 9

MILTER_VERSION = 6
ACTIONS = 0  # we never modify a message
PROTOCOL = (
    SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NORCPT | SMFIP_NOBODY | SMFIP_NOUNKNOWN | SMFIP_NODATA
)

# Macros of these stages belong to one message; an abort drops them.
_MESSAGE_STAGES = frozenset("MRTLNBE")
_LENGTH = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")
_HEADERS = HeaderRegistry()


class ProtocolError(Exception):
    """The peer sent something that is not the milter protocol."""


# --- The sender_logins table -------------------------------------------------------------------


def ascii_domain(domain: str) -> str:
    """A domain as compared: lowercase, IDNA ASCII, without a trailing dot; ValueError if bad."""
    name = domain.strip().lower().removesuffix(".")
    if not name:
        raise ValueError("empty domain")
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError as err:
        raise ValueError(f"not a valid domain name: {domain!r} ({err})") from None


def parse_logins(text: str) -> tuple[dict[str, frozenset[str]], list[str]]:
    """Login -> domains it owns, from Postfix-style `@domain login,login` lines.

    Comments and blank lines are skipped, lines starting with whitespace continue the one
    before (as in postmap), logins are separated by commas and/or spaces. Keys that are not
    `@domain` are ignored: the relay writes none. Returns the table and the ignored lines, as
    messages for people.
    """
    entries: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0].isspace() and entries:
            entries[-1] = (entries[-1][0], f"{entries[-1][1]} {stripped}")
        else:
            entries.append((number, stripped))
    owners: dict[str, set[str]] = {}
    ignored: list[str] = []
    for number, line in entries:
        key, _, value = re.sub(r"\s", " ", line).partition(" ")
        logins = [login.lower() for login in re.split(r"[\s,]+", value) if login]
        if not key.startswith("@") or not logins:
            ignored.append(f"line {number}: {line!r} is not '@domain login[,login...]'")
            continue
        try:
            domain = ascii_domain(key[1:])
        except ValueError as err:
            ignored.append(f"line {number}: {err}")
            continue
        for login in logins:
            owners.setdefault(login, set()).add(domain)
    return {login: frozenset(domains) for login, domains in owners.items()}, ignored


class LoginTable:
    """The sender_logins file, re-read when it changes (looked at no more than once a second).

    `current()` is None while the file is missing or unreadable: the caller tempfails.
    """

    def __init__(
        self,
        path: str,
        recheck: float = RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._recheck = recheck
        self._clock = clock
        self._checked: float | None = None
        self._signature: tuple[int, int, int] | None = None
        self._table: dict[str, frozenset[str]] | None = None
        self._problem: str | None = None

    def current(self) -> Table | None:
        now = self._clock()
        if self._checked is not None and now - self._checked < self._recheck:
            return self._table
        self._checked = now
        try:
            st = os.stat(self.path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if signature != self._signature:
                with open(self.path, encoding="utf-8") as fh:
                    table, ignored = parse_logins(fh.read())
                self._table, self._signature = table, signature
                for message in ignored:
                    log.warning("%s: ignored %s", self.path, message)
                log.info("%s: loaded, %d logins", self.path, len(table))
                self._problem = None
        except (OSError, UnicodeDecodeError) as err:
            problem = f"cannot read the sender_logins table {self.path}: {err}"
            if problem != self._problem:
                log.error("%s; authenticated mail is tempfailed until it is readable", problem)
            self._table, self._signature, self._problem = None, None, problem
        return self._table


# --- The decision ------------------------------------------------------------------------------


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n", " ", re.sub(r"\r?\n(?=[ \t])", "", value))


def header_addresses(value: str) -> list[str] | None:
    """The addresses of one From header value, lowercased with IDNA ASCII domains.

    Both the classic parser (email.utils.getaddresses) and the RFC 5322 one (headerregistry)
    read the value and every address either finds counts, so a header crafted to read one way
    to one parser and another way to the other gains nothing. None when it cannot be parsed.
    An address whose domain is not a valid name is returned as written (it will match nothing).
    """
    value = _unfold(value)
    found = [addr for _, addr in email.utils.getaddresses([value])]
    try:
        found += [address.addr_spec for address in _HEADERS("from", value).addresses]
    except Exception:  # the RFC 5322 parser raises more than one kind of error on garbage
        return None
    if not found or not all(addr.strip() not in ("", "<>") for addr in found):
        return None
    addresses: list[str] = []
    for addr in found:
        local, at, domain = addr.strip().lower().rpartition("@")
        try:
            normal = f"{local}@{ascii_domain(domain)}" if at and local else addr.lower()
        except ValueError:
            normal = addr.lower()
        if normal not in addresses:
            addresses.append(normal)
    return addresses


def _shown(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def decide(login: str | None, from_headers: Sequence[str], table: Table) -> str | None:
    """None to let the message through, else the SMTP reply that rejects it.

    Without a login (an unauthenticated device) every message goes through. With one, every
    address of every From header must be in a domain the login owns, and there must be one.
    """
    if not login:
        return None
    owned = table.get(login.lower(), frozenset())
    addresses: list[str] = []
    for value in from_headers:
        parsed = header_addresses(value)
        if parsed is None:
            addresses = []
            break
        addresses += parsed
    if not addresses:
        return (
            "550 5.7.1 a From header with an address of login "
            f"{_shown(login)}'s domains is required"
        )
    for addr in addresses:
        local, at, domain = addr.rpartition("@")
        if not (at and local and domain in owned):
            return (
                f"550 5.7.1 header From <{_shown(addr)}> is not a domain of login {_shown(login)}"
            )
    return None


# --- Packets -----------------------------------------------------------------------------------


def encode(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length of command + data (4 bytes, big-endian), command byte, data."""
    return _LENGTH.pack(len(command) + len(data)) + command + data


def decode(packet: bytes) -> tuple[bytes, bytes, bytes]:
    """(command, data, rest) from the front of a buffer; ProtocolError if it is incomplete."""
    if len(packet) < _LENGTH.size:
        raise ProtocolError("short packet header")
    (length,) = _LENGTH.unpack_from(packet)
    if not 1 <= length <= MAX_PACKET:
        raise ProtocolError(f"bad packet length {length}")
    end = _LENGTH.size + length
    if len(packet) < end:
        raise ProtocolError("short packet")
    return packet[4:5], packet[5:end], packet[end:]


async def read_packet(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next (command, data), or None when the MTA closed the connection between packets."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as err:
        if err.partial:
            raise ProtocolError("connection closed inside a packet header") from None
        return None
    (length,) = _LENGTH.unpack(head)
    if not 1 <= length <= MAX_PACKET:
        raise ProtocolError(f"bad packet length {length}")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed inside a packet") from None
    return body[:1], body[1:]


def optneg_reply(data: bytes) -> bytes:
    """Our answer to the MTA's SMFIC_OPTNEG (version, actions, protocol: 3 x 4 bytes)."""
    if len(data) < _OPTNEG.size:
        raise ProtocolError(f"option negotiation of {len(data)} bytes, expected 12")
    version, _actions, protocol = _OPTNEG.unpack_from(data)
    if version < 2:
        raise ProtocolError(f"MTA milter protocol version {version} is too old")
    # Ask only to be spared events the MTA offers to skip; the rest we answer anyway.
    return encode(
        SMFIC_OPTNEG, _OPTNEG.pack(min(version, MILTER_VERSION), ACTIONS, PROTOCOL & protocol)
    )


def replycode(text: str) -> bytes:
    """SMFIR_REPLYCODE: one printable ASCII line, '%' doubled (Postfix and Sendmail undouble)."""
    line = "".join(ch if " " <= ch <= "~" else "?" for ch in text).replace("%", "%%")
    return encode(SMFIR_REPLYCODE, line.encode("ascii") + b"\0")


def _strings(data: bytes) -> list[str]:
    return [part.decode("utf-8", "replace") for part in data.split(b"\0")]


def parse_macros(data: bytes) -> tuple[str, dict[str, str]]:
    """SMFIC_MACRO: the stage (command byte), then NUL-terminated name, value pairs.

    Names lose their braces: Postfix sends `{auth_authen}`, we store `auth_authen`.
    """
    if not data:
        raise ProtocolError("macro packet without a stage")
    pairs = data[1:]
    parts = _strings(pairs[:-1] if pairs.endswith(b"\0") else pairs)
    macros: dict[str, str] = {}
    for name, value in zip(parts[0::2], parts[1::2], strict=False):
        if name.startswith("{") and name.endswith("}"):
            name = name[1:-1]
        macros[name] = value
    return chr(data[0]), macros


def parse_header(data: bytes) -> tuple[str, str]:
    """SMFIC_HEADER: NUL-terminated name, then NUL-terminated value."""
    name, sep, rest = data.partition(b"\0")
    if not sep:
        raise ProtocolError("header packet without a NUL after the name")
    value = rest[:-1] if rest.endswith(b"\0") else rest
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


# --- One MTA connection ------------------------------------------------------------------------


class Session:
    """The milter state of one connection from Postfix: packets in, replies out. No I/O.

    `handle` returns the reply packet (None for commands that take no reply); after
    SMFIC_QUIT, `closed` is set.
    """

    def __init__(self, table: Callable[[], Table | None]) -> None:
        self._table = table
        self.macros: dict[str, dict[str, str]] = {}
        self.from_headers: list[str] = []
        self.closed = False

    def macro(self, name: str) -> str | None:
        for stage in self.macros.values():
            if stage.get(name):
                return stage[name]
        return None

    def reset_message(self) -> None:
        self.from_headers = []
        for stage in _MESSAGE_STAGES:
            self.macros.pop(stage, None)

    def handle(self, command: bytes, data: bytes) -> bytes | None:
        if command == SMFIC_OPTNEG:
            return optneg_reply(data)
        if command == SMFIC_MACRO:
            stage, macros = parse_macros(data)
            self.macros[stage] = macros
            return None
        if command == SMFIC_MAIL:
            self.from_headers = []
            return encode(SMFIR_CONTINUE)
        if command == SMFIC_HEADER:
            name, value = parse_header(data)
            if name.strip().lower() == "from":
                self.from_headers.append(value)
            return encode(SMFIR_CONTINUE)
        if command == SMFIC_EOH:
            return self._end_of_headers()
        if command == SMFIC_BODYEOB:
            self.reset_message()
            return encode(SMFIR_CONTINUE)
        if command == SMFIC_ABORT:
            self.reset_message()
            return None
        if command == SMFIC_QUIT_NC:
            self.reset_message()
            self.macros = {}
            return None
        if command == SMFIC_QUIT:
            self.closed = True
            return None
        if command in (
            SMFIC_CONNECT,
            SMFIC_HELO,
            SMFIC_RCPT,
            SMFIC_DATA,
            SMFIC_UNKNOWN,
            SMFIC_BODY,
        ):
            return encode(SMFIR_CONTINUE)
        raise ProtocolError(f"unknown milter command {command!r}")

    def _end_of_headers(self) -> bytes:
        login = self.macro("auth_authen")
        if not login:
            return encode(SMFIR_CONTINUE)
        queue_id = self.macro("i") or "NOQUEUE"
        table = self._table()
        if table is None:
            log.warning("%s: tempfail login=%s: no sender_logins table", queue_id, login)
            return encode(SMFIR_TEMPFAIL)
        reply = decide(login, self.from_headers, table)
        if reply is None:
            return encode(SMFIR_CONTINUE)
        shown = "; ".join(repr(_shown(value)) for value in self.from_headers) or "none"
        log.warning("%s: reject login=%s from=%s: %s", queue_id, login, shown, reply)
        return replycode(reply)


# --- Server ------------------------------------------------------------------------------------


async def _serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    table: LoginTable,
    open_writers: set[asyncio.StreamWriter],
) -> None:
    session = Session(table.current)
    open_writers.add(writer)
    try:
        while not session.closed:
            packet = await read_packet(reader)
            if packet is None:
                break
            reply = session.handle(*packet)
            if reply is not None:
                writer.write(reply)
                await writer.drain()
    except ProtocolError as err:
        log.error("dropping an MTA connection: %s", err)
    except ConnectionError:
        pass
    finally:
        open_writers.discard(writer)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by a dead instance; refuse a live one or anything not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"fromcheck: {path} exists and is not a socket; remove it or pick another")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise SystemExit(f"fromcheck: another instance is listening on {path}; stop it first")


async def serve(
    socket_path: str,
    table: LoginTable,
    mode: int = 0o660,
    group: str | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Listen on a unix socket until SIGTERM or SIGINT, then remove it."""
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SystemExit(f"fromcheck: --socket-group {group!r} is not a group here") from None
    _remove_stale_socket(socket_path)
    table.current()  # load now, so a bad table shows in the log at start
    open_writers: set[asyncio.StreamWriter] = set()
    handlers: set[asyncio.Task] = set()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(_serve_connection(reader, writer, table, open_writers))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    old_umask = os.umask(0o177)  # nobody gets in before the chmod below
    try:
        server = await asyncio.start_unix_server(connected, path=socket_path)
    finally:
        os.umask(old_umask)
    try:
        if gid != -1:
            os.chown(socket_path, -1, gid)
        os.chmod(socket_path, mode)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("listening on %s, logins from %s", socket_path, table.path)
        if ready:
            ready()
        await stop.wait()
        log.info("stopping")
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        # Hang up on Postfix (it applies milter_default_action) and let each handler end.
        for writer in list(open_writers):
            writer.close()
        if handlers:
            await asyncio.wait(handlers, timeout=5)


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0660") from None


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fromcheck",
        description="Milter: a login may only use its own tenant's domains in the header From.",
    )
    parser.add_argument("--socket", required=True, help="unix socket to listen on")
    parser.add_argument(
        "--logins", default=DEFAULT_LOGINS, help=f"sender_logins table (default {DEFAULT_LOGINS})"
    )
    parser.add_argument("--socket-mode", type=_mode, default=0o660, help="octal (default 0660)")
    parser.add_argument("--socket-group", help="group of the socket, e.g. postfix")
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(serve(args.socket, LoginTable(args.logins), args.socket_mode, args.socket_group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
