"""DNS-SD over multicast DNS (zeroconf): service names, TXT records, advertising.

``tpmsigner serve`` advertises ``_tpmsigner._tcp.local.`` and ``tpmsigner
pair`` advertises ``_tpmsigner-pair._tcp.local.`` while its window is open.
Both carry the TXT records ``fp`` (the fingerprint of the signer's Noise
static key, as ``public_key_fingerprint`` prints it) and ``v`` (the
protocol version, ``1``).  An advertisement is only a hint: the agent
still checks the signer's full static key in the Noise handshake.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion, InterfaceChoice, NonUniqueNameException
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from .errors import ConfigError
from .pairing import default_name

logger = logging.getLogger(__name__)

SIGNER_SERVICE = "_tpmsigner._tcp.local."
PAIRING_SERVICE = "_tpmsigner-pair._tcp.local."
PROTOCOL_VERSION = "1"
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class TxtRecord:
    """The TXT fields of a tpmsigner advertisement; None where a field is missing or not UTF-8."""

    fingerprint: str | None
    version: str | None


def txt_properties(fingerprint: str) -> dict[str, str]:
    return {"fp": fingerprint, "v": PROTOCOL_VERSION}


def parse_txt(properties: dict[bytes, bytes | None]) -> TxtRecord:
    def text(key: bytes) -> str | None:
        value = properties.get(key)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None

    return TxtRecord(fingerprint=text(b"fp"), version=text(b"v"))


def interface_addresses(specs: list[str]) -> list[str]:
    """Turn ``--interface`` values (IP addresses or interface names) into IP addresses.

    Raises ConfigError for a name that no interface has, or an interface
    without addresses.
    """
    addresses: list[str] = []
    adapters = ifaddr.get_adapters()
    for spec in specs:
        try:
            addresses.append(str(ipaddress.ip_address(spec)))
            continue
        except ValueError:
            pass
        adapter = next((adapter for adapter in adapters if adapter.nice_name == spec or adapter.name == spec), None)
        if adapter is None:
            known = ", ".join(sorted(adapter.nice_name for adapter in adapters))
            raise ConfigError(f"invalid --interface {spec!r}: not an IP address or an interface name ({known})")
        found = [ip.ip if isinstance(ip.ip, str) else ip.ip[0] for ip in adapter.ips]
        if not found:
            raise ConfigError(f"interface {spec!r} has no IP address to use for mDNS")
        addresses.extend(found)
    return addresses


def zeroconf_options(interfaces: list[str] | None) -> dict[str, object]:
    """Return the AsyncZeroconf keyword arguments for these interface addresses, or for all when None."""
    if not interfaces:
        return {"interfaces": InterfaceChoice.All, "ip_version": IPVersion.All}
    any_ipv6 = any(ipaddress.ip_address(address).version == 6 for address in interfaces)
    return {"interfaces": list(interfaces), "ip_version": IPVersion.All if any_ipv6 else IPVersion.V4Only}


def _listen_addresses(listen_host: str) -> list[str]:
    """Return the IP addresses that a specific --listen host stands for."""
    try:
        return [str(ipaddress.ip_address(listen_host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(listen_host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve the listen host {listen_host!r} for mDNS: {exc}") from None
    return sorted({str(info[4][0]) for info in infos})


def _all_addresses(ipv6: bool) -> list[str]:
    addresses = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            parsed = ipaddress.ip_address(address)
            if parsed.is_loopback or (parsed.version == 6 and not ipv6):
                continue
            addresses.append(address)
    return addresses


def plan_advertisement(listen_host: str, interfaces: list[str]) -> tuple[list[str], list[str] | None]:
    """Return the addresses to advertise and the mDNS interfaces (None for all).

    A signer that listens on one address is advertised with that address,
    on that address's interface only, unless ``--interface`` selects others.
    A signer that listens on every address is advertised with the addresses
    of the chosen interfaces, or of all non-loopback interfaces.
    """
    host = listen_host.strip("[]")
    if host not in WILDCARD_HOSTS:
        addresses = _listen_addresses(host)
        return addresses, interfaces or addresses
    if interfaces:
        addresses = [a for a in interfaces if host == "::" or ipaddress.ip_address(a).version == 4]
        return addresses, interfaces
    addresses = _all_addresses(ipv6=host == "::")
    if not addresses:
        raise ConfigError("no non-loopback address to advertise over mDNS; give --interface or --no-mdns")
    return addresses, None


class Advertiser:
    """One DNS-SD service advertised over mDNS until close()."""

    def __init__(
        self,
        service_type: str,
        port: int,
        fingerprint: str,
        listen_host: str,
        interfaces: list[str] | None = None,
    ) -> None:
        self.service_type = service_type
        self.port = port
        self.fingerprint = fingerprint
        self.addresses, self.interfaces = plan_advertisement(listen_host, interface_addresses(interfaces or []))
        self._zeroconf: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    async def start(self) -> None:
        name = default_name()
        self._info = AsyncServiceInfo(
            self.service_type,
            f"{name}.{self.service_type}",
            port=self.port,
            properties=txt_properties(self.fingerprint),
            parsed_addresses=self.addresses,
            server=f"{name}.local.",
        )
        self._zeroconf = AsyncZeroconf(**zeroconf_options(self.interfaces))
        try:
            # allow_name_change picks "name (2)" when another host uses the name.
            await self._zeroconf.async_register_service(self._info, allow_name_change=True)
        except NonUniqueNameException as exc:
            await self.close()
            raise ConfigError(f"cannot advertise {self.service_type} over mDNS: {exc}") from None
        logger.info(
            "advertising %s as %r on port %d at %s over mDNS on %s",
            self.service_type,
            self._info.name,
            self.port,
            ", ".join(self.addresses),
            ", ".join(self.interfaces) if self.interfaces else "all interfaces",
        )

    async def close(self) -> None:
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is None:
            return
        if self._info is not None:
            try:
                await zeroconf.async_unregister_service(self._info)
            except Exception as exc:  # noqa: BLE001 - stopping must go on even if the goodbye fails
                logger.warning("withdrawing the mDNS advertisement failed: %s", exc)
        await zeroconf.async_close()
