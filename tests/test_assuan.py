"""The Assuan client and the pinentry approver against a scripted fake pinentry.

A real pinentry (tests/test_pinentry.py) follows the protocol, so these
tests use a small fake only to reach what no real pinentry sends: malformed lines,
split and escaped data, cache status, inquiries, silence and early exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest

from tpmsigner.errors import PinentryError
from tpmsigner.protocol.messages import ProcessInfo
from tpmsigner.signer.approvers import ApprovalRequest
from tpmsigner.signer.assuan import MAX_LINE_BYTES, escape, request_line, unescape
from tpmsigner.signer.pinentry import PinentryApprover
from tests.support import pid_is_running, wait_until

PIN = "4711-assuan"

# The fake pinentry greets, logs each request line it reads, and answers
# from a JSON scenario: command -> list of raw reply lines, where the item
# HANG stops answering and EXIT ends the program.  Unlisted commands get OK.
HANG = "<hang>"
EXIT = "<exit>"
FAKE_PINENTRY = """\
#!{python}
import json, os, sys, time
scenario = json.load(open(sys.argv[1]))
log = open(sys.argv[2], "ab")
open(sys.argv[3], "w").write(str(os.getpid()))

def answer(key, default):
    for line in scenario.get(key, default):
        if line == "<hang>":
            time.sleep(3600)
        if line == "<exit>":
            sys.exit(0)
        sys.stdout.buffer.write(line.encode("latin-1"))
        sys.stdout.buffer.flush()

answer("greeting", ["OK Pleased to meet you\\n"])
for line in sys.stdin.buffer:
    log.write(line)
    log.flush()
    command = line.split(b" ", 1)[0].strip().decode()
    answer(command, ["OK\\n"])
    if command == "BYE":
        sys.exit(0)
