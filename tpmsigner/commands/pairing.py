"""pair, devices and revoke: pairing agents by code comparison, and managing paired devices."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys

from ..discovery import PAIRING_SERVICE, Advertiser
from ..errors import ChannelError, ConfigError, ProtocolError
from ..pairing import (
    DEFAULT_PAIRING_PORT,
    DEFAULT_PAIRING_TIMEOUT,
    Hello,
    PairingRefusedError,
    Result,
    confirm_code,
    default_name,
    pairing_code,
    receive_hello,
    refuse,
    require_terminal,
    send,
)
from ..protocol import channel
from ..ratelimit import RateLimitedLogger
from ..signer.admission import HandshakeAdmission
from ..signer.devices import DeviceRegistry
from ..cliutil import print_json, print_table
from .common import resolve_home
from .signer import DEVICES_FILE, _static_key, add_mdns_options, parse_listen

logger = logging.getLogger("tpmsigner")


def _registry(args: argparse.Namespace) -> DeviceRegistry:
    return DeviceRegistry(resolve_home(args.home) / DEVICES_FILE)


def command_devices(args: argparse.Namespace) -> int:
    devices = _registry(args).load()
    if args.json:
        print_json(
            [
                {
                    "name": device.name,
                    "key": channel.format_public_key(device.public_key),
                    "fingerprint": channel.public_key_fingerprint(device.public_key),
                    "paired": device.paired,
                    "last_seen": device.last_seen,
                    "last_address": device.last_address,
                }
                for device in devices
            ]
        )
        return 0
    if not devices:
        print("no paired devices; pair one with 'tpmsigner pair'", file=sys.stderr)
        return 0
    rows = [("NAME", "KEY FINGERPRINT", "PAIRED", "LAST SEEN", "FROM")]
    for device in devices:
        rows.append(
            (
                device.name,
                channel.public_key_fingerprint(device.public_key),
                device.paired or "-",
                device.last_seen or "-",
                device.last_address or "-",
            )
        )
    print_table(rows)
    return 0


def command_revoke(args: argparse.Namespace) -> int:
    device = _registry(args).revoke(args.name)
    print(
        f"revoked device {device.name!r} with key {channel.public_key_fingerprint(device.public_key)}; "
        "a running 'tpmsigner serve' closes its connections within about a second",
        file=sys.stderr,
    )
    return 0


def command_pair(args: argparse.Namespace) -> int:
    require_terminal()
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise ConfigError(f"--timeout must be a positive, finite number of seconds, not {args.timeout}")
    host, port = parse_listen(args.listen)
    home = resolve_home(args.home)
    window = PairingWindow(
        static_key=_static_key(home),
        registry=DeviceRegistry(home / DEVICES_FILE),
        device_name=args.name,
        timeout=args.timeout,
    )
    return asyncio.run(window.run(host, port, args.listen, args.interface if args.mdns else None))


class PairingWindow:
    """A listener that pairs the first agent that completes a pairing handshake, then stops.

    Until then, anyone who reaches the port can start handshakes, so they
    pass the signer's admission limits (tpmsigner/signer/admission.py).
    Without them, silent connections from one address could take every
    file descriptor and make the real agent's handshake time out.  The
    warnings about rejected and failed handshakes are rate-limited, because
    they go to the terminal that shows the pairing code.
    """

    def __init__(
        self, static_key: channel.StaticKey, registry: DeviceRegistry, device_name: str | None, timeout: float
    ) -> None:
        self.static_key = static_key
        self.registry = registry
        self.device_name = device_name
        self.timeout = timeout
        self._claimed = False
        self._outcome: asyncio.Future[int] | None = None
        self._admission = HandshakeAdmission()
        self._admission_log = RateLimitedLogger(logger)
        self._handshake_log = RateLimitedLogger(logger)

    async def run(self, host: str, port: int, listen_text: str, mdns_interfaces: list[str] | None) -> int:
        """Open the window; mdns_interfaces None means no mDNS advertisement."""
        self._outcome = asyncio.get_running_loop().create_future()
        try:
            server = await asyncio.start_server(self._accept, host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen_text}: {exc.strerror or exc}") from None
        bound_port = server.sockets[0].getsockname()[1]
        advertiser = None
        try:
            if mdns_interfaces is not None:
                fingerprint = channel.public_key_fingerprint(self.static_key.public)
                advertiser = Advertiser(PAIRING_SERVICE, bound_port, fingerprint, host, mdns_interfaces)
                await advertiser.start()
            print(
                f"Waiting up to {self.timeout:g} s for an agent to pair on {host}:{bound_port}; "
                f"run 'tpmsigner-agent pair' on the agent host.",
                flush=True,
            )
            logger.info("pairing window open on %s port %d", host, bound_port)
            return await self._wait(server)
        finally:
            server.close()
            if advertiser is not None:
                await advertiser.close()

    async def _wait(self, server: asyncio.base_events.Server) -> int:
        assert self._outcome is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._outcome), self.timeout)
        except asyncio.TimeoutError:
            if not self._claimed:
                raise ConfigError(f"no agent paired within {self.timeout:g} s; the pairing window is closed") from None
        # Once an agent is being paired, the exchange has its own limit.
        server.close()
        return await self._outcome

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        host = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if self._claimed:
            self._admission_log.warning("pairing connection from %s rejected: another pairing is under way", address)
            writer.close()
            return
        rejection = self._admission.admit(host)
        if rejection is not None:
            self._admission_log.warning("pairing connection from %s closed before the handshake: %s", address, rejection)
            writer.close()
            return
        try:
            secure = await channel.respond_pairing(reader, writer, self.static_key)
        except ChannelError as exc:
            self._handshake_log.warning("pairing connection from %s failed during the handshake: %s", address, exc)
            writer.close()
            return
        finally:
            self._admission.finish(host)
        if self._claimed:
            self._admission_log.warning("pairing connection from %s rejected: another pairing is under way", address)
            await secure.close()
            return
        self._claimed = True
        assert self._outcome is not None
        try:
            result = await asyncio.wait_for(self._pair(secure, address), self.timeout)
        except asyncio.TimeoutError:
            error: Exception = ConfigError(f"the pairing did not finish within {self.timeout:g} s; nothing was stored")
        except PairingRefusedError as exc:
            error = exc
        except (ChannelError, ProtocolError) as exc:
            error = ConfigError(f"pairing with {address} failed: {exc}; nothing was stored")
        except ConfigError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - the waiting command must end with an error, not hang
            logger.exception("pairing with %s failed with an unexpected error", address)
            error = ConfigError(f"pairing with {address} failed: {exc}; see the log")
        else:
            self._outcome.set_result(result)
            await secure.close()
            return
        await secure.close()
        if not self._outcome.done():
            self._outcome.set_exception(error)

    async def _pair(self, secure: channel.NoiseChannel, address: str) -> int:
        agent_key = secure.remote_static
        hello = await receive_hello(secure)
        name = self.device_name or hello.name
        try:
            self.registry.check_allow(name, agent_key)
        except ConfigError as exc:
            reason = f"the signer cannot store the device as {name!r}: {exc}"
            await refuse(secure, reason)
            hint = "" if self.device_name else "; choose a device name with --name"
            raise ConfigError(f"{reason}{hint}") from None
        await send(secure, Hello(default_name()))

        print(
            f"Agent {hello.name!r} at {address} with key {channel.public_key_fingerprint(agent_key)} "
            f"asks to pair as device {name!r}.",
            flush=True,
        )
        await confirm_code(secure, pairing_code(secure.handshake_hash))

        try:
            device = self.registry.allow(name, agent_key)
        except ConfigError as exc:
            await send(secure, Result(False, f"the signer could not store the device: {exc}"))
            raise
        await send(secure, Result(True, f"paired as device {device.name!r}"))
        print(f"Paired device {device.name!r} with key {channel.public_key_fingerprint(agent_key)}.", flush=True)
        return 0


def add_parsers(commands) -> None:
    pair = commands.add_parser(
        "pair", help="open a pairing window for one agent, confirmed by comparing a six-digit code"
    )
    pair.add_argument("--name", help="device name for the agent (default: the name the agent proposes, its host name)")
    pair.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PAIRING_TIMEOUT,
        help=f"seconds the window stays open, and then the most the exchange may take (default: "
        f"{DEFAULT_PAIRING_TIMEOUT:g})",
    )
    pair.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PAIRING_PORT}",
        help=f"HOST:PORT to listen on for the pairing (default: 127.0.0.1:{DEFAULT_PAIRING_PORT})",
    )
    add_mdns_options(pair, "_tpmsigner-pair._tcp")
    pair.set_defaults(handler=command_pair)

    devices = commands.add_parser("devices", help="list the paired agents")
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")
    devices.set_defaults(handler=command_devices)

    revoke = commands.add_parser("revoke", help="remove a paired agent; its open connections are closed")
    revoke.add_argument("name", help="the device name, as 'tpmsigner devices' lists it")
    revoke.set_defaults(handler=command_revoke)
