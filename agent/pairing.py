"""The agent's side of pairing: find the pairing window, compare codes, pin the signer."""

from __future__ import annotations

import asyncio
import logging

from tpmsigner.discovery import PAIRING_SERVICE
from tpmsigner.errors import ChannelError, ConfigError, ProtocolError
from tpmsigner.pairing import (
    Hello,
    PairingRefusedError,
    Result,
    confirm_code,
    pairing_code,
    receive,
    receive_hello,
    refuse,
    send,
)
from tpmsigner.protocol import channel

from .config import MDNS_ADDRESS, AgentHome, PinnedSigner, parse_address, parse_signer_address
from .discovery import DiscoveredService, browse, format_host_port, open_first

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0


async def _connect_to_address(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    host, port = parse_address(address)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except asyncio.TimeoutError:
        raise ConfigError(f"cannot connect to the pairing window at {address}: timed out") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot connect to the pairing window at {address}: {exc.strerror or exc}; "
            "check that 'tpmsigner pair' runs there and listens on that address"
        ) from None
    return reader, writer, address


async def _connect_by_mdns(
    browse_timeout: float, interfaces: list[str] | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    windows = await browse(PAIRING_SERVICE, browse_timeout, interfaces)
    if not windows:
        raise ConfigError(
            f"no pairing window found over mDNS within {browse_timeout:g} s; run 'tpmsigner pair' on the signer "
            "host, or give its HOST:PORT"
        )
    if len(windows) > 1:
        # Picking one would let anyone on the network open a window first.
        listing = ", ".join(_describe(window) for window in windows)
        raise ConfigError(f"found {len(windows)} pairing windows ({listing}); give the HOST:PORT of yours")
    try:
        return await open_first(windows[0])
    except OSError as exc:
        raise ConfigError(str(exc)) from None


def _describe(service: DiscoveredService) -> str:
    addresses = " ".join(format_host_port(address, service.port) for address in service.addresses)
    return f"{service.instance} at {addresses or 'no address'}"


async def pair_with_signer(
    home: AgentHome,
    address: str | None,
    device_name: str,
    signer_name: str | None,
    signer_address: str | None,
    browse_timeout: float,
    interfaces: list[str] | None,
) -> PinnedSigner:
    """Pair with a signer's pairing window at ``address``, or the one found over mDNS when None.

    The signer is pinned under ``signer_name`` (default: the name it
    proposes) with ``signer_address`` (default: ``mdns``) only after both
    sides confirmed the code and the signer reported that it stored this
    agent's key.
    """
    pinned_address = signer_address or MDNS_ADDRESS
    parse_signer_address(pinned_address)   # reject a bad --signer-address before anyone is asked
    static_key = home.static_key()
    if address is not None:
        reader, writer, where = await _connect_to_address(address)
    else:
        reader, writer, where = await _connect_by_mdns(browse_timeout, interfaces)

    try:
        secure = await channel.initiate_pairing(reader, writer, static_key)
    except ChannelError as exc:
        writer.close()
        raise ConfigError(f"pairing with {where} failed during the handshake: {exc}") from None
    try:
        return await _exchange(home, secure, where, device_name, signer_name, pinned_address)
    except (ChannelError, ProtocolError) as exc:
        raise ConfigError(f"pairing with {where} failed: {exc}; nothing was stored") from None
    finally:
        await secure.close()


async def _exchange(
    home: AgentHome,
    secure: channel.NoiseChannel,
    where: str,
    device_name: str,
    signer_name: str | None,
    pinned_address: str,
) -> PinnedSigner:
    signer_key = secure.remote_static
    await send(secure, Hello(device_name))
    hello = await receive_hello(secure)
    name = signer_name or hello.name
    try:
        home.check_trust(name, signer_key)
    except ConfigError as exc:
        await refuse(secure, f"the agent cannot pin the signer as {name!r}")
        hint = "" if signer_name else "; choose a signer name with --name"
        raise ConfigError(f"cannot pin the signer as {name!r}: {exc}{hint}") from None

    print(
        f"Signer {hello.name!r} at {where} with key {channel.public_key_fingerprint(signer_key)} "
        f"offers to pair; it will be pinned as signer {name!r}.",
        flush=True,
    )
    await confirm_code(secure, pairing_code(secure.handshake_hash))
    print("Waiting for the signer to store this device.", flush=True)

    result = await receive(secure)
    if not isinstance(result, Result):
        raise ProtocolError(f"expected a RESULT pairing message, received {type(result).__name__}")
    if not result.paired:
        raise PairingRefusedError(f"the signer did not pair: {result.message}; nothing was stored here")
    return home.trust(name, pinned_address, channel.format_public_key(signer_key))
