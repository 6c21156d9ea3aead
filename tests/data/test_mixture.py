"""The mixture stream: proportions as configured, epochs respected, exact resume on any rank count,
ranks never sharing a sequence."""

import json
import warnings

import numpy as np
import pytest

from teleflm.data.mixture import DomainWeight, MixtureStream
from teleflm.data.shards import open_shards
from teleflm.data.tokenizer import EOS_ID

T = 32


@pytest.fixture(scope="module")
def shards(shards_dir):
    return open_shards(shards_dir)


def stream(shards, mixture=None, rank=0, size=1, **kw):
    return MixtureStream(
        shards, mixture or shards.mixture(), context_length=T, seed=7, dp_rank=rank, dp_size=size, **kw
    )


def test_delivered_proportions_within_one_percent(shards):
    s = stream(shards)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = s.next_sequences(10_000)
    configured = {"en": 0.6, "code": 0.3, "poems": 0.1}
    counts = np.bincount(batch["domain"], minlength=3) / 10_000
    for i, m in enumerate(s.mixture):
        assert counts[i] == pytest.approx(configured[m.name], abs=0.01)
        assert s.delivered_proportions()[m.name] == pytest.approx(configured[m.name], abs=0.01)


def test_windows_are_consecutive_document_text(shards):
    s = stream(shards, [DomainWeight("en", 1.0, 4.0)])
    batch = s.next_sequences(50)["tokens"]
    # Consecutive windows overlap by one token: each target is predicted exactly once.
    assert (batch[1:, 0] == batch[:-1, -1]).all()
    stream_tokens = np.concatenate([batch[0], *[row[1:] for row in batch[1:]]])
    docs = [np.append(d, EOS_ID) for d, _ in shards.documents("en")]
    # Every run between separators is a whole document of the domain.
    pieces = np.split(stream_tokens, np.flatnonzero(stream_tokens == EOS_ID) + 1)[1:-1]
    known = {tuple(d) for d in docs}
    assert pieces and all(tuple(p) in known for p in pieces)


def test_epochs_limit_warns(shards):
    tokens = shards.n_tokens("poems") + shards.manifest["domains"]["poems"]["splits"]["train"]["documents"]
    s = stream(shards, [DomainWeight("poems", 1.0, 1.0)])
    needed = tokens // T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.next_sequences(needed - 1)  # within one epoch: no warning
    with pytest.warns(UserWarning, match="'poems' is being repeated past its 1.0 epochs"):
        s.next_sequences(3)
    assert s.epochs_used()["poems"] > 1.0


