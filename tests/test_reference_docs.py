"""docs/reference/ is generated from the argparse parsers and must match them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpmsigner.config_file import subcommands
from tpmsigner.manpages import main, programs, reference_path, render

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("program", programs(), ids=lambda program: program.name)
def test_committed_reference_is_current(program) -> None:
    path = reference_path(ROOT, program)

    assert path.exists(), f"{path} is missing: run scripts/gen-manpages and commit the result"
    assert path.read_text(encoding="utf-8") == render(program), (
        f"{path} is out of date: run scripts/gen-manpages and commit the result"
    )


@pytest.mark.parametrize("program", programs(), ids=lambda program: program.name)
def test_reference_has_every_command(program) -> None:
    text = render(program)

    for name, subparser in subcommands(program.build_parser()).items():
        assert f"### {program.name} {name}\n" in text
        assert subparser.format_usage().split()[1] == program.name
    assert "`--config PATH`" in text


def test_check_reports_stale_page(tmp_path: Path, capsys) -> None:
    assert main(["--root", str(tmp_path), "--check"]) == 1
    assert "run scripts/gen-manpages" in capsys.readouterr().err

    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--root", str(tmp_path), "--check"]) == 0
    assert (tmp_path / "docs" / "reference" / "tpmsigner-agent.md").read_text().startswith("# tpmsigner-agent(1)")
