"""The README's Python snippets run as written, and every ``print(...)  # expected`` prints what it says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
PRINT_WITH_EXPECTATION = re.compile(r"^\s*print\(.*\)\s+#\s*(?P<expected>.+?)\s*$")


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet(index):
    code = SNIPPETS[index]
    expected = [m.group("expected") for line in code.splitlines() if (m := PRINT_WITH_EXPECTATION.match(line))]
    prints = [line for line in code.splitlines() if re.match(r"^\s*print\(", line)]
    assert len(expected) == len(prints), "every print in a README snippet states what it prints"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})
    assert stdout.getvalue().splitlines() == expected
