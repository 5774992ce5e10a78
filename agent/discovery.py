"""Find signers and pairing windows over mDNS (zeroconf), and connect to one of their addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from tpmsigner.discovery import interface_addresses, parse_txt, zeroconf_options

from .config import DEFAULT_BROWSE_TIMEOUT

logger = logging.getLogger(__name__)

# How long one resolution (SRV, TXT and address records) may take.
RESOLVE_TIMEOUT = 3.0
CONNECT_TIMEOUT_PER_ADDRESS = 3.0


@dataclass(frozen=True)
class DiscoveredService:
    """One advertisement: its DNS-SD instance name, where it listens, and its TXT fields."""

    name: str
    addresses: tuple[str, ...]   # IPv6 link-local addresses carry their scope, as in fe80::1%eth0
    port: int
    fingerprint: str | None
    version: str | None

    @property
    def instance(self) -> str:
        """The instance name without the service type, as a person would call it."""
        service = self.name.split("._", 1)
        return service[0]


def format_host_port(address: str, port: int) -> str:
    """Return ``HOST:PORT``, with brackets around an IPv6 address and its scope, as in ``[fe80::1%2]:7810``."""
    host = address if ipaddress.ip_address(address.split("%", 1)[0]).version == 4 else f"[{address}]"
    return f"{host}:{port}"


async def _resolve(zeroconf: Zeroconf, service_type: str, name: str) -> DiscoveredService | None:
    info = AsyncServiceInfo(service_type, name)
    if not await info.async_request(zeroconf, int(RESOLVE_TIMEOUT * 1000)):
        logger.debug("mDNS service %r did not resolve within %g s", name, RESOLVE_TIMEOUT)
        return None
    if info.port is None:
        return None
    txt = parse_txt(info.properties)
    return DiscoveredService(
        name=name,
        addresses=tuple(info.parsed_scoped_addresses()),
        port=info.port,
        fingerprint=txt.fingerprint,
        version=txt.version,
    )


async def browse(
    service_type: str,
    timeout: float = DEFAULT_BROWSE_TIMEOUT,
    interfaces: list[str] | None = None,
    fingerprint: str | None = None,
) -> list[DiscoveredService]:
    """Return the services of ``service_type`` seen within ``timeout`` seconds.

    With ``fingerprint``, return as soon as one service with that ``fp``
    TXT record has resolved, and only that one.  ``interfaces`` limits the
    mDNS traffic to the interfaces with these IP addresses or names.
    Raises ConfigError for a name that no interface has.
    """
    found: dict[str, DiscoveredService] = {}
    names: asyncio.Queue[str] = asyncio.Queue()
    match = asyncio.Event()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.put_nowait(name)

    async def resolve_all(zeroconf: Zeroconf) -> None:
        pending: set[asyncio.Task[None]] = set()

        async def resolve_one(name: str) -> None:
            service = await _resolve(zeroconf, service_type, name)
            if service is None:
                return
            found[name] = service
            if fingerprint is not None and service.fingerprint == fingerprint:
                match.set()

        try:
            while True:
                task = asyncio.create_task(resolve_one(await names.get()))
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for task in pending:
                task.cancel()

    async_zeroconf = AsyncZeroconf(**zeroconf_options(interface_addresses(interfaces) if interfaces else None))
    browser = AsyncServiceBrowser(async_zeroconf.zeroconf, [service_type], handlers=[on_change])
    resolver = asyncio.create_task(resolve_all(async_zeroconf.zeroconf))
    try:
        try:
            await asyncio.wait_for(match.wait(), timeout)
        except asyncio.TimeoutError:
            pass
    finally:
        resolver.cancel()
        await asyncio.gather(resolver, return_exceptions=True)
        await browser.async_cancel()
        await async_zeroconf.async_close()

    services = sorted(found.values(), key=lambda service: service.name)
    if fingerprint is not None:
        services = [service for service in services if service.fingerprint == fingerprint]
    return services


async def open_first(
    service: DiscoveredService, timeout_per_address: float = CONNECT_TIMEOUT_PER_ADDRESS
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Connect to the first of the service's addresses that accepts a connection; return the streams and the address used.

    getaddrinfo reads the ``%scope`` of an IPv6 link-local address, which
    zeroconf sets to the index of the interface the answer came in on.

    Raises OSError naming every address tried when none answers.
    """
    failures = []
    for address in service.addresses:
        where = format_host_port(address, service.port)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address, service.port), timeout_per_address
            )
        except asyncio.TimeoutError:
            failures.append(f"{where}: timed out after {timeout_per_address:g} s")
            continue
        except OSError as exc:
            failures.append(f"{where}: {exc.strerror or exc}")
            continue
        return reader, writer, where
    if not failures:
        raise OSError(f"mDNS service {service.name!r} advertises no address")
    raise OSError(f"cannot connect to mDNS service {service.name!r} at any address ({'; '.join(failures)})")
