"""Every tpmsigner and tpmsigner-agent command in the docs' sh blocks parses with the real parsers."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from tpmsigner.cli import build_parser as build_signer_parser
from tpmsigner.config_file import add_config_option
from tpmsigner_agent.cli import build_parser as build_agent_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BUILDERS = {"tpmsigner": build_signer_parser, "tpmsigner-agent": build_agent_parser}


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def commands_in_line(line: str) -> list[list[str]]:
    """Return the argument lists of the tpmsigner and tpmsigner-agent commands on one shell line."""
    # "$(command)" is a command of its own.
    inner = re.findall(r"\$\(([^()]*)\)", line)
    line = re.sub(r"\$\(([^()]*)\)", "", line)
    # Optional parts written as [--name laptop] in the docs.
    line = re.sub(r"\[(--?[^\]]*)\]", r"\1", line)
    found = []
    for part in [line, *inner]:
        lexer = shlex.shlex(part, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set("();<>|&"):
                if segment and segment[0] in BUILDERS:
                    found.append(segment)
                segment = []
            else:
                segment.append(token)
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for document in DOCUMENTS:
        for block in shell_blocks(document.read_text(encoding="utf-8")):
            for line in block.splitlines():
                for command in commands_in_line(line):
                    commands.append((f"{document.name}: {line.strip()}", command))
    return commands


def test_docs_have_commands() -> None:
    names = {Path(where.split(":")[0]).name for where, _ in documented_commands()}
    assert {"README.md", "getting-started.md", "ssh-config.md"} <= names


@pytest.mark.parametrize(("where", "command"), documented_commands(), ids=lambda value: str(value)[:60])
def test_documented_command_parses(where: str, command: list[str]) -> None:
    parser = BUILDERS[command[0]]()
    add_config_option(parser)
    errors = io.StringIO()

    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(command[1:])
        except SystemExit as exited:
            # --help and --version exit 0; anything else is a usage error.
            assert exited.code == 0, f"{where}\n{errors.getvalue()}"
