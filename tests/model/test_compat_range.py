"""The transformers range that exports claim is stated once (OLDEST_TRANSFORMERS), in the export's
README and in docs/model.md, and is what scripts/compat.sh checks."""

from teleflm.model.io import OLDEST_TRANSFORMERS, export_hf
from tests.conftest import REPO
from tests.model.reference import random_model


def test_range_is_written_where_users_read_it(tmp_path):
    export = export_hf(random_model(), tmp_path / "export")
    readme = (export / "README.md").read_text()
    assert f"transformers >= {OLDEST_TRANSFORMERS}" in readme
    assert 'from_pretrained("export", torch_dtype=torch.bfloat16' in readme
    assert f"transformers >= {OLDEST_TRANSFORMERS}" in (REPO / "docs" / "model.md").read_text()
    compat = (REPO / "scripts" / "compat.sh").read_text()
    assert "OLDEST_TRANSFORMERS" in compat and "tests.compat.check_export" in compat
