"""Real text that every clone has (the other shared helpers are in teleflm.testing)."""

import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def sample_text(name: str) -> str:
    """Real text that ships with the clone: "kjv" (the King James Bible) and "poems" (Tang and Song
    poems) from the embedded sample, "code" from the Python standard library's own sources."""
    from teleflm.data import sample

    documents = {"kjv": sample.kjv_chapters, "poems": sample.poems, "code": sample.stdlib_sources}[name]
    return "\n\n".join(documents())


def pytest_collection_modifyitems(items):
    """The files that hold slow tests first, each file's tests together and in order: under
    scripts/test.sh's `-n --dist loadfile` a file runs on one worker (its module fixtures are built
    once), and the run does not end with one worker on a multi-minute file and the others idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
