"""scripts/test_report.py: the end of make test names each stage's time and the slowest tests
from the JUnit files the stages wrote; a half-written file (a killed run) is skipped."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("test_report", ROOT / "scripts" / "test_report.py")
test_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(test_report)


def junit(cases):
    body = "".join(f'<testcase classname="{c}" name="{n}" time="{t}"/>' for c, n, t in cases)
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>'


def test_stage_times_and_the_slowest_tests_across_reports(tmp_path):
    (tmp_path / "stages.tsv").write_text("setup-test\t60.0\t0\ntest-unit\t600.5\t1\n")
    (tmp_path / "unit-integration.xml").write_text(junit(
        [("tests.unit.test_a", "test_fast", "0.01"), ("tests.integration.test_b", "test_slow", "42.5")]))
    (tmp_path / "mpi-np2-123.xml").write_text(junit(
        [("tests.mpi.test_c", f"test_{i}", str(i)) for i in range(20)]))
    (tmp_path / "broken.xml").write_text("<testsuites><testcase")  # killed mid-write
    text = test_report.report(tmp_path)
    lines = text.splitlines()
    assert "setup-test" in lines[1] and "1.0 min" in lines[1]
    assert "test-unit" in lines[2] and "FAILED (exit 1)" in lines[2]
    assert "11.0 min" in lines[3]  # total
    assert "slowest 15 of 22 tests" in text
    slow = lines[lines.index(next(l for l in lines if l.startswith("slowest"))) + 1:]
    assert len(slow) == 15
    assert "42.5 s" in slow[0] and "test_b::test_slow" in slow[0]
    assert "[mpi-np2-123] tests.mpi.test_c::test_19" in slow[1]
    assert not any("test_fast" in l for l in slow)


def test_no_reports_no_lines(tmp_path):
    assert test_report.report(tmp_path) == ""
