"""Command line of the benchmark: ``python -m bench`` (bench/run sets up first).

Runs every phase against one swtpm, prints the report, and writes
results.json, results.md and the plot into --output (default: a new
directory).  With --write-docs it also replaces the generated part of
docs/benchmarks.md and the plots under docs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TSS2_LOG", "all+NONE")

from tests.support.swtpm import start_swtpm  # noqa: E402

from . import report, stack  # noqa: E402
from .runner import BenchRun, Options  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHASES = ("sign", "throughput", "listing", "logins", "startup", "memory")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description="tpmsigner side by side with the TPM floor and OpenSSH agents")
    parser.add_argument("--quick", action="store_true", help="tiny counts: checks that every path works, measures nothing useful")
    parser.add_argument("--samples", type=int, help="sign latency samples per path (default 300)")
    parser.add_argument("--rounds", type=int, help="times the sign paths take turns (default 10)")
    parser.add_argument("--counts", type=int, nargs="+", help="identity counts for the listing table (default 1 10 100 1000)")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrent clients for the throughput table (default 1 4 16 64)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="run only these phases")
    parser.add_argument("--no-pkcs11", action="store_true", help="leave out OpenSSH's agent with tpm2-pkcs11")
    parser.add_argument("--output", type=Path, help="directory for results.json, results.md and the plot")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md and its plot with this run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, homes) for a look afterwards")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    options = Options()
    if args.quick:
        options = Options(
            samples=6, rounds=2, counts=[1, 3], list_repeats=2, clients=[1, 4], load_signatures=8, logins=2,
            starts=2, memory_identities=3, memory_agents=2,
        )
    if args.samples:
        options.samples = args.samples
    if args.rounds:
        options.rounds = args.rounds
    if args.counts:
        options.counts = args.counts
    if args.clients:
        options.clients = args.clients
    options.pkcs11 = not args.no_pkcs11
    options.phases = tuple(args.phases)
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick and args.write_docs:
        print("bench: --quick measures nothing useful, so it cannot --write-docs", file=sys.stderr)
        return 2
    options = options_from(args)
    output = args.output or Path(tempfile.mkdtemp(prefix="tpmsigner-bench-results-"))
    output.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="tpmsigner-bench-"))
    socket_dir = Path(tempfile.mkdtemp(prefix="tpmb-", dir="/tmp"))
    emulator = start_swtpm(workdir / "swtpm")
    started = time.time()
    run = BenchRun(options, stack.Workspace(workdir, socket_dir, emulator.tcti))
    try:
        run.prepare()
        for phase in options.phases:
            print(f"bench: {phase} ...", file=sys.stderr, flush=True)
            getattr(run, {"sign": "sign_latency"}.get(phase, phase))()
    finally:
        run.close()
        emulator.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
        if args.keep:
            print(f"bench: work directory kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    results = run.results
    results["machine"] = report.machine_description()
    results["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    results["command"] = "bench/run " + " ".join(argv if argv is not None else sys.argv[1:])
    results["options"] = vars(options)
    results["quick"] = args.quick
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = report.markdown(results)
    (output / "results.md").write_text(markdown)
    plots = report.plots(results, output)
    print(markdown)
    print(f"bench: results in {output}", file=sys.stderr)
    if args.write_docs:
        report.write_docs(REPO / "docs" / "benchmarks.md", markdown, plots, REPO / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
