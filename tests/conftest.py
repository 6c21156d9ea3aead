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
    """The slow tests first: under `-n` (scripts/test.sh) each worker starts on one, so the run does
    not end with one worker on a multi-minute test and the other idle. The order is otherwise kept."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
