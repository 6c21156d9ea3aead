"""The domain mixture: a deterministic stream of packed training sequences, sharded over ranks.

One global stream, computed the same way on every rank. Global sequence g comes from the domain with
the largest deficit `proportion * (g + 1) - delivered` (a low-discrepancy rule: delivered proportions
track the table to within one sequence per domain) and goes to data-parallel rank `g % dp_size`, so
ranks never overlap and leave no gap. Within a domain, documents are visited in a seeded order per
epoch (DomainStream), joined with `</s>`, and cut into windows of `context_length + 1` tokens that
advance by `context_length`, so every token is a target exactly once. Memory per rank does not grow
with the corpus: a few blocks of each domain's order, and memmaps.

The state is a few integers (global sequences drawn, how many came from each domain, and where each
domain's next window starts: document and token): the resumed stream is the same stream on any number
of ranks. Take it when every rank has drawn the same number of sequences, i.e. at a global-batch
boundary (the trainer saves at step boundaries).
"""

import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from teleflm.config import POSITIVE
from teleflm.data.tokenizer import EOS_ID


def document_ids(tokens: np.ndarray) -> np.ndarray:
    """int32, the shape of `tokens` [rows, T]: each token's document within its row, the number of
    </s> before it (a </s> ends its own document)."""
    ends = np.cumsum(tokens == EOS_ID, axis=1)
    return np.concatenate([np.zeros((len(tokens), 1), np.int64), ends[:, :-1]], axis=1).astype(np.int32)


@dataclass
class DomainWeight:
    """A domain's share of the mixture: a run config's `[[data.mixture]]` entry; each `[[domains]]`
    entry of a data config is one too (teleflm.data.prepare.DomainSource), kept in the manifest."""

    name: str  # a domain of the shards
    proportion: float  # share of training sequences (normalised over the mixture)
    epochs: float = 1.0  # passes over the domain the run may make (checked before it starts)

    RANGES = dict(proportion=POSITIVE, epochs=POSITIVE)


# Documents per block of an epoch's order: what one domain's order holds in memory (4 bytes each,
# two blocks at a time), whatever the domain's size.
BLOCK_DOCS = 1 << 20
# Documents whose lengths are gathered at a time when the stream skips ahead (other ranks' sequences).
_SEEK_CHUNK = 1 << 16


