"""``make audit``: the pinned versions (``project/constraints.txt``) against the
published vulnerabilities, with pip-audit.

Three outcomes, never confused:

- exit 0, "dependency audit passed": the service answered for every pin and
  knows no vulnerability in any;
- exit 1, "dependency audit found N known vulnerabilities": each listed with
  its fixed versions. CI fails: upgrade the pin (the README's routine), or,
  when an advisory does not apply, list its id in ``project/audit-ignore.txt``
  with the reason;
- exit 3, "dependency audit could not run: <reason>": the service could not be
  reached, or did not answer for some pins. pip-audit itself then says "No
  known vulnerabilities found" and exits 0 (it skips every package it gets no
  answer for, e.g. where pypi.org's JSON API answers 404 through a proxy), so
  a skipped package is never counted as audited here.

Every pin is audited as written (``--no-deps --disable-pip``): the file already
lists the whole dependency closure, and nothing is installed to resolve it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSED, VULNERABLE, COULD_NOT_RUN = 0, 1, 3
#: How pip-audit is run (a list, so that tests can put a stand-in here).
PIP_AUDIT = [sys.executable, "-m", "pip_audit"]


def ignored_ids(path: Path) -> list[str]:
    """Advisory ids in ``path``, one a line, ``#`` starting a comment (the reason)."""
    if not path.exists():
        return []
    ids = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [found for found in ids if found]


def audit(requirements: Path, ignore: list[str], service: str, timeout: int) -> int:
    command = [
        *PIP_AUDIT,
        "--requirement",
        str(requirements),
        "--no-deps",
        "--disable-pip",
        "--vulnerability-service",
        service,
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "--timeout",
        str(timeout),
    ]
    for vuln_id in ignore:
        command += ["--ignore-vuln", vuln_id]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        # No report at all: pip-audit stopped (no network, DNS, a bad file).
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip-audit exited with {result.returncode}"
        return could_not_run(reason)

    dependencies = report.get("dependencies", [])
    skipped = [dep for dep in dependencies if dep.get("skip_reason")]
    incomplete = (
        f"{service} answered for {len(dependencies) - len(skipped)} of "
        f"{len(dependencies)} pinned packages; first skipped: "
        + (skipped[0]["skip_reason"] if skipped else "none listed")
    )
    findings = [(dep, vuln) for dep in dependencies for vuln in dep.get("vulns", [])]
    if findings:
        # Reported even when other packages were skipped: a finding is never hidden.
        print(f"dependency audit found {len(findings)} known vulnerabilities:")
        for dep, vuln in findings:
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            aliases = ", ".join(vuln.get("aliases") or [])
            print(
                f"  {dep['name']} {dep['version']}: {vuln['id']}"
                + (f" ({aliases})" if aliases else "")
                + f"; fixed in {fixed}"
            )
        if skipped:
            print(f"and the audit is incomplete: {incomplete}")
        return VULNERABLE
    if skipped or not dependencies:
        return could_not_run(incomplete)
    print(
        f"dependency audit passed: {len(dependencies)} pinned packages, "
        f"no known vulnerabilities ({service}"
        + (f"; ignored: {', '.join(ignore)}" if ignore else "")
        + ")"
    )
    return PASSED


def could_not_run(reason: str) -> int:
    print(f"dependency audit could not run: {reason}")
    return COULD_NOT_RUN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requirements", type=Path, default=ROOT / "project/constraints.txt")
    parser.add_argument("--ignore-file", type=Path, default=ROOT / "project/audit-ignore.txt")
    parser.add_argument(
        "--service",
        choices=("pypi", "osv"),
        default="pypi",
        help="pip-audit's vulnerability service",
    )
    parser.add_argument("--timeout", type=int, default=30, help="seconds per request")
    args = parser.parse_args(argv)
    return audit(args.requirements, ignored_ids(args.ignore_file), args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
