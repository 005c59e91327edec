"""``make audit`` (project/audit.py): a pass only when pip-audit answered for
every pin; a finding fails; no answer is "could not run", never a pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from project import audit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pip_audit(tmp_path, monkeypatch):
    """A stand-in for pip-audit: ``set(report, exit_code, stderr)`` decides what
    it prints; it records its arguments in ``args.json``."""
    script = tmp_path / "fake_pip_audit.py"

    def set_output(report: dict | None, exit_code: int = 0, stderr: str = "") -> None:
        script.write_text(
            "import json, sys\n"
            f"json.dump(sys.argv[1:], open({str(tmp_path / 'args.json')!r}, 'w'))\n"
            + (f"print(json.dumps({report!r}))\n" if report is not None else "")
            + f"sys.stderr.write({stderr!r})\n"
            f"sys.exit({exit_code})\n"
        )

    monkeypatch.setattr(audit, "PIP_AUDIT", [sys.executable, str(script)])
    set_output.args = lambda: json.loads((tmp_path / "args.json").read_text())
    return set_output


def run(capsys, *argv: str) -> tuple[int, str]:
    code = audit.main(["--ignore-file", "/nonexistent", *argv])
    return code, capsys.readouterr().out


def test_a_pass_needs_an_answer_for_every_pin(pip_audit, capsys):
    pip_audit({"dependencies": [{"name": "django", "version": "5.2.19", "vulns": []}]})
    code, out = run(capsys)
    assert code == 0
    assert out.startswith("dependency audit passed: 1 pinned packages")
    args = pip_audit.args()
    assert args[2:4] == ["--no-deps", "--disable-pip"]
    assert args[args.index("--requirement") + 1] == str(ROOT / "project/constraints.txt")


def test_skipped_packages_are_not_a_pass(pip_audit, capsys):
    # What pip-audit prints when pypi.org's JSON API answers 404 through a
    # proxy: every package skipped, "No known vulnerabilities found", exit 0.
    reason = "Dependency not found on PyPI and could not be audited: django (5.2.19)"
    pip_audit(
        {
            "dependencies": [
                {"name": "django", "skip_reason": reason},
                {"name": "requests", "version": "2.34.2", "vulns": []},
            ]
        },
        stderr="No known vulnerabilities found\n",
    )
    code, out = run(capsys)
    assert code == audit.COULD_NOT_RUN
    assert out == (
        "dependency audit could not run: pypi answered for 1 of 2 pinned packages; "
        f"first skipped: {reason}\n"
    )


def test_an_unreachable_service_is_not_a_pass(pip_audit, capsys):
    pip_audit(None, 1, "Traceback ...\nConnectionError: Failed to resolve 'api.osv.dev'\n")
    code, out = run(capsys, "--service", "osv")
    assert code == audit.COULD_NOT_RUN
    assert out == (
        "dependency audit could not run: ConnectionError: Failed to resolve 'api.osv.dev'\n"
    )
    assert pip_audit.args()[pip_audit.args().index("--vulnerability-service") + 1] == "osv"


def test_a_finding_fails_even_when_other_packages_were_skipped(pip_audit, capsys, tmp_path):
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("# reasons\nGHSA-aaaa-bbbb-cccc  # not used by mailgov\n\n")
    pip_audit(
        {
            "dependencies": [
                {
                    "name": "django",
                    "version": "5.2.19",
                    "vulns": [
                        {
                            "id": "PYSEC-2026-1",
                            "fix_versions": ["5.2.20"],
                            "aliases": ["CVE-2026-0001"],
                        }
                    ],
                },
                {"name": "tqdm", "skip_reason": "Dependency not found on PyPI"},
            ]
        },
        exit_code=1,
    )
    code = audit.main(["--ignore-file", str(ignore)])
    out = capsys.readouterr().out
    assert code == audit.VULNERABLE
    assert out.splitlines() == [
        "dependency audit found 1 known vulnerabilities:",
        "  django 5.2.19: PYSEC-2026-1 (CVE-2026-0001); fixed in 5.2.20",
        "and the audit is incomplete: pypi answered for 1 of 2 pinned packages; "
        "first skipped: Dependency not found on PyPI",
    ]
    args = pip_audit.args()
    assert args[args.index("--ignore-vuln") + 1] == "GHSA-aaaa-bbbb-cccc"


def test_the_tools_are_pinned():
    pins = dict(
        line.split("==")
        for line in (ROOT / "project/constraints.txt").read_text().splitlines()
        if "==" in line
    )
    assert "django-csp" in pins
    assert "pip-audit" in pins
    assert (ROOT / "project/audit-ignore.txt").exists()
    assert audit.ignored_ids(ROOT / "project/audit-ignore.txt") == []
