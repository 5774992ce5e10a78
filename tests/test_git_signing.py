"""git signs commits through the agent with gpg.format=ssh, as docs/git-signing.md describes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.chain import Chain

PIN = "8642-git"
EMAIL = "alice@example.com"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed (Debian package git)")


def git(chain: Chain, repository: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    environment = chain.agent_environment()
    # Only the repository's own configuration counts, not the user's.
    environment.update(
        GIT_CONFIG_GLOBAL=str(repository.parent / "gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_DATE="2026-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2026-01-01T00:00:00Z",
    )
    return subprocess.run(
        ["git", "-C", str(repository), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def repository(chain: Chain, tmp_path: Path) -> Path:
    path = tmp_path / "repository"
    path.mkdir()
    git(chain, path, "init", "--quiet")
    git(chain, path, "config", "user.name", "Alice")
    git(chain, path, "config", "user.email", EMAIL)
    git(chain, path, "config", "gpg.format", "ssh")
    return path


def test_git_commit_is_signed_through_agent(chain: Chain, repository: Path, tmp_path: Path) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    public_file = tmp_path / "work.pub"
    public_file.write_text(public_line + "\n")
    allowed_signers = tmp_path / "allowed_signers"
    allowed_signers.write_text(f'{EMAIL} namespaces="git" {public_line}\n')
    git(chain, repository, "config", "gpg.ssh.allowedSignersFile", str(allowed_signers))

    # user.signingkey as a .pub file, then in the key:: form.
    git(chain, repository, "config", "user.signingkey", str(public_file))
    git(chain, repository, "commit", "--quiet", "--allow-empty", "-S", "-m", "first")
    git(chain, repository, "config", "user.signingkey", f"key::{public_line}")
    git(chain, repository, "commit", "--quiet", "--allow-empty", "-S", "-m", "second")

    for revision in ("HEAD~1", "HEAD"):
        verified = git(chain, repository, "verify-commit", revision, check=False)
        assert verified.returncode == 0, verified.stderr
        assert f'Good "git" signature for {EMAIL}' in verified.stderr
    shown = git(chain, repository, "log", "--show-signature", "-1").stdout
    assert f'Good "git" signature for {EMAIL}' in shown
    requests = chain.approver_requests()
    assert [request["TPMSIGNER_PURPOSE"] for request in requests] == ["sshsig:git", "sshsig:git"]
    assert {request["TPMSIGNER_KEY_LABEL"] for request in requests} == {"work"}


def test_refused_approval_fails_commit(chain: Chain, repository: Path) -> None:
    public_line = chain.keygen("work", PIN)
    chain.pair()
    chain.start_signer()
    chain.start_agent()
    chain.set_decision("deny")
    git(chain, repository, "config", "user.signingkey", f"key::{public_line}")

    committed = git(chain, repository, "commit", "--quiet", "--allow-empty", "-S", "-m", "refused", check=False)

    assert committed.returncode != 0
    assert "fatal: failed to write commit object" in committed.stderr
    assert git(chain, repository, "rev-list", "--all", check=False).stdout == ""
