"""Run the examples of docs/library.md, so the documentation cannot go stale."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "library.md"


def code_blocks(text: str) -> list[str]:
    """Return the ```python blocks of a Markdown text, in order."""
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_library_examples_run(swtpm, sshd_factory, tmp_path, capsys) -> None:
    blocks = code_blocks(DOC.read_text())
    assert len(blocks) >= 6

    home = tmp_path / "home"
    # The sshd must trust the key before the login example runs, but the key
    # only exists once the create example has run: start sshd in between.
    namespace: dict[str, object] = {"TCTI": swtpm.tcti, "HOME": home}
    for block in blocks:
        if "asyncssh.connect(" in block:
            identity = namespace["identity"]
            sshd = sshd_factory(authorized_keys=[identity.openssh_line()])
            namespace.update(
                SSH_HOST="127.0.0.1",
                SSH_PORT=sshd.port,
                SSH_USER=sshd.user,
                KNOWN_HOSTS=str(sshd.known_hosts_file),
            )
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the documented examples

    output = capsys.readouterr().out
    assert "ecdsa-sha2-nistp256" in output
    assert "wrong PIN" in output
    assert "tries left" in output
    assert "signed in the TPM" in output
    assert sorted(path.name for path in (home / "keys").glob("*.json")) == ["build-bot.json", "legacy.json"]
