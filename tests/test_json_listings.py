"""--json on every listing of both programs, with the fields docs/json-output.md documents."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest

from tpmsigner.cli import build_parser as build_signer_parser
from tpmsigner.config_file import subcommands
from tpmsigner_agent.cli import build_parser as build_agent_parser
from tests.support.chain import Chain

JSON_DOC = Path(__file__).resolve().parent.parent / "docs" / "json-output.md"

# The commands that list something.  A new listing belongs here and in
# docs/json-output.md.
LISTINGS = {
    "tpmsigner": ("list", "show", "status", "devices", "audit"),
    "tpmsigner-agent": ("signers", "discover", "audit"),
}

PIN = "1357-json"


def documented_fields(section: str) -> dict[str, set[str]]:
    """Return the fields of one ``## section`` of docs/json-output.md: top-level names under "", children under their parent."""
    text = JSON_DOC.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"docs/json-output.md has no section '## {section}'"
    fields: dict[str, set[str]] = {"": set()}
    for name in re.findall(r"^\| `([a-z_.]+)` \|", match.group(1), re.MULTILINE):
        parent, _, child = name.rpartition(".")
        fields.setdefault(parent, set()).add(child)
    return fields


def assert_documented(record: dict, section: str) -> None:
    fields = documented_fields(section)
    assert set(record) == fields[""], f"{section}: output and docs/json-output.md differ"
    for parent, children in fields.items():
        if parent and record[parent] is not None:
            assert set(record[parent]) == children, f"{section}: {parent} and docs/json-output.md differ"


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings}


@pytest.mark.parametrize(
    ("program", "build"), [("tpmsigner", build_signer_parser), ("tpmsigner-agent", build_agent_parser)]
)
def test_every_listing_takes_json(program: str, build) -> None:
    commands = subcommands(build())

    for name in LISTINGS[program]:
        assert "--json" in option_strings(commands[name]), f"{program} {name} has no --json"
        assert f"`{program} {name}" in JSON_DOC.read_text(), f"docs/json-output.md does not mention {program} {name}"


def test_identity_and_device_json_match_docs(chain: Chain) -> None:
    chain.keygen("work", PIN)
    chain.pair()

    listed = json.loads(chain.tpmsigner("list", "--json").stdout)
    shown = json.loads(chain.tpmsigner("show", "work", "--json").stdout)
    devices = json.loads(chain.tpmsigner("devices", "--json").stdout)

    assert [entry["label"] for entry in listed] == ["work"]
    assert_documented(listed[0], "Identity")
    assert shown == listed[0]
    assert [device["name"] for device in devices] == ["test-laptop"]
    assert_documented(devices[0], "Device")


def test_status_json_matches_docs(chain: Chain) -> None:
    chain.keygen("work", PIN)

    status = json.loads(chain.tpmsigner("status", "--json").stdout)

    assert_documented(status, "Status")
    assert status["identities"] == {"total": 1, "enabled": 1}
    assert status["tpm"]["tcti"] == chain.tcti


def test_signers_json_matches_docs(chain: Chain) -> None:
    chain.pair()
    signer_key = chain.tpmsigner("id").stdout.strip()
    chain.tpmsigner_agent("trust", "found-by-mdns", "mdns", signer_key)

    signers = json.loads(chain.tpmsigner_agent("signers", "--json").stdout)
    text = chain.tpmsigner_agent("signers").stdout

    by_name = {signer["name"]: signer for signer in signers}
    assert sorted(by_name) == ["found-by-mdns", "test-signer"]
    for signer in signers:
        assert_documented(signer, "Signer")
        assert signer["key"] == signer_key
    assert by_name["found-by-mdns"]["address"] == "mdns"
    assert by_name["found-by-mdns"]["mdns"] is True
    assert by_name["test-signer"]["address"] == f"127.0.0.1:{chain.signer_port}"
    assert by_name["test-signer"]["mdns"] is False
    assert by_name["test-signer"]["fingerprint"] in text
    assert "found-by-mdns" in text


def test_empty_listings_print_empty_arrays(chain: Chain) -> None:
    assert json.loads(chain.tpmsigner("list", "--json").stdout) == []
    assert json.loads(chain.tpmsigner("devices", "--json").stdout) == []
    assert json.loads(chain.tpmsigner_agent("signers", "--json").stdout) == []

    empty = chain.tpmsigner_agent("signers")
    assert empty.stdout == ""
    assert "no signers pinned" in empty.stderr


def test_audit_json_lines_match_docs(chain: Chain) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    key_file = chain.workdir / "work.pub"
    key_file.write_text(public_line + "\n")
    message = chain.workdir / "message"
    message.write_text("hello\n")

    signed = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(key_file), str(message)],
        env=chain.agent_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert signed.returncode == 0, signed.stderr
    lines = chain.tpmsigner_agent("audit", "--json", "--file", str(chain.agent_audit_log)).stdout.splitlines()

    records = [json.loads(line) for line in lines]
    assert [record["outcome"] for record in records] == ["approved"]
    assert_documented(records[0], "Audit record")

    signer_records = [json.loads(line) for line in chain.tpmsigner("audit", "--json").stdout.splitlines()]
    assert [record["outcome"] for record in signer_records] == ["approved"]
    # A request without a certificate has every documented field but that one.
    documented = documented_fields("Signer audit record")
    assert set(signer_records[0]) == documented[""] - {"certificate"}
    assert signer_records[0]["key_label"] == "work"
    assert signer_records[0]["purpose"] == "sshsig:file"
    assert set(records[0]["destination"]) == {"user", "host", "host_key_fingerprint", "verified", "forwarded"}
