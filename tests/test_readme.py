"""The README's citations of tests are right: every test it names exists, where it says it is."""

from __future__ import annotations

import re

from .harness import ROOT

README = (ROOT / "README.md").read_text()
NAME = re.compile(r"`(test_\w+)`")
FILE = re.compile(r"`(tests/[\w/]+\.py)`")


def defined() -> dict[str, set[str]]:
    """Every test function in tests/: name -> the files defining it."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.MULTILINE):
            found.setdefault(name, set()).add(f"tests/{path.name}")
    return found


def test_every_cited_test_and_file_exists() -> None:
    tests = defined()
    assert sorted(set(NAME.findall(README)) - set(tests)) == []
    assert sorted(f for f in set(FILE.findall(README)) if not (ROOT / f).is_file()) == []


def test_a_test_cited_in_a_file_is_in_that_file() -> None:
    tests = defined()
    wrong = [(name, file) for name, file in re.findall(r"`(test_\w+)` in `(tests/[\w/]+\.py)`", README)
             if file not in tests.get(name, set())]
    assert wrong == []


def test_each_fault_row_cites_tests_in_the_files_the_table_names() -> None:
    """A row's tests live in the files the table's introduction lists, or in one the row cites."""
    tests = defined()
    section = README[README.index("## Faults"):]
    intro, table = section.split("| fault |", 1)
    listed = set(FILE.findall(intro))
    elsewhere = []
    for row in ("| fault |" + table).splitlines():
        if not row.startswith("|"):
            break
        files = listed | set(FILE.findall(row))
        elsewhere += [(name, sorted(tests[name])) for name in NAME.findall(row) if name in tests and not tests[name] & files]
    assert elsewhere == []
