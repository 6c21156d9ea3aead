"""docs/bad-input.md cites only tests that exist, so its table cannot drift from the suite."""

import re

from tests.conftest import REPO


def test_every_cited_test_exists():
    cited = 0
    for line in (REPO / "docs" / "bad-input.md").read_text().splitlines():
        file = None
        for path, name in re.findall(r"`(?:([\w/]+\.py))?::(\w+)", line):
            file = path or file
            source = (REPO / "tests" / file).read_text()
            assert f"def {name}(" in source, f"{file}::{name} is cited but does not exist"
            cited += 1
    assert cited >= 40
