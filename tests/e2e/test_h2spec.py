"""
HTTP/2 conformance: h2spec (the shared tools' static binary) against a
real server's HTTPS user interface, alone and with --workers 2. Every case
must pass; the corrections that make them pass are kapow.web.http2's.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.support.pki import make_pki

#: ../shared/tools/h2spec beside the checkout, unless $H2SPEC names another.
H2SPEC = Path(
    os.environ.get("H2SPEC") or Path(__file__).resolve().parents[2].parent / "shared" / "tools" / "h2spec"
)
#: The cases of the h2spec build in the shared tools.
CASES = 146


def junit_cases(report: bytes) -> dict[str, str | None]:
    """
    Each case of an h2spec JUnit report (``section/number name``), with why
    it failed or was skipped, or ``None`` when it passed. The report quotes
    the PING payloads it saw, NUL bytes and all, which XML does not allow:
    they are taken out first.
    """
    cases: dict[str, str | None] = {}
    for suite in ET.fromstring(report.replace(b"\0", b"")).iter("testsuite"):
        for number, case in enumerate(suite.iter("testcase"), 1):
            verdict = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            why = None if verdict is None else f"{verdict.tag}: {(verdict.text or '').strip()}"
            cases[f"{case.get('package')}/{number} {case.get('classname')}"] = why
    return cases


def test_junit_cases_reads_a_report_with_nul_bytes() -> None:
    report = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<testsuites>'
        b'<testsuite name="3.8. GOAWAY" package="generic/3.8" tests="2">'
        b'<testcase package="generic/3.8" classname="Sends a GOAWAY frame">'
        b"<error>PING Frame (opaque_data:h2spec\0\0)</error></testcase>"
        b'<testcase package="generic/3.8" classname="Another"></testcase>'
        b"</testsuite></testsuites>"
    )
    assert junit_cases(report) == {
        "generic/3.8/1 Sends a GOAWAY frame": "error: PING Frame (opaque_data:h2spec)",
        "generic/3.8/2 Another": None,
    }


@pytest.mark.parametrize("workers", [(), ("--workers", "2")], ids=["one", "workers"])
def test_h2spec_passes_every_case(start_server: Any, tmp_path: Path, workers: tuple[str, ...]) -> None:
    if not os.access(H2SPEC, os.X_OK):
        pytest.skip(f"h2spec is not at {H2SPEC} (the shared tools' binary; or set $H2SPEC)")
    pki = make_pki(tmp_path)
    server = start_server(
        extra=("--certfile", str(pki.server_chain), "--keyfile", str(pki.server_key), *workers)
    )
    # a body longer than the windows h2spec sets (http2/6.9.2/2 is skipped on a shorter one)
    server.add_route("/h2spec", "seq 100 | kapow set /response/body")
    server.add_route("/h2spec", "kapow get /request/body | kapow set /response/body", "-X", "POST")
    host, port = server.user.removeprefix("https://").rsplit(":", 1)
    report = tmp_path / "h2spec.xml"
    result = subprocess.run(
        [str(H2SPEC), "-h", host, "-p", port, "-t", "-k", "-P", "/h2spec", "-o", "5", "-j", str(report)],
        capture_output=True,
        timeout=600,
    )
    output = result.stdout.replace(b"\0", b"").decode(errors="replace")
    summary = output[output.find("Failures:") :] if "Failures:" in output else output[-300:]
    cases = junit_cases(report.read_bytes())
    failed = {name: why for name, why in cases.items() if why is not None}
    assert not failed, f"{len(failed)} of {len(cases)} h2spec cases failed: {failed}\n{summary}"
    assert len(cases) >= CASES, summary
    assert f"{len(cases)} tests, {len(cases)} passed" in summary, summary
    assert result.returncode == 0, summary