class DomainStream:
    """One domain's documents as an endless token stream: epoch after epoch, each in a fresh seeded
    order, each document followed by </s>.

    The order of an epoch: the n documents are dealt into nb = ceil(n / BLOCK_DOCS) strided blocks
    (block b holds documents b, b + nb, b + 2 nb, ..., so every block spans the whole domain), the
    blocks are visited in a seeded permutation and each block's documents in a seeded permutation of
    their own. With one block (n <= BLOCK_DOCS) that is one seeded permutation of all documents.
    Memory is bounded by the blocks, not the domain: document lengths come from the offsets file (a
    memmap) as the stream goes, and a cursor (document k of the stream starts at token `start`) is
    all the position there is."""

    def __init__(self, shards, name: str, seed: int, split: str):
        self.tokens = shards.tokens(name, split)
        self.offsets = shards.doc_offsets(name, split)
        self.n_docs = len(self.offsets) - 1
        self.epoch_tokens = int(self.offsets[-1]) + self.n_docs  # each document plus its </s>
        self.seed = [seed, zlib.crc32(name.encode())]  # by name: reordering the mixture changes nothing
        self.n_blocks = -(-self.n_docs // BLOCK_DOCS)
        q, r = divmod(self.n_docs, self.n_blocks)
        self.block_sizes = np.where(np.arange(self.n_blocks) < r, q + 1, q)
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._blocks: dict[tuple[int, int], np.ndarray] = {}
        self.cursor = (
            0,
            0,
        )  # (k, start): document k of the stream (epoch * n_docs + index) starts at token `start`

    def _block_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(blocks in visiting order, index in the epoch's order where each starts) of an epoch."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # the stream moves forward: two epochs cover any window
                del self._orders[min(self._orders)]
            # Keys [seed, name, epoch, b] with b < n_blocks belong to the blocks; n_blocks to this one.
            blocks = np.random.default_rng([*self.seed, epoch, self.n_blocks]).permutation(self.n_blocks)
            self._orders[epoch] = blocks, np.concatenate([[0], np.cumsum(self.block_sizes[blocks])])
        return self._orders[epoch]

    def _block(self, epoch: int, b: int) -> np.ndarray:
        """Positions within block b (0 .. size - 1) in the block's order for this epoch."""
        if (epoch, b) not in self._blocks:
            if len(self._blocks) >= 2:
                del self._blocks[min(self._blocks)]
            key = [*self.seed, epoch] if self.n_blocks == 1 else [*self.seed, epoch, b]
            order = np.random.default_rng(key).permutation(int(self.block_sizes[b]))
            self._blocks[epoch, b] = order.astype(np.int32)
        return self._blocks[epoch, b]

    def docs(self, k: int, count: int) -> np.ndarray:
        """Document ids of stream documents k .. k + count - 1 (int64)."""
        out, filled = np.empty(count, dtype=np.int64), 0
        while filled < count:
            epoch, index = divmod(k + filled, self.n_docs)
            blocks, starts = self._block_order(epoch)
            visit = int(np.searchsorted(starts, index, side="right")) - 1
            b, within = int(blocks[visit]), index - int(starts[visit])
            order = self._block(epoch, b)
            take = min(len(order) - within, count - filled)
            out[filled : filled + take] = b + self.n_blocks * order[within : within + take].astype(np.int64)
            filled += take
        return out

    def _lengths(self, docs: np.ndarray) -> np.ndarray:
        return self.offsets[docs + 1] - self.offsets[docs] + 1  # each document plus its </s>

    def seek(self, position: int) -> None:
        """Move the cursor forward to the document holding stream token `position`."""
        k, start = self.cursor
        if position < start:  # the mixture only reads forward; anything else walks from the start
            k, start = 0, 0
        average = max(self.epoch_tokens // self.n_docs, 1)
        while True:
            count = min((position - start) // average + 2, _SEEK_CHUNK)
            lengths = self._lengths(self.docs(k, count))
            ends = start + np.cumsum(lengths)
            i = int(np.searchsorted(ends, position, side="right"))
            if i < count:
                self.cursor = (k + i, int(ends[i] - lengths[i]))
                return
            k, start = k + count, int(ends[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the stream from position `start` (at or after the cursor's document)."""
        self.seek(start)
        out = np.empty(length, dtype=np.int64)
        k, within = self.cursor[0], start - self.cursor[1]
        filled = 0
        while filled < length:
            doc = int(self.docs(k, 1)[0])
            first, body = int(self.offsets[doc]), int(self.offsets[doc + 1] - self.offsets[doc])
            take = min(body - within, length - filled)
            out[filled : filled + take] = self.tokens[first + within : first + within + take]
            filled += take
            if filled < length:  # the document is done: its </s>, then the next document
                out[filled] = EOS_ID
                filled += 1
                k, within = k + 1, 0
        return out

    def check_cursor(self, position: int) -> None:
        """The cursor's document holds stream token `position` (a restored state fits these shards)."""
        k, start = self.cursor
        if not (k >= 0 and start <= position < start + int(self._lengths(self.docs(k, 1))[0])):
            raise ValueError(
                f"stream state: cursor {list(self.cursor)} does not hold token {position}: "
                "the checkpoint was made from other shards"
            )


class MixtureStream:
    """This rank's share of the global stream of packed sequences over a mixture of domains."""

    def __init__(
        self,
        shards,
        mixture: list[DomainWeight],
        context_length: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        split: str = "train",
        document_mask: bool = False,
    ):
        # Refuse, before any work, what would fail or silently mislead later.
        if not mixture:
            raise ValueError("the mixture is empty")
        if context_length < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need context_length >= 1 and 0 <= dp_rank < dp_size, got {context_length}, {dp_rank}, {dp_size}"
            )
        names = [m.name for m in mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture names a domain twice: {names}")
        for m in mixture:
            if m.name not in shards.domains:
                raise ValueError(
                    f"mixture domain {m.name!r} is not in the shards {shards.root} (domains: {shards.domains})"
                )
            if shards.n_tokens(m.name, split) == 0:
                raise ValueError(f"mixture domain {m.name!r} has no {split} data in {shards.root}")
            if not (m.proportion > 0 and m.epochs > 0):
                raise ValueError(f"mixture domain {m.name!r}: proportion and epochs must be positive")
        total = sum(m.proportion for m in mixture)
        self.mixture = mixture
        self.proportions = np.array([m.proportion / total for m in mixture])
        self.domains = [DomainStream(shards, m.name, seed, split) for m in mixture]
        self.context_length = context_length
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_mask = document_mask
        self.drawn = 0  # global sequences drawn, all ranks together
        self.per_domain = np.zeros(len(mixture), dtype=np.int64)  # of which from each domain

    def next_sequences(self, n: int) -> dict:
        """This rank's next `n` sequences; the global stream advances by n * dp_size.
        tokens int64 [n, context_length + 1], domain int64 [n] (index into the mixture), and with
        document_mask, doc_ids int32 [n, context_length + 1]: each token's document within its row."""
        T = self.context_length
        tokens = np.empty((n, T + 1), dtype=np.int64)
        domain = np.empty(n, dtype=np.int64)
        row = 0
        for _ in range(n * self.dp_size):
            d = int(np.argmax(self.proportions * (self.drawn + 1) - self.per_domain))
            if self.drawn % self.dp_size == self.dp_rank:
                tokens[row] = self.domains[d].read(int(self.per_domain[d]) * T, T + 1)
                domain[row] = d
                row += 1
            self.per_domain[d] += 1
            self.drawn += 1
        batch = {"tokens": tokens, "domain": domain}
        if self.document_mask:
            batch["doc_ids"] = document_ids(tokens)
        return batch

    def _epochs_used(self, d: int) -> float:
        # Sequence k reads tokens [k * T, (k + 1) * T]: c sequences reach token c * T + 1.
        count = int(self.per_domain[d])
        return (count * self.context_length + (count > 0)) / self.domains[d].epoch_tokens

    def epochs_used(self) -> dict[str, float]:
        """Passes made over each domain so far (all ranks together)."""
        return {m.name: self._epochs_used(i) for i, m in enumerate(self.mixture)}

    def epochs_needed(self, global_sequences: int) -> dict[str, float]:
        """Passes over each domain that `global_sequences` sequences will make (to within one sequence)."""
        return {
            m.name: float(p * global_sequences * self.context_length / s.epoch_tokens)
            for m, p, s in zip(self.mixture, self.proportions, self.domains, strict=True)
        }

    def check_budget(self, global_sequences: int, repeat_past_epochs: bool = False) -> None:
        """Before any work: refuse a run of `global_sequences` that would repeat a domain past its
        `epochs`, naming each such domain (with `repeat_past_epochs`, warn instead)."""
        needed = self.epochs_needed(global_sequences)
        over = [
            f"{m.name!r} needs {needed[m.name]:.3g} epochs of {s.epoch_tokens:,} tokens, allowed {m.epochs:g}"
            for m, s in zip(self.mixture, self.domains, strict=True)
            if needed[m.name] > m.epochs
        ]
        if not over:
            return
        message = (
            f"the run's {global_sequences:,} sequences of {self.context_length} tokens would repeat "
            f"domains past their epochs: {'; '.join(over)}. Lower their proportions, add data, shorten "
            "the run or raise their epochs"
        )
        if not repeat_past_epochs:
            raise ValueError(f"{message} (or set data.repeat_past_epochs = true)")
        warnings.warn(message, stacklevel=2)

    def delivered_proportions(self) -> dict[str, float]:
        total = max(int(self.per_domain.sum()), 1)
        return {m.name: float(self.per_domain[i] / total) for i, m in enumerate(self.mixture)}

    def state_dict(self) -> dict:
        """JSON-ready; the same on every rank once all have drawn the same number of sequences:
        each domain's cursor is moved to where its next window starts, whoever draws it."""
        for domain, count in zip(self.domains, self.per_domain, strict=True):
            domain.seek(int(count) * self.context_length)
        return {
            "drawn": int(self.drawn),
            "per_domain": [int(c) for c in self.per_domain],
            "cursors": [list(domain.cursor) for domain in self.domains],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from any number of ranks); the stream continues exactly where it stopped."""
        per_domain = [int(c) for c in state["per_domain"]]
        if len(per_domain) != len(self.mixture):
            raise ValueError(f"stream state has {len(per_domain)} domains, the mixture {len(self.mixture)}")
        if min(per_domain, default=0) < 0:
            raise ValueError(f"stream state has negative counts: {per_domain}")
        if sum(per_domain) != state["drawn"]:
            raise ValueError(
                f"stream state inconsistent: {state['drawn']} drawn, {sum(per_domain)} per domain"
            )
        if state["drawn"] % self.dp_size:
            raise ValueError(
                f"stream state at {state['drawn']} sequences does not divide over {self.dp_size} ranks"
            )
        self.drawn = int(state["drawn"])
        self.per_domain = np.array(per_domain, dtype=np.int64)
        # A state from before cursors: each domain walks from its start to its position on first read.
        cursors = state.get("cursors")
        for i, (domain, count) in enumerate(zip(self.domains, per_domain, strict=True)):
            domain.cursor = (int(cursors[i][0]), int(cursors[i][1])) if cursors else (0, 0)
            if cursors:
                domain.check_cursor(count * self.context_length)
