"""Fixtures that start real peers (swtpm, sshd, ssh-agent) for one test each.

Every fixture stops what it started at teardown and fails the test if a
process is still alive afterwards. When a test fails, the logs of the peers
it used are printed, so they appear in pytest's report of that test.
"""

import os

# tpm2-tss prints a warning for every TPM error response; the tests cause
# many on purpose.  It reads TSS2_LOG when the library loads.
os.environ.setdefault("TSS2_LOG", "all+NONE")

import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests (tests/test_properties_*.py) run 200 examples each by
# default.  HYPOTHESIS_PROFILE=long runs many more, for a search of an hour
# or so.  No deadline: a test that talks to real processes or the kernel
# varies in time for reasons that are not bugs.
settings.register_profile("standard", max_examples=200, deadline=None)
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "standard"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The long profile runs for many minutes per test, past the suite's
    # per-test timeout in pyproject.toml, so property tests run without one.
    if settings.default.max_examples <= 200:
        return
    for item in items:
        if item.path.name.startswith("test_properties_"):
            item.add_marker(pytest.mark.timeout(0))

from tests.support import OpenSshAgent, Sshd, Swtpm, pid_is_running, start_swtpm
from tests.support.chain import Chain


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    # Store each phase's report on the test item, so fixtures can tell at
    # teardown whether the test failed.
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(request.node, f"report_{when}", None) is not None
        and getattr(request.node, f"report_{when}").failed
        for when in ("setup", "call")
    )


@pytest.fixture(autouse=True)
def isolated_config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $XDG_CONFIG_HOME at an empty directory, so that no configuration file of the user changes a test."""
    config_home = tmp_path / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    return config_home


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A new directory with a short path under /tmp, for Unix sockets.

    tmp_path can exceed the 107 bytes that a Unix socket path may have on
    Linux. The directory is removed at teardown.
    """
    path = Path(tempfile.mkdtemp(prefix="tpms-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def swtpm(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Swtpm]:
    """A running swtpm with its state in tmp_path/swtpm.

    Yields a Swtpm with tcti, state_dir, start(), stop() and kill().
    """
    emulator = start_swtpm(tmp_path / "swtpm")
    yield emulator

    if _test_failed(request):
        print(f"--- swtpm log {emulator.log_file} ---\n{emulator.log_text()}")
    emulator.stop()
    leaked = emulator.leaked_pids()
    if leaked:
        for pid in leaked:
            _kill_quietly(pid)
        pytest.fail(f"swtpm pids {leaked} were still running after swtpm/stop; they were killed")


@pytest.fixture
def sshd_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Sshd]]:
    """A function that starts an sshd and returns it as a started Sshd.

    Signature: sshd_factory(authorized_keys=(), extra_config=()) -> Sshd.
    authorized_keys are OpenSSH public key lines. extra_config lines are
    sshd_config lines that override the built-in settings, for example
    "PubkeyAcceptedAlgorithms ecdsa-sha2-nistp256". Each call gets its own
    directory under tmp_path.
    """
    started: list[Sshd] = []

    def start(authorized_keys: Sequence[str] = (), extra_config: Sequence[str] = ()) -> Sshd:
        sshd = Sshd(
            workdir=tmp_path / f"sshd{len(started)}",
            authorized_keys=authorized_keys,
            extra_config=extra_config,
        )
        started.append(sshd)
        sshd.start()
        return sshd

    yield start

    failed = _test_failed(request)
    leaked: list[int] = []
    for sshd in started:
        if failed:
            print(f"--- sshd log {sshd.log_file} ---\n{sshd.log_text()}")
        sshd.stop()
        leaked += sshd.leaked_pids()
    if leaked:
        for sshd in started:
            if sshd.process is not None and sshd.process.pid in leaked:
                sshd.process.kill()
                sshd.process.wait(timeout=5)
        pytest.fail(f"sshd pids {leaked} were still running after stop(); they were killed")


@pytest.fixture
def openssh_agent(short_tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OpenSshAgent]:
    """A running OpenSSH ssh-agent on short_tmp_path/openssh-agent.sock, holding no keys."""
    agent = OpenSshAgent(socket_path=short_tmp_path / "openssh-agent.sock")
    agent.start()
    yield agent

    agent.stop()
    assert agent.process is not None
    if pid_is_running(agent.process.pid):
        _kill_quietly(agent.process.pid)
        pytest.fail(f"ssh-agent pid {agent.process.pid} was still running after stop(); it was killed")


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def chain(tmp_path: Path, short_tmp_path: Path, swtpm: Swtpm, request: pytest.FixtureRequest) -> Iterator[Chain]:
    """Homes, approver and daemon launchers for the signer and the agent.

    The test starts what it needs (``chain.start_signer()``,
    ``chain.start_agent()``); teardown stops both and fails the test if
    either is still alive.
    """
    test_chain = Chain(workdir=tmp_path / "chain", socket_dir=short_tmp_path, tcti=swtpm.tcti)
    yield test_chain

    if _test_failed(request):
        print(test_chain.logs())
    leaked = test_chain.stop()
    if leaked:
        pytest.fail(f"{', '.join(leaked)} still running after SIGTERM; killed")
