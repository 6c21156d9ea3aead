"""The embedded sample: small, public-domain text only, three domains and a data.toml that loads."""

import tomllib
from importlib.resources import files
from pathlib import Path

from teleflm.data import sample
from teleflm.data.prepare import load_data_config, resolve_inputs
from teleflm.data.sources import read_documents

REPO = Path(__file__).resolve().parents[2]


def test_shipped_files_are_small_and_packaged():
    shipped = [p for p in files(sample).iterdir() if p.name.endswith(".zst")]
    assert sorted(p.name for p in shipped) == ["kjv.txt.zst", "poems.txt.zst"]
    assert sum(len(p.read_bytes()) for p in shipped) < 2_000_000
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "**/*.zst" in package_data["teleflm"]


def test_documents_are_the_public_domain_texts():
    chapters, poems = sample.kjv_chapters(), sample.poems()
    assert chapters[0].startswith("Genesis 1\n\n") and "In the beginning God created" in chapters[0]
    assert len(chapters) == 1189  # every chapter of the Bible
    assert len(poems) > 300 and all(any("\u4e00" <= c <= "\u9fff" for c in p) for p in poems)


def test_code_domain_is_bounded_and_deterministic():
    first, second = sample.stdlib_sources(), sample.stdlib_sources()
    assert first == second and 0 < len(first) <= sample.MAX_CODE_FILES
    assert max(len(t.encode()) for t in first) <= sample.MAX_CODE_FILE_BYTES
    assert sum("def " in t or "class " in t for t in first) > len(first) // 2


def test_write_sample_corpus_gives_a_config_that_loads(tmp_path):
    config_path = sample.write_sample_corpus(tmp_path / "corpus")
    cfg = load_data_config(config_path)
    assert [d.name for d in cfg.domains] == list(sample.DOMAINS)
    assert abs(sum(d.proportion for d in cfg.domains) - 1.0) < 1e-9
    for domain in cfg.domains:
        files_ = resolve_inputs(domain.inputs, config_path.parent, domain.name)
        docs = [d for f in files_ for d in read_documents(f, domain.text_field, domain.doc_split)]
        assert docs == sample.DOMAINS[domain.name][0]()  # written and read back unchanged


def test_shipped_data_configs_load():
    configs = sorted((REPO / "configs" / "data").glob("*.toml"))
    assert configs
    for path in configs:
        cfg = load_data_config(path)
        assert cfg.domains and all(d.proportion > 0 and d.epochs > 0 for d in cfg.domains)
