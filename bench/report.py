"""Turn one run's results into Markdown tables, a target check and a plot."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

PLOT_NAME = "benchmarks-sign-latency.png"
BEGIN_MARKER = "<!-- bench:results:begin (written by bench/run --write-docs) -->"
END_MARKER = "<!-- bench:results:end -->"

PATH_NAMES = {
    "floor": "floor: TPM2_Sign through tpm2-pytss, key loaded, session kept open",
    "pkcs11": "OpenSSH ssh-agent + tpm2-pkcs11 (through tpm2-abrmd)",
    "file": "OpenSSH ssh-agent + key file (no TPM)",
    "inproc": "tpmsigner-agent + signer with in-process approver",
    "command": "tpmsigner-agent + `tpmsigner serve` with `command:` approver",
}

SHORT_NAMES = {
    "floor": "floor (TPM2_Sign)",
    "pkcs11": "ssh-agent + tpm2-pkcs11",
    "file": "ssh-agent + key file",
    "inproc": "tpmsigner, in-process approver",
    "command": "tpmsigner, command: approver",
}

# Targets of the benchmark issue: (figure, target text, check).
SIGN_RATIO_TARGET = 1.5
LIST_TARGET_MS = 5.0
LOGIN_RATIO_TARGET = 1.10
THROUGHPUT_RATIO_TARGET = 0.8
THROUGHPUT_CLIENTS = 16
STARTUP_TARGET_MS = 300.0
AGENT_RSS_TARGET_MIB = 60.0
SIGNER_RSS_TARGET_MIB = 80.0


def _version(argv: list[str], pattern: str) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except OSError:
        return "?"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(1) if match else "?"


def machine_description() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    return (
        f"{os.cpu_count()} cores ({cpu}), Debian {debian}, Python {platform.python_version()}, "
        f"swtpm {_version(['swtpm', '--version'], r'version ([0-9.]+)')}, "
        f"OpenSSH {_version(['ssh', '-V'], r'OpenSSH_([0-9.p]+)')}"
    )


def _yes(met: bool) -> str:
    return "met" if met else "**not met**"


def targets(results: dict) -> list[tuple[str, str, str, str]]:
    """Return (figure, target, measured, met) rows for every figure this run measured."""
    if results.get("quick"):
        return [(figure, target, measured, "(quick run)") for figure, target, measured, _ in _target_rows(results)]
    return _target_rows(results)


def _target_rows(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    sign = results.get("sign")
    if sign and "floor" in sign and "inproc" in sign:
        floor, inproc = sign["floor"]["median"], sign["inproc"]["median"]
        ratio = inproc / floor
        rows.append((
            "sign latency through tpmsigner-agent, in-process approver (median)",
            f"≤ {SIGN_RATIO_TARGET:g} × floor",
            f"{inproc:.2f} ms = {ratio:.2f} × floor ({floor:.2f} ms)",
            _yes(ratio <= SIGN_RATIO_TARGET),
        ))
        if "pkcs11" in sign:
            pkcs11 = sign["pkcs11"]["median"]
            rows.append((
                "the same, against ssh-agent + tpm2-pkcs11 (median)",
                "lower",
                f"{inproc:.2f} ms against {pkcs11:.2f} ms",
                _yes(inproc < pkcs11),
            ))
    listing = results.get("listing")
    if listing:
        for row in listing["rows"]:
            if row["identities"] == 100:
                median = row["ssh_add"]["median"]
                reference = row["openssh_ssh_add"]["median"]
                rows.append((
                    "`ssh-add -L` with 100 identities (median)",
                    f"≤ {LIST_TARGET_MS:g} ms",
                    f"{median:.1f} ms (OpenSSH's agent with 100 ECDSA key files: {reference:.1f} ms)",
                    _yes(median <= LIST_TARGET_MS),
                ))
    logins = results.get("logins")
    if logins:
        ratio = logins["inproc"]["median"] / logins["file"]["median"]
        rows.append((
            "`ssh ... true` on loopback, wall time (median)",
            f"≤ {LOGIN_RATIO_TARGET:.2f} × file-key agent",
            f"{logins['inproc']['median']:.1f} ms = {ratio:.3f} × {logins['file']['median']:.1f} ms",
            _yes(ratio <= LOGIN_RATIO_TARGET),
        ))
    throughput = results.get("throughput")
    if throughput:
        for row in throughput["rows"]:
            if row["clients"] == THROUGHPUT_CLIENTS:
                rows.append((
                    f"signatures per second, {THROUGHPUT_CLIENTS} concurrent clients",
                    f"≥ {THROUGHPUT_RATIO_TARGET:g} × floor",
                    f"{row['rate']:.0f}/s = {row['ratio']:.2f} × floor ({throughput['floor_rate']:.0f}/s)",
                    _yes(row["ratio"] >= THROUGHPUT_RATIO_TARGET and row["failed"] == 0),
                ))
    startup = results.get("startup")
    if startup:
        median = startup["tpmsigner-agent"]["median"]
        rows.append((
            "agent start to first answered request (median)",
            f"≤ {STARTUP_TARGET_MS:g} ms",
            f"{median:.0f} ms (p95 {startup['tpmsigner-agent']['p95']:.0f} ms)",
            _yes(median <= STARTUP_TARGET_MS),
        ))
    memory = results.get("memory")
    if memory:
        where = f"{memory['identities']} identities, {memory['agents']} agents"
        rows.append((
            f"agent resident memory ({where}; largest agent)",
            f"≤ {AGENT_RSS_TARGET_MIB:g} MiB",
            f"{memory['agent_max_mib']:.1f} MiB",
            _yes(memory["agent_max_mib"] <= AGENT_RSS_TARGET_MIB),
        ))
        rows.append((
            f"signer resident memory ({where})",
            f"≤ {SIGNER_RSS_TARGET_MIB:g} MiB",
            f"{memory['signer_mib']:.1f} MiB",
            _yes(memory["signer_mib"] <= SIGNER_RSS_TARGET_MIB),
        ))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: dict) -> str:
    out = [
        f"Run of {results.get('started', '?')} on {results.get('machine', '?')}, with `{results.get('command', 'bench/run')}`.",
        "",
        "### Figures against their targets",
        "",
        *(
            ["A `--quick` run: tiny counts that check every path, so these figures are not measurements.", ""]
            if results.get("quick") else []
        ),
        *_table(("figure", "target", "measured", "result"), targets(results), "llll"),
    ]

    sign = results.get("sign")
    if sign:
        floor = sign["floor"]
        rows = [
            (
                PATH_NAMES[name],
                f"{value['median']:.2f}",
                f"{value['p95']:.2f}",
                f"{value['median'] / floor['median']:.2f}",
                f"{value['p95'] / floor['p95']:.2f}",
                f"{value['verified']}/{value['count']}",
            )
            for name, value in sign.items()
        ]
        out += [
            "",
            "### Sign latency",
            "",
            *_table(("path", "median (ms)", "p95 (ms)", "median × floor", "p95 × floor", "verified"), rows, "lrrrrr"),
        ]

    sessions = results.get("floor_sessions")
    if sessions:
        rows = [(name, f"{value['median']:.2f}", f"{value['p95']:.2f}") for name, value in sessions.items()]
        out += [
            "",
            "### What the floor's session costs (TPM2_Sign on the same loaded key)",
            "",
            *_table(("authorization", "median (ms)", "p95 (ms)"), rows, "lrr"),
        ]

    throughput = results.get("throughput")
    if throughput:
        rows = [(
            "floor (one stream; the TPM signs one at a time)", "", f"{throughput['floor_rate']:.0f}", "1.00", "",
        )]
        rows += [
            (f"{row['clients']} clients", str(row["signatures"]), f"{row['rate']:.0f}", f"{row['ratio']:.2f}", str(row["failed"]))
            for row in throughput["rows"]
        ]
        out += [
            "",
            "### Throughput through tpmsigner-agent (in-process approver)",
            "",
            *_table(("clients", "signatures", "per second", "× floor", "failed"), rows, "lrrrr"),
        ]

    listing = results.get("listing")
    if listing:
        rows = [
            (
                str(row["identities"]),
                f"{row['ssh_add']['median']:.1f} / {row['ssh_add']['p95']:.1f}",
                f"{row['openssh_ssh_add']['median']:.1f} / {row['openssh_ssh_add']['p95']:.1f}",
                _median_p95(row.get("openssh_ssh_add_ed25519")),
                f"{row['round_trip']['median']:.2f} / {row['round_trip']['p95']:.2f}",
                f"{row['openssh_round_trip']['median']:.2f} / {row['openssh_round_trip']['p95']:.2f}",
                f"{row['cli_list']['median']:.0f} / {row['cli_list']['p95']:.0f}",
            )
            for row in listing["rows"]
        ]
        out += [
            "",
            "### Listing identities (median / p95, ms)",
            "",
            *_table(
                (
                    "identities",
                    "`ssh-add -L`, tpmsigner-agent",
                    "`ssh-add -L`, OpenSSH ssh-agent with as many ECDSA key files",
                    "`ssh-add -L`, OpenSSH ssh-agent with as many Ed25519 key files",
                    "listing request alone, tpmsigner-agent",
                    "listing request alone, OpenSSH ssh-agent",
                    "`tpmsigner list`",
                ),
                rows,
                "rrrrrrr",
            ),
        ]

    logins = results.get("logins")
    if logins:
        base = logins["file"]["median"]
        rows = [
            (PATH_NAMES[name], f"{value['median']:.1f}", f"{value['p95']:.1f}", f"{value['median'] / base:.3f}")
            for name, value in logins.items()
        ]
        out += ["", "### `ssh ... true` on loopback", "", *_table(("agent", "median (ms)", "p95 (ms)", "× file-key agent"), rows, "lrrr")]

    startup = results.get("startup")
    if startup:
        rows = [(name, f"{value['median']:.0f}", f"{value['p95']:.0f}") for name, value in startup.items()]
        out += ["", "### Start to first answered listing", "", *_table(("agent", "median (ms)", "p95 (ms)"), rows, "lrr")]

    memory = results.get("memory")
    if memory:
        rows = [
            ("`tpmsigner serve`", f"{memory['signer_mib']:.1f}"),
            ("`tpmsigner-agent run`, largest", f"{memory['agent_max_mib']:.1f}"),
            ("`tpmsigner-agent run`, median", f"{memory['agent_median_mib']:.1f}"),
        ]
        out += [
            "",
            f"### Resident memory with {memory['identities']} identities and {memory['agents']} connected agents",
            "",
            *_table(("process", "VmRSS (MiB)"), rows, "lr"),
        ]
    return "\n".join(out) + "\n"


def plots(results: dict, output: Path) -> list[Path]:
    """Draw the sign latencies and the throughput; return the PNG files (none without matplotlib)."""
    samples = results.get("sign_samples")
    if not samples:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (pip install -e '.[bench]'); no plot drawn")
        return []

    throughput = results.get("throughput")
    figure, axes = plt.subplots(1, 2 if throughput else 1, figsize=(12 if throughput else 8, 4.8), squeeze=False)
    latency = axes[0][0]
    names = list(samples)
    latency.boxplot([samples[name] for name in names], vert=False, whis=(5, 95), showfliers=False)
    latency.set_yticks(range(1, len(names) + 1), [SHORT_NAMES[name] for name in names])
    latency.axvline(results["sign"]["floor"]["median"] * SIGN_RATIO_TARGET, color="tab:red", linestyle="--", label=f"target: {SIGN_RATIO_TARGET:g} × floor")
    latency.set_xlabel("milliseconds per signature (box: quartiles, whiskers: 5th-95th percentile)")
    latency.set_title("Sign latency")
    latency.legend(loc="upper right")
    latency.invert_yaxis()
    if throughput:
        rate = axes[0][1]
        clients = [row["clients"] for row in throughput["rows"]]
        rate.plot(clients, [row["rate"] for row in throughput["rows"]], marker="o", label="tpmsigner-agent, in-process approver")
        rate.axhline(throughput["floor_rate"], color="tab:gray", label="floor")
        rate.axhline(throughput["floor_rate"] * THROUGHPUT_RATIO_TARGET, color="tab:red", linestyle="--", label=f"target: {THROUGHPUT_RATIO_TARGET:g} × floor")
        rate.set_xscale("log", base=2)
        rate.set_xticks(clients, [str(c) for c in clients])
        rate.set_ylim(bottom=0)
        rate.set_xlabel("concurrent clients")
        rate.set_ylabel("signatures per second")
        rate.set_title("Throughput")
        rate.legend(loc="lower right")
    figure.suptitle(f"tpmsigner benchmarks, {results.get('started', '')}")
    figure.tight_layout()
    path = output / PLOT_NAME
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]


def write_docs(document: Path, markdown_text: str, plot_files: list[Path], docs_dir: Path) -> None:
    """Replace the generated part of ``document`` and copy the plots next to it."""
    text = document.read_text()
    if BEGIN_MARKER not in text or END_MARKER not in text:
        raise ValueError(f"{document} has no generated part between {BEGIN_MARKER} and {END_MARKER}")
    head, rest = text.split(BEGIN_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    pictures = "".join(f"\n![Sign latency and throughput]({plot.name})\n" for plot in plot_files)
    document.write_text(head + BEGIN_MARKER + "\n\n" + markdown_text + pictures + "\n" + END_MARKER + tail)
    for plot in plot_files:
        shutil.copyfile(plot, docs_dir / plot.name)


def _median_p95(summary: dict | None) -> str:
    """Format a summary as "median / p95" in ms, or a dash for a run that did not measure it."""
    if summary is None:
        return "–"
    return f"{summary['median']:.1f} / {summary['p95']:.1f}"
