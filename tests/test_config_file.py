"""The TOML configuration files of tpmsigner and tpmsigner-agent: defaults, overrides and errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tpmsigner.cli import build_parser as build_signer_parser
from tpmsigner.config_file import default_config_path, parse_args_with_config
from tpmsigner.signer.approvers import DEFAULT_APPROVAL_TIMEOUT
from tpmsigner_agent.cli import build_parser as build_agent_parser
from tests.support.chain import SIGNER_COMMAND, Chain
from tests.support.ports import LOCALHOST

SERVE_CONFIG = """\
home = "/srv/tpmsigner"

[serve]
listen = "127.0.0.1:7810"
approver = "tty"
approval_timeout = 15
no_mdns = true
interface = ["127.0.0.1"]
"""


def write_config(directory: Path, program: str, text: str) -> Path:
    path = directory / program / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def parse_signer(argv: list[str]) -> argparse.Namespace:
    return parse_args_with_config(build_signer_parser(), argv)


def parse_agent(argv: list[str]) -> argparse.Namespace:
    return parse_args_with_config(build_agent_parser(), argv)


def config_error(capsys: pytest.CaptureFixture[str], parse, argv: list[str]) -> str:
    """Run ``parse(argv)``, check that it exits with status 2, and return its stderr."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_file_sets_serve_options(isolated_config_home: Path) -> None:
    write_config(isolated_config_home, "tpmsigner", SERVE_CONFIG)

    args = parse_signer(["serve"])

    assert args.home == "/srv/tpmsigner"
    assert args.listen == "127.0.0.1:7810"
    assert args.approver == "tty"
    assert args.approval_timeout == 15.0
    assert isinstance(args.approval_timeout, float)
    assert args.mdns is False
    assert args.interface == ["127.0.0.1"]


def test_command_line_overrides_file(isolated_config_home: Path) -> None:
    write_config(isolated_config_home, "tpmsigner", SERVE_CONFIG)

    args = parse_signer(
        ["--home", "/elsewhere", "serve", "--listen", "127.0.0.1:9999", "--approval-timeout", "3", "--interface", "::1"]
    )

    assert args.home == "/elsewhere"
    assert args.listen == "127.0.0.1:9999"
    assert args.approval_timeout == 3.0
    assert args.approver == "tty"
    # argparse appends to a default list, as it does with a default of the parser.
    assert args.interface[-1] == "::1"


def test_without_file_defaults_and_required_options_stay(isolated_config_home: Path, capsys) -> None:
    args = parse_signer(["serve", "--listen", "127.0.0.1:1", "--approver", "tty"])
    assert args.approval_timeout == DEFAULT_APPROVAL_TIMEOUT
    assert args.mdns is True

    error = config_error(capsys, parse_signer, ["serve"])
    assert "--listen" in error


def test_false_flag_keeps_default(isolated_config_home: Path) -> None:
    write_config(isolated_config_home, "tpmsigner", "verbose = false\n[serve]\nno_mdns = false\nnotify = true\n")

    args = parse_signer(["serve", "--listen", "127.0.0.1:1", "--approver", "tty"])

    assert args.verbose is False
    assert args.mdns is True
    assert args.notify is True


def test_xdg_config_home_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_home = tmp_path / "elsewhere"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    write_config(config_home, "tpmsigner", 'tcti = "swtpm:host=127.0.0.1,port=1"\n')
    write_config(config_home, "tpmsigner-agent", '[run]\nsocket = "/run/user/1/agent.sock"\n')

    assert default_config_path("tpmsigner") == config_home / "tpmsigner" / "config.toml"
    assert parse_signer(["list"]).tcti == "swtpm:host=127.0.0.1,port=1"
    assert parse_agent(["run"]).socket == "/run/user/1/agent.sock"


def test_unset_xdg_config_home_means_dot_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))

    assert default_config_path("tpmsigner-agent") == tmp_path / ".config" / "tpmsigner-agent" / "config.toml"


def test_explicit_config_replaces_default(isolated_config_home: Path, tmp_path: Path) -> None:
    write_config(isolated_config_home, "tpmsigner", 'home = "/default"\n')
    other = tmp_path / "other.toml"
    other.write_text('home = "/other"\n')

    assert parse_signer(["--config", str(other), "list"]).home == "/other"
    assert parse_signer([f"--config={other}", "list"]).home == "/other"
    assert parse_signer(["--tcti", "list", "--config", str(other), "list"]).home == "/other"


def test_missing_explicit_config_is_an_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.toml"

    error = config_error(capsys, parse_signer, ["--config", str(missing), "list"])
    assert f"configuration file {missing} not found" in error

    error = config_error(capsys, parse_agent, ["--config", str(missing), "id"])
    assert error.startswith("tpmsigner-agent: error:")