@pytest.mark.parametrize("before, after", [(1, 1), (2, 2), (4, 2), (2, 3)])
def test_resume_gives_the_same_stream(shards, before, after):
    batch, k = 6, 5
    reference = stream(shards)
    expected = reference.next_sequences(batch * (k + 3))["tokens"]

    ranks = [stream(shards, rank=r, size=before) for r in range(before)]
    for _ in range(k):
        for r in ranks:
            r.next_sequences(batch // before if batch % before == 0 else 1)
    consumed = ranks[0].drawn
    state = ranks[0].state_dict()
    assert all(r.state_dict() == state for r in ranks)

    resumed = [stream(shards, rank=r, size=after) for r in range(after)]
    for r in resumed:
        r.load_state_dict(state)
    per_rank = 2
    got = [r.next_sequences(per_rank)["tokens"] for r in resumed]
    for r in range(after):
        for i in range(per_rank):
            g = consumed + i * after + r
            np.testing.assert_array_equal(got[r][i], expected[g])


def test_ranks_partition_the_stream(shards):
    ranks = [stream(shards, rank=r, size=4) for r in range(4)]
    outs = [r.next_sequences(25)["tokens"] for r in ranks]
    expected = stream(shards).next_sequences(100)["tokens"]
    interleaved = np.stack(outs, axis=1).reshape(100, T + 1)
    np.testing.assert_array_equal(interleaved, expected)


def test_document_mask_ids(shards):
    batch = stream(shards, document_mask=True).next_sequences(20)
    tokens, doc_ids = batch["tokens"], batch["doc_ids"]
    for row, ids in zip(tokens, doc_ids, strict=True):
        assert ids[0] == 0
        # The id steps up right after each separator and nowhere else.
        steps = np.flatnonzero(np.diff(ids)) + 1
        np.testing.assert_array_equal(steps, np.flatnonzero(row[:-1] == EOS_ID) + 1)


def test_bad_mixtures_and_states_are_refused(shards):
    with pytest.raises(ValueError, match="mixture domain 'law' is not in the shards"):
        stream(shards, [DomainWeight("law", 1.0)])
    with pytest.raises(ValueError, match="proportion and epochs must be positive"):
        stream(shards, [DomainWeight("en", 0.0)])
    with pytest.raises(ValueError, match="names a domain twice"):
        stream(shards, [DomainWeight("en", 1.0), DomainWeight("en", 1.0)])
    with pytest.raises(ValueError, match="dp_rank < dp_size"):
        stream(shards, rank=2, size=2)
    with pytest.raises(ValueError, match="does not divide over 4 ranks"):
        stream(shards, rank=0, size=4).load_state_dict({"drawn": 6, "per_domain": [3, 2, 1]})
    with pytest.raises(ValueError, match="inconsistent"):
        stream(shards).load_state_dict({"drawn": 7, "per_domain": [3, 2, 1]})
    s = stream(shards)
    s.next_sequences(3)
    assert json.loads(json.dumps(s.state_dict())) == s.state_dict()  # JSON as it is


def test_each_epoch_visits_every_document_once(shards):
    """Within a domain, a whole epoch of windows is every document once, in a seeded order."""
    s = stream(shards, [DomainWeight("poems", 1.0, 1.0)])
    epoch_tokens = shards.n_tokens("poems") + shards.split_info("poems")["documents"]
    rows = s.next_sequences(epoch_tokens // T)["tokens"]
    flat = np.concatenate([rows[0], *[r[1:] for r in rows[1:]]])
    pieces = np.split(flat, np.flatnonzero(flat == EOS_ID) + 1)[:-1]  # whole documents before the tail
    docs = [tuple(d) for d, _ in shards.documents("poems")]
    got = [tuple(p[:-1]) for p in pieces]
    assert len(got) == len(set(got)) and set(got) <= set(docs) and len(got) >= len(docs) - 1
    assert got != docs[: len(got)]  # shuffled, not file order
    other_seed = MixtureStream(shards, [DomainWeight("poems", 1.0, 1.0)], T, seed=8).next_sequences(5)
    assert not np.array_equal(other_seed["tokens"], rows[:5])


def test_budget_within_epochs_is_never_exceeded(shards):
    """A budget the epochs allow: no warning, no domain past its epochs, as epochs_needed predicted."""
    s = stream(shards, [DomainWeight("en", 0.5, 1.0), DomainWeight("code", 0.5, 3.0)])
    budget = int(s.domains[0].epoch_tokens * 0.9 / (0.5 * T))  # 90% of en's single epoch
    needed = s.epochs_needed(budget)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.next_sequences(budget)
    used = s.epochs_used()
    for m in s.mixture:
        assert used[m.name] <= m.epochs
        assert used[m.name] == pytest.approx(needed[m.name], rel=0.01)


def test_domain_without_data_is_refused(tmp_path, tokenizer_dir):
    from teleflm.data.prepare import prepare
    from tests.data.conftest import data_toml

    toml = data_toml(
        tmp_path,
        tokenizer_dir,
        {"full": (["some text"] * 5, 1.0, 1.0), "none": (["x"], 1.0, 1.0)},
        heldout=0.0,
    )
    (tmp_path / "none.jsonl").write_text("")
    with pytest.warns(UserWarning, match="domain 'none' has no training documents"):
        prepare(toml, progress=False)
    shards = open_shards(tmp_path / "shards")
    with pytest.raises(ValueError, match="mixture domain 'none' has no train data"):
        stream(shards)
