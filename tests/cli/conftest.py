from tests.model.conftest import one_thread, sentencepiece_dir  # noqa: F401  (shared fixtures)
