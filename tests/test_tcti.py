"""Which TCTI strings reach the TPM through a resource manager."""

from __future__ import annotations

import pytest

from tpmsigner.loadedkeys import KEYS_WITH_RESOURCE_MANAGER, KEYS_WITHOUT_RESOURCE_MANAGER, loaded_key_capacity
from tpmsigner.tcti import has_resource_manager, tpm_identity

WITHOUT_RESOURCE_MANAGER = [
    "swtpm:host=127.0.0.1,port=2321",
    "swtpm",
    "mssim:host=localhost,port=2321",
    "libtpms",
    "device:/dev/tpm0",
    "device:/dev/tpm1",
    "spi-helper",
    "i2c-helper",
    "spi-ltt2go",
    "spidev:/dev/spidev0.0",
    # tctildr also accepts the library's file name or path for the name.
    "libtss2-tcti-swtpm.so.0:port=2321",
    "libtss2-tcti-swtpm.so:port=2321",
    "/usr/lib/x86_64-linux-gnu/libtss2-tcti-mssim.so.0:port=2321",
    # pcap's configuration is the TCTI string of the child it records.
    "pcap:swtpm:host=127.0.0.1,port=2321",
    "pcap:device:/dev/tpm0",
    "libtss2-tcti-pcap.so.0:swtpm:port=2321",
    "pcap:pcap:mssim",
]

WITH_RESOURCE_MANAGER = [
    "device:/dev/tpmrm0",
    "device:/dev/tpmrm1",
    # The device TCTI without a path tries /dev/tpmrm0 first.
    "device",
    "device:",
    "tabrmd",
    "tabrmd:bus_type=session",
    "libtss2-tcti-tabrmd.so.0:bus_name=com.intel.tss2.Tabrmd",
    "pcap:device:/dev/tpmrm0",
    "pcap:tabrmd:bus_type=session",
]


@pytest.mark.parametrize("tcti", WITHOUT_RESOURCE_MANAGER)
def test_tcti_without_resource_manager(tcti: str) -> None:
    assert has_resource_manager(tcti) is False
    assert loaded_key_capacity(tcti) == KEYS_WITHOUT_RESOURCE_MANAGER


@pytest.mark.parametrize("tcti", WITH_RESOURCE_MANAGER)
def test_tcti_with_resource_manager(tcti: str) -> None:
    assert has_resource_manager(tcti) is True
    assert loaded_key_capacity(tcti) == KEYS_WITH_RESOURCE_MANAGER


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("swtpm", "swtpm:port=2321"),
        ("swtpm:host=127.0.0.1,port=2321", "swtpm:port=2321,host=localhost"),
        ("mssim:host=::1,port=4000", "mssim:port=4000,host=[::1]"),
        ("libtss2-tcti-swtpm.so.0:port=2400", "swtpm:port=2400"),
        ("pcap:swtpm:port=2400", "swtpm:port=2400"),
        ("device", "device:/dev/tpmrm0"),
    ],
)
def test_tpm_identity_same_tpm(first: str, second: str) -> None:
    assert tpm_identity(first) == tpm_identity(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("swtpm:port=2321", "swtpm:port=2322"),
        ("swtpm:port=2321", "mssim:port=2321"),
        ("device:/dev/tpm0", "device:/dev/tpm1"),
        ("device:/dev/tpm0", "device:/dev/tpmrm0"),
    ],
)
def test_tpm_identity_other_tpm(first: str, second: str) -> None:
    assert tpm_identity(first) != tpm_identity(second)