"""


class FakePinentry:
    """Writes the fake pinentry and its scenario, and reads what it was sent."""

    def __init__(self, directory: Path) -> None:
        self.program = directory / "fake-pinentry"
        self.program.write_text(FAKE_PINENTRY.format(python=sys.executable))
        self.program.chmod(0o755)
        self.scenario = directory / "scenario.json"
        self.log = directory / "received.log"
        self.pid_file = directory / "pinentry.pid"

    def approver(self, scenario: dict[str, object], timeout: float = 20.0, setup_timeout: float = 10.0) -> PinentryApprover:
        self.scenario.write_text(json.dumps(scenario))
        argv = [str(self.program), str(self.scenario), str(self.log), str(self.pid_file)]
        return PinentryApprover(argv, timeout=timeout, find_terminal=False, setup_timeout=setup_timeout)

    def received(self) -> list[bytes]:
        return self.log.read_bytes().splitlines(keepends=True) if self.log.exists() else []

    def pid(self) -> int:
        return int(self.pid_file.read_text())


def make_request(command_line: str = "ssh -p 2222 alice@host", destination: str = "alice@host") -> ApprovalRequest:
    return ApprovalRequest(
        request_id=7,
        key_label="work",
        key_fingerprint="SHA256:abc",
        device="laptop",
        process=ProcessInfo(pid=42, uid=1000, executable="/usr/bin/ssh", command_line=command_line),
        purpose="ssh-login",
        destination=destination,
        destination_verified=True,
    )


def ask(approver: PinentryApprover, request: ApprovalRequest | None = None) -> str | None:
    return asyncio.run(approver.request_pin(request or make_request()))


@pytest.fixture
def fake(tmp_path: Path) -> FakePinentry:
    return FakePinentry(tmp_path)


# ---- escaping ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", b"plain text"),
        ("100%", b"100%25"),
        ("two\nlines", b"two%0Alines"),
        ("cr\rlf\n", b"cr%0Dlf%0A"),
        ("ends with \\", b"ends with %5C"),
        ("esc\x1b[2J", b"esc%1B[2J"),
        ("del\x7f", b"del%7F"),
        ("caf\u00e9", "caf\u00e9".encode()),
    ],
)
def test_escape_encodes_percent_line_ends_and_controls(text: str, expected: bytes) -> None:
    assert escape(text) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"1234", b"1234"),
        (b"12%2534", b"12%34"),
        (b"a%0Ab%0dc", b"a\nb\rc"),
        (b"%c3%a9", "\u00e9".encode()),
    ],
)
def test_unescape_decodes_data_lines(data: bytes, expected: bytes) -> None:
    assert unescape(data) == expected


@pytest.mark.parametrize("data", [b"50%", b"%2", b"%G1", b"% 1", b"%+1"])
def test_unescape_rejects_malformed_escapes(data: bytes) -> None:
    with pytest.raises(PinentryError, match="malformed %XX escape"):
        unescape(data)


def test_request_line_truncates_to_line_limit() -> None:
    line = request_line("SETDESC", "x%" * 2000, truncate=True)

    assert len(line) <= MAX_LINE_BYTES
    assert line.startswith(b"SETDESC x%25x%25")
    assert line.endswith("\u2026".encode() + b"\n")
    assert line.count(b"\n") == 1


def test_request_line_refuses_overlong_without_truncate() -> None:
    with pytest.raises(ValueError, match="over the"):
        request_line("SETDESC", "x" * 2000)


# ---- requests the approver sends ---------------------------------------------


def test_description_is_one_escaped_request_line(fake: FakePinentry) -> None:
    hostile = "ssh host\nGETPIN\r\nBYE\x1b]0;title\x07 " + "y" * 3000
    approver = fake.approver({"GETPIN": [f"D {PIN}\n", "OK\n"]})

    assert ask(approver, make_request(command_line=hostile, destination="alice@evil\nSETKEYINFO x")) == PIN

    received = fake.received()
    commands = [line.split(b" ", 1)[0].strip() for line in received]
    assert commands.count(b"GETPIN") == 1
    assert b"SETKEYINFO" not in commands
    assert b"BYE" in commands
    assert all(len(line) <= MAX_LINE_BYTES for line in received)
    description_line = next(line for line in received if line.startswith(b"SETDESC "))
    assert all(byte >= 0x20 for byte in description_line[:-1])
    description = unescape(description_line[len(b"SETDESC ") : -1]).decode()
    assert "\x1b" not in description
    assert "process: ssh (pid 42, uid 1000): ssh host\\x0aGETPIN\\x0d\\x0aBYE\\x1b]0;title\\x07 yyy" in description
    assert "destination: alice@evil\\x0aSETKEYINFO x (verified)" in description
    process_line = description.splitlines()[-1]
    assert process_line.startswith("process: ")
    assert process_line.count("\u2026") == 1
    assert process_line.endswith("yyyy")


def test_no_password_cache_is_ever_allowed(fake: FakePinentry) -> None:
    approver = fake.approver({"GETPIN": [f"D {PIN}\n", "OK\n"]})

    ask(approver)

    received = b"".join(fake.received())
    assert b"allow-external-password-cache" not in received
    assert b"SETKEYINFO" not in received
    assert b"SETTIMEOUT 20\n" in received


def test_optional_request_errors_are_ignored(fake: FakePinentry) -> None:
    approver = fake.approver(
        {
            "SETTITLE": ["ERR 83886355 Unknown command <Pinentry>\n"],
            "SETOK": ["ERR 83886355 Unknown command <Pinentry>\n"],
            "GETPIN": [f"D {PIN}\n", "OK\n"],
        }
    )

    assert ask(approver) == PIN


def test_required_request_error_refuses(fake: FakePinentry, caplog: pytest.LogCaptureFixture) -> None:
    approver = fake.approver({"SETDESC": ["ERR 83886080 General error <Pinentry>\n"]})

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        assert ask(approver) is None

    assert "SETDESC failed: ERR 83886080 General error" in caplog.text
    assert not any(line.startswith(b"GETPIN") for line in fake.received())


# ---- replies to GETPIN --------------------------------------------------------


def test_pin_split_over_escaped_data_lines(fake: FakePinentry) -> None:
    approver = fake.approver({"GETPIN": ["S SOMETHING info\n", "D 12%25\n", "# comment\n", "D 3%0A4\n", "OK\n"]})

    assert ask(approver) == "12%3\n4"


def test_inquiry_is_cancelled(fake: FakePinentry) -> None:
    approver = fake.approver(
        {"GETPIN": ["INQUIRE QUALITY 1234\n"], "CAN": ["ERR 83886179 Operation cancelled <Pinentry>\n"]}
    )

    assert ask(approver) is None
    assert b"CAN\n" in fake.received()


def test_cached_pin_is_refused(fake: FakePinentry, caplog: pytest.LogCaptureFixture) -> None:
    approver = fake.approver({"GETPIN": ["S PASSWORD_FROM_CACHE\n", f"D {PIN}\n", "OK\n"]})

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        assert ask(approver) is None

    assert "returned a PIN from a password cache" in caplog.text
    assert PIN not in caplog.text


@pytest.mark.parametrize(
    ("reply", "logged"),
    [
        (["OK\n"], "empty PIN"),
        (["ERR 83918950 Inappropriate ioctl for device <Pinentry>\n"], "GETPIN failed: ERR 83918950"),
        (["ERR 83886194 Not confirmed <Pinentry>\n"], "cancelled in the pinentry"),
        ([f"D {PIN}\n", "ERR 83886179 Operation cancelled\n"], "cancelled in the pinentry"),
        (["D \xff\xfe\n", "OK\n"], "not UTF-8"),
    ],
)
def test_getpin_failures_refuse(
    fake: FakePinentry, caplog: pytest.LogCaptureFixture, reply: list[str], logged: str
) -> None:
    approver = fake.approver({"GETPIN": reply})

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        assert ask(approver) is None

    assert logged in caplog.text


@pytest.mark.parametrize(
    ("reply", "logged"),
    [
        ([f"{PIN}\n"], "malformed line"),
        ([f"D{PIN}\n"], "malformed line"),
        (["D 12%G4\n", "OK\n"], "malformed %XX escape"),
        (["ERR cancelled\n"], "without a numeric error code"),
        (["D " + "1" * 2000 + "\n", "OK\n"], "longer than 1000 bytes"),
        (["D " + "1" * 900 + "\n"] * 5 + ["OK\n"], "more than 4096 bytes of data"),
        ([f"D {PIN}", EXIT], "closed its output before the end of its reply"),
        ([EXIT], "closed its output before the end of its reply"),
    ],
)
def test_protocol_errors_refuse_without_showing_pin(
    fake: FakePinentry, caplog: pytest.LogCaptureFixture, reply: object, logged: str
) -> None:
    approver = fake.approver({"GETPIN": reply})

    with caplog.at_level(logging.DEBUG, logger="tpmsigner"):
        assert ask(approver) is None

    assert logged in caplog.text
    assert PIN not in caplog.text
    wait_until(lambda: not pid_is_running(fake.pid()), 5, "the fake pinentry to be gone")


def test_pinentry_timeout_is_a_timeout(fake: FakePinentry) -> None:
    approver = fake.approver({"GETPIN": ["S ERROR tty.? 83886142\n", "ERR 83886142 Timeout <Pinentry>\n"]})

    with pytest.raises(TimeoutError):
        ask(approver)


# ---- pinentries that stop responding ------------------------------------------


def test_silent_greeting_refuses_after_setup_timeout(fake: FakePinentry, caplog: pytest.LogCaptureFixture) -> None:
    approver = fake.approver({"greeting": [HANG]}, setup_timeout=0.5)

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        assert ask(approver) is None

    assert "did not respond to its greeting within 0.5 s" in caplog.text
    wait_until(lambda: not pid_is_running(fake.pid()), 5, "the silent pinentry to be killed")


def test_silent_setup_request_refuses(fake: FakePinentry, caplog: pytest.LogCaptureFixture) -> None:
    approver = fake.approver({"SETDESC": [HANG]}, setup_timeout=0.5)

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        assert ask(approver) is None

    assert "did not respond to SETDESC within 0.5 s" in caplog.text
    wait_until(lambda: not pid_is_running(fake.pid()), 5, "the silent pinentry to be killed")


def test_silent_getpin_times_out_and_is_killed(fake: FakePinentry) -> None:
    # The signer's own approval timeout ends the request; the pinentry
    # ignores its SETTIMEOUT here, so only the kill ends it.
    approver = fake.approver({"GETPIN": [HANG]}, timeout=30.0)

    async def ask_with_server_timeout() -> str | None:
        return await asyncio.wait_for(approver.request_pin(make_request()), 1.0)

    with pytest.raises(TimeoutError):
        asyncio.run(ask_with_server_timeout())

    wait_until(lambda: not pid_is_running(fake.pid()), 5, "the silent pinentry to be killed")


def test_missing_program_refuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    approver = PinentryApprover([str(tmp_path / "no-such-pinentry")], find_terminal=False)

    with caplog.at_level(logging.INFO, logger="tpmsigner"):
        assert ask(approver) is None

    assert "cannot run pinentry" in caplog.text
