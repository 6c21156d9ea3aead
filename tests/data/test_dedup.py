"""Deduplication: planted exact and near copies (a few words changed) go, within a domain and across
domains and workers; the real text of the embedded sample stays, with its false-positive rate measured
(a removal whose true shingle similarity to the document that removed it is under 0.5)."""

import json
import random

from teleflm.data import sample
from teleflm.data.dedup import shingle_jaccard
from teleflm.data.prepare import prepare, removals
from teleflm.data.shards import open_shards
from teleflm.data.tokenizer import load_tokenizer
from tests.data.conftest import write_jsonl


def test_planted_duplicates_go_and_real_text_stays(tmp_path, tokenizer_dir):
    rng = random.Random(0)
    kjv, poems, code = sample.kjv_chapters(), sample.poems(), sample.stdlib_sources()
    long_chapters = [i for i, c in enumerate(kjv) if len(c.split()) >= 600]
    originals = rng.sample(long_chapters, 20)
    exact = [kjv[i].upper().replace(" ", "  ") for i in originals[:10]]  # equal once normalised
    near = []
    for i in originals[10:]:  # a paragraph with a few words changed
        w = kjv[i].split(" ")
        for j in rng.sample(range(len(w)), 3):
            w[j] = "changed"
        near.append(" ".join(w))
    assert all(0.9 < shingle_jaccard(kjv[i], n) < 1 for i, n in zip(originals[10:], near, strict=True))
    inputs = {
        "book": kjv + exact[:5] + near[:5],
        "poems": poems,
        "code": code,
        "more": exact[5:] + near[5:] + ["a document of its own, unlike any other here"],  # across domains
    }
    lines = [
        f'tokenizer = "{tokenizer_dir}"',
        'out = "shards"',
        "heldout_fraction = 0.0",
        "part_bytes = 400000",
    ]
    for name, docs in inputs.items():
        write_jsonl(tmp_path / f"{name}.jsonl", docs)
        lines += ["[[domains]]", f'name = "{name}"', f'inputs = ["{name}.jsonl"]']
    lines += ["[dedup]", "exact = true", "near = true", "examples = 3"]
    (tmp_path / "data.toml").write_text("\n".join(lines))
    manifest = prepare(tmp_path / "data.toml", progress=False, jobs=2, workers=1)

    shards, tok = open_shards(tmp_path / "shards"), load_tokenizer(tokenizer_dir)
    kept = {name: {tok.decode(ids.tolist()) for ids, _ in shards.documents(name)} for name in inputs}
    planted = set(exact) | set(near)
    assert not planted & set().union(*kept.values())  # every planted copy went
    assert {kjv[i] for i in originals} <= kept["book"]  # and the originals stayed
    assert kept["more"] == {"a document of its own, unlike any other here"}
    assert manifest["domains"]["more"]["deduplicated"] == {"exact": 5, "near": 5}
    assert (
        manifest["dedup"]["removed"]["exact"] >= 10
        and manifest["dedup"]["bands"] * manifest["dedup"]["rows"] <= 128
    )

    # Every removal of real (not planted) text, with the document that removed it.
    real = [(r, k) for r, k, _ in removals(tmp_path / "shards" / ".job") if r not in planted]
    distinct = len(kjv) + len(poems) + len(code)
    false_positives = [(r, k) for r, k in real if shingle_jaccard(r, k) < 0.5]
    print(
        f"\nreal-text removals: {len({r for r, _ in real})} of {distinct} documents; false positives (true "
        f"5-gram Jaccard < 0.5): {len(false_positives)}, a rate of {len(false_positives) / distinct:.4%}"
    )
    assert false_positives == []
    assert len({r for r, _ in real}) < 0.02 * distinct  # real near-copies (Psalm 14/53, codec tables) only

    report = json.loads((tmp_path / "shards" / "dedup_examples.json").read_text())
    assert {e["kind"] for e in report} == {"exact", "near"}
    assert all(e["removed"]["text"] and e["kept"]["file"].endswith(".jsonl") for e in report)