def test_config_after_subcommand_is_rejected(tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.toml"
    other.write_text("")

    error = config_error(capsys, parse_signer, ["list", "--config", str(other)])
    assert "unrecognized arguments: --config" in error


def test_unknown_key_names_file_table_and_key(isolated_config_home: Path, capsys) -> None:
    path = write_config(isolated_config_home, "tpmsigner", "[serve]\naproval_timeout = 5\n")

    error = config_error(capsys, parse_signer, ["list"])

    assert f"{path}: [serve] aproval_timeout: unknown key 'aproval_timeout'" in error
    assert "did you mean 'approval_timeout'?" in error


def test_hyphenated_key_points_to_underscore(isolated_config_home: Path, capsys) -> None:
    write_config(isolated_config_home, "tpmsigner", "[serve]\napproval-timeout = 5\n")

    error = config_error(capsys, parse_signer, ["list"])

    assert "write option names with '_', as in 'approval_timeout'" in error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[serve]\napproval_timeout = "5"\n', "[serve] approval_timeout: expected a number, not a string ('5')"),
        ("[serve]\nrefusal_limit = 2.5\n", "[serve] refusal_limit: expected an integer, not a number (2.5)"),
        ("[serve]\nlisten = 7810\n", "[serve] listen: expected a string, not an integer (7810)"),
        ('[serve]\nno_mdns = "yes"\n', "[serve] no_mdns: expected true or false, not a string ('yes')"),
        ('[serve]\ninterface = "lo"\n', "[serve] interface: expected a list"),
        ('serve = "127.0.0.1:1"\n', "serve: expected a table [serve] of options, not a string"),
        ('[discover]\ntimeout = 1\n', "discover: unknown key 'discover'"),
        ('verbose = 1\n', "verbose: expected true or false, not an integer (1)"),
    ],
)
def test_wrong_type_is_an_error(isolated_config_home: Path, capsys, text: str, message: str) -> None:
    path = write_config(isolated_config_home, "tpmsigner", text)

    error = config_error(capsys, parse_signer, ["list"])

    assert str(path) in error
    assert message in error


def test_invalid_toml_is_an_error(isolated_config_home: Path, capsys) -> None:
    path = write_config(isolated_config_home, "tpmsigner", "[serve\n")

    error = config_error(capsys, parse_signer, ["list"])

    assert f"{path}: invalid TOML:" in error


@pytest.mark.parametrize(("table", "key"), [("delete", "yes"), ("allow", "replace"), ("keygen", "pin_file")])
def test_confirmations_and_pin_files_cannot_be_configured(
    isolated_config_home: Path, capsys, table: str, key: str
) -> None:
    write_config(isolated_config_home, "tpmsigner", f'[{table}]\n{key} = "x"\n')

    error = config_error(capsys, parse_signer, ["list"])

    assert f"[{table}] {key}: '{key}' cannot be set in a configuration file" in error


def test_agent_file_sets_subcommand_options(isolated_config_home: Path, capsys) -> None:
    write_config(
        isolated_config_home,
        "tpmsigner-agent",
        'home = "~/agent"\n[discover]\ntimeout = 1\njson = true\n[audit]\nfile = "/var/log/a.jsonl"\n',
    )

    discover = parse_agent(["discover"])
    audit = parse_agent(["audit", "verify"])

    assert discover.timeout == 1.0
    assert discover.json is True
    assert audit.file == "/var/log/a.jsonl"
    assert discover.home == str(Path("~/agent").expanduser())

    write_config(isolated_config_home, "tpmsigner-agent", '[audit]\nsince = 5\n')
    assert "[audit] since: expected a string" in config_error(capsys, parse_agent, ["id"])


def test_serve_from_config_file_answers_ssh_add(chain: Chain) -> None:
    public_line = chain.keygen("work", "2468-config")
    chain.pair()
    write_config(
        chain.config_home,
        "tpmsigner",
        f'home = "{chain.signer_home}"\n'
        "[serve]\n"
        f'listen = "{LOCALHOST}:{chain.signer_port}"\n'
        f'approver = "command:{chain.approver_program}"\n'
        "approval_timeout = 20\n"
        # mDNS would multicast on the host's interfaces.
        "no_mdns = true\n",
    )

    signer = chain._spawn("signer", [*SIGNER_COMMAND, "serve"])
    chain.signer = signer
    chain._wait_for_log(signer, "signer listening on")
    chain.start_agent()
    listed = chain.ssh_add("-L")

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == public_line
    assert f"signer listening on {LOCALHOST} port {chain.signer_port}" in signer.log_text()
