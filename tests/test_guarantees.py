"""The README's "What specan guarantees" names, for each line, a test that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_guarantee_names_a_test_that_exists() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## What specan guarantees", 1)[1].split("\n## ", 1)[0]
    lines = re.split(r"\n- ", section)[1:]
    assert len(lines) >= 6
    for line in lines:
        named = re.findall(r"`(test_\w+\.py)(?:::(\w+))?`", line)
        assert named, f"a guarantee without its test: {line[:80]}"
        for file, name in named:
            source = (ROOT / "tests" / file).read_text()
            assert not name or f"def {name}(" in source, (file, name)
