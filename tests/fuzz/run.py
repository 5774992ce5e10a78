"""Run one fuzz target under atheris, or replay inputs through it without atheris.

Usage (scripts/fuzz wraps both):

    python -m tests.fuzz.run fuzz TARGET [LIBFUZZER_ARGS...]
    python -m tests.fuzz.run replay TARGET FILE...
    python -m tests.fuzz.run seeds TARGET DIRECTORY

``fuzz`` instruments tpmsigner and tpmsigner_agent for coverage and hands
the remaining arguments to libFuzzer (corpus directory, -max_total_time,
-artifact_prefix...).  ``replay`` runs each file once and prints the
traceback of the first failure, which is how a crash file is reproduced.
``seeds`` writes the target's seed inputs into a corpus directory.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from pathlib import Path

# Instrumented and uninstrumented runs read TSS2_LOG when tpm2-tss loads.
os.environ.setdefault("TSS2_LOG", "all+NONE")


def _targets():
    from tests.fuzz.targets import TARGETS

    return TARGETS


def _target(name: str):
    targets = _targets()
    if name not in targets:
        raise SystemExit(f"unknown fuzz target {name!r}; targets: {', '.join(targets)}")
    return targets[name]


def fuzz(name: str, libfuzzer_args: list[str]) -> None:
    import atheris

    # Only the product is instrumented: its branches are what the fuzzer
    # should learn to reach, and instrumenting libraries slows every run.
    with atheris.instrument_imports(include=["tpmsigner", "tpmsigner_agent"]):
        target = _target(name)

    atheris.Setup([sys.argv[0], f"-max_len={target.max_len}", *libfuzzer_args], target.run)
    try:
        atheris.Fuzz()
    finally:
        target.close()


def replay(name: str, files: list[str]) -> int:
    target = _target(name)
    failures = 0
    try:
        for file_name in files:
            data = Path(file_name).read_bytes()
            try:
                target.run(data)
            except Exception:  # noqa: BLE001 - every failure is reported, with its traceback
                failures += 1
                print(f"{file_name}: FAILED ({len(data)} bytes)", file=sys.stderr)
                traceback.print_exc()
            else:
                print(f"{file_name}: ok ({len(data)} bytes)", file=sys.stderr)
    finally:
        target.close()
    return 1 if failures else 0


def write_seeds(name: str, directory: str) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for seed in _target(name).seeds():
        (path / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "fuzz":
        fuzz(argv[1], argv[2:])
        return 0
    if len(argv) >= 3 and argv[0] == "replay":
        return replay(argv[1], argv[2:])
    if len(argv) == 3 and argv[0] == "seeds":
        write_seeds(argv[1], argv[2])
        return 0
    if len(argv) == 1 and argv[0] == "list":
        print("\n".join(_targets()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
