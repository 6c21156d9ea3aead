from tests.model.conftest import one_thread  # noqa: F401  (shared fixture)
