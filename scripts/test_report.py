"""The end of `make test`: how long each stage took and the slowest tests, so a change that
makes the suite slow is seen when it is made.

    python scripts/test_report.py build/test-reports

Reads stages.tsv (stage, seconds, exit status; scripts/test_stages.sh) and every *.xml there
(JUnit XML from each pytest run; an MPI stage's from its rank 0)."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SLOWEST = 15


def stage_rows(folder: Path) -> list[tuple[str, float, int]]:
    path = folder / "stages.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, seconds, rc = line.split("\t")
        rows.append((name, float(seconds), int(rc)))
    return rows


def test_times(folder: Path) -> list[tuple[float, str, str]]:
    """(seconds, report name, test id) of every test case in the folder's JUnit files."""
    times = []
    for xml in sorted(folder.glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError:
            continue  # a run killed while writing: its stage's time still shows
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            times.append((float(case.get("time") or 0.0), xml.stem, name))
    return times


def report(folder: Path) -> str:
    lines = []
    rows = stage_rows(folder)
    if rows:
        lines.append("stage times:")
        for name, seconds, rc in rows:
            lines.append(f"  {name:<20} {seconds / 60:6.1f} min{'' if rc == 0 else f'  FAILED (exit {rc})'}")
        lines.append(f"  {'total':<20} {sum(s for _, s, _ in rows) / 60:6.1f} min")
    times = sorted(test_times(folder), reverse=True)
    if times:
        lines.append(f"slowest {min(SLOWEST, len(times))} of {len(times)} tests (setup and call):")
        for seconds, where, name in times[:SLOWEST]:
            lines.append(f"  {seconds:7.1f} s  [{where}] {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "build/test-reports")))
