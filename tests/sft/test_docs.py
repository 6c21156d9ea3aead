"""docs/sft.md lists the [sft] keys exactly as the dataclass defines them."""

from pathlib import Path

from teleflm.sft.config import SFTSection
from teleflm.train.config_reference import section_table


def test_sft_table_in_docs_is_current():
    table = section_table(SFTSection)
    assert table in (Path(__file__).resolve().parents[2] / "docs" / "sft.md").read_text()
