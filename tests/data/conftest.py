"""A small tokenizer and prepared shards shared by the data tests."""

import json

import pytest

from teleflm.data.tokenizer import train_tokenizer
from tests.conftest import sample_text


@pytest.fixture(scope="session")
def texts() -> dict[str, str]:
    return {
        "en": sample_text("kjv")[:200_000],
        "code": sample_text("code")[:100_000],
        "poems": sample_text("poems")[:50_000],
    }


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(iter([texts["en"], texts["code"], texts["poems"]]), 1000, out)


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    return path


def data_toml(
    folder, tokenizer_dir, domains: dict[str, tuple[list[str], float, float]], heldout=0.1
) -> object:
    """Write each domain's docs as JSONL and a data.toml naming them; returns the toml path."""
    lines = [f'tokenizer = "{tokenizer_dir}"', 'out = "shards"', f"heldout_fraction = {heldout}", ""]
    for name, (docs, proportion, epochs) in domains.items():
        write_jsonl(folder / f"{name}.jsonl", docs)
        lines += [
            "[[domains]]",
            f'name = "{name}"',
            f'inputs = ["{name}.jsonl"]',
            f"proportion = {proportion}",
            f"epochs = {epochs}",
            "",
        ]
    path = folder / "data.toml"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, tokenizer_dir, texts):
    """Three domains of real text, documents of a few hundred characters."""
    from teleflm.data.prepare import prepare

    folder = tmp_path_factory.mktemp("data")

    def docs(text, size):
        return [text[i : i + size] for i in range(0, len(text), size)]

    path = data_toml(
        folder,
        tokenizer_dir,
        {
            "en": (docs(texts["en"], 400), 0.6, 4.0),
            "code": (docs(texts["code"], 300), 0.3, 4.0),
            "poems": (docs(texts["poems"], 200), 0.1, 4.0),
        },
    )
    prepare(path, progress=False)
    return folder / "shards"
