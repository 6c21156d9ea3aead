"""The mixture stream: proportions as configured, epochs respected, exact resume on any rank count,
ranks never sharing a sequence."""

import json
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest

from teleflm.data import mixture
from teleflm.data.mixture import DomainStream, DomainWeight, MixtureStream
from teleflm.data.shards import open_shards
from teleflm.data.synthetic import write_synthetic_shards
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


def test_a_budget_past_a_domains_epochs_is_refused_before_any_work(shards):
    epoch = shards.n_tokens("poems") + shards.split_info("poems")["documents"]
    s = stream(shards, [DomainWeight("en", 0.9, 100.0), DomainWeight("poems", 0.1, 1.0)])
    within = int(epoch / (0.1 * T))  # poems' one epoch, at its share
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.check_budget(within)
    with pytest.raises(
        ValueError, match=r"'poems' needs 1\.1 epochs of [\d,]+ tokens, allowed 1.*repeat_past_epochs"
    ):
        s.check_budget(int(within * 1.1))
    with pytest.warns(UserWarning, match="'poems' needs 1.1 epochs"):
        s.check_budget(int(within * 1.1), repeat_past_epochs=True)


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
    with pytest.raises(ValueError, match="negative counts"):
        stream(shards).load_state_dict({"drawn": 0, "per_domain": [3, -2, -1]})
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


class InMemoryDomainStream:
    """A domain's stream as it was before bounded memory (up to commit 494a789): each epoch a full
    seeded permutation and the cumulative lengths in that order, in memory (tens of GB per rank for a
    billion documents). The bounded stream must give exactly this on domains of up to BLOCK_DOCS."""

    def __init__(self, shards, name, seed, split="train"):
        self.tokens = shards.tokens(name, split)
        self.offsets = np.asarray(shards.doc_offsets(name, split))
        self.lengths = np.diff(self.offsets) + 1
        self.epoch_tokens = int(self.lengths.sum())
        self.seed = [seed, zlib.crc32(name.encode())]

    def read(self, start, length):
        out, filled = np.empty(length, dtype=np.int64), 0
        while filled < length:
            epoch, position = divmod(start + filled, self.epoch_tokens)
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.lengths))
            ends = np.cumsum(self.lengths[order])
            i = int(np.searchsorted(ends, position, side="right"))
            doc = order[i]
            within = position - int(ends[i] - self.lengths[doc])
            body = int(self.lengths[doc]) - 1
            if within == body:
                out[filled] = EOS_ID
                filled += 1
                continue
            take = min(body - within, length - filled)
            first = int(self.offsets[doc]) + within
            out[filled : filled + take] = self.tokens[first : first + take]
            filled += take
        return out


def test_the_order_is_the_in_memory_permutation_of_before(shards):
    for name in shards.domains:
        bounded, before = DomainStream(shards, name, 7, "train"), InMemoryDomainStream(shards, name, 7)
        assert bounded.n_blocks == 1
        for k in range(0, int(2.5 * before.epoch_tokens) // T, 3):  # windows across three epochs
            np.testing.assert_array_equal(bounded.read(k * T, T + 1), before.read(k * T, T + 1))


def blocked_order(stream: DomainStream, epoch: int) -> np.ndarray:
    """The documented order of an epoch, materialised: strided blocks in a seeded order, each block's
    documents in a seeded order of their own."""
    n, nb = stream.n_docs, stream.n_blocks
    members = [np.arange(b, n, nb) for b in range(nb)]
    blocks = np.random.default_rng([*stream.seed, epoch, nb]).permutation(nb)
    return np.concatenate(
        [
            members[b][np.random.default_rng([*stream.seed, epoch, b]).permutation(len(members[b]))]
            for b in blocks
        ]
    )


def test_a_domain_of_many_blocks_streams_its_documented_order(shards, monkeypatch):
    monkeypatch.setattr(mixture, "BLOCK_DOCS", 7)  # the poems domain in uneven blocks of 6 and 7
    s = DomainStream(shards, "poems", 7, "train")
    assert s.n_blocks > 10 and len(set(s.block_sizes)) == 2
    docs = [np.append(d, EOS_ID) for d, _ in shards.documents("poems")]
    orders = [blocked_order(s, e) for e in range(3)]
    assert all(sorted(o) == list(range(s.n_docs)) for o in orders)  # each epoch: every document once
    flat = np.concatenate([docs[i] for o in orders for i in o])
    for k in range(0, 2 * s.epoch_tokens // T, 5):
        np.testing.assert_array_equal(s.read(k * T, T + 1), flat[k * T : k * T + T + 1])


def test_a_state_from_before_cursors_resumes_the_same_and_a_foreign_cursor_is_refused(shards):
    reference = stream(shards)
    expected = reference.next_sequences(40)["tokens"]
    first = stream(shards)
    first.next_sequences(30)
    state = first.state_dict()
    old = stream(shards)
    old.load_state_dict({k: v for k, v in state.items() if k != "cursors"})
    np.testing.assert_array_equal(old.next_sequences(10)["tokens"], expected[30:])
    assert old.state_dict() == reference.state_dict()
    foreign = {**state, "cursors": [[c[0], c[1] + 10**6] for c in state["cursors"]]}
    with pytest.raises(ValueError, match="does not hold token .* other shards"):
        stream(shards).load_state_dict(foreign)


def test_memory_does_not_grow_with_the_domain(tmp_path):
    """Two million documents (the order in two blocks): a stream opened, resumed near the end of its
    first epoch and read across into the second peaks under 24 MB (two blocks of the order); the
    in-memory order of before peaked at 96 MB."""
    shards = write_synthetic_shards(tmp_path / "shards", {"big": 2_000_000}, mean_tokens=4)
    tracemalloc.start()
    s = MixtureStream(shards, [DomainWeight("big", 1.0, 2.0)], context_length=T, seed=0)
    s.next_sequences(4)
    near_end = s.domains[0].epoch_tokens // T - 2
    s.load_state_dict({"drawn": near_end, "per_domain": [near_end]})  # walks 2M documents to get there
    rows = s.next_sequences(4)["tokens"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24e6, peak
    again = MixtureStream(shards, [DomainWeight("big", 1.0, 2.0)], context_length=T, seed=0)
    again.load_state_dict(s.state_dict() | {"drawn": near_end, "per_domain": [near_end]} | {"cursors": None})
    np.testing.assert_array_equal(again.next_sequences(4)["tokens"], rows)
