"""The domain mixture: a deterministic stream of packed training sequences, sharded over ranks.

One global stream, computed the same way on every rank. Global sequence g comes from the domain with
the largest deficit `proportion * (g + 1) - delivered` (a low-discrepancy rule: delivered proportions
track the table to within one sequence per domain) and goes to data-parallel rank `g % dp_size`, so
ranks never overlap and leave no gap. Within a domain, documents are visited in a seeded permutation
per epoch, joined with `</s>`, and cut into windows of `context_length + 1` tokens that advance by
`context_length`, so every token is a target exactly once.

The state is a few integers (global sequences drawn, and how many came from each domain): the
resumed stream is the same stream on any number of ranks. Take it when every rank has drawn the same
number of sequences, i.e. at a global-batch boundary (the trainer saves at step boundaries).
"""

import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from teleflm.data.tokenizer import EOS_ID


@dataclass
class DomainWeight:
    name: str
    proportion: float  # share of sequences (normalised over the mixture)
    epochs: float = 1.0  # passes over the domain's data the mixture may make before it warns


class DomainStream:
    """One domain's documents as an endless token stream: epoch after epoch, each in a fresh seeded
    permutation, each document followed by </s>."""

    def __init__(self, shards, name: str, seed: int, split: str):
        self.tokens = shards.tokens(name, split)
        self.offsets = np.asarray(shards.doc_offsets(name, split))
        self.lengths = np.diff(self.offsets) + 1  # each document plus its </s>
        self.epoch_tokens = int(self.lengths.sum())
        self.seed = [seed, zlib.crc32(name.encode())]  # by name: reordering the mixture changes nothing
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, end position of each document in that order) of an epoch."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a window straddles at most two epochs
                del self._epochs[min(self._epochs)]
            order = np.random.default_rng([*self.seed, epoch]).permutation(len(self.lengths))
            self._epochs[epoch] = order, np.cumsum(self.lengths[order])
        return self._epochs[epoch]

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the stream from position `start`."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            epoch, position = divmod(start + filled, self.epoch_tokens)
            order, ends = self._epoch(epoch)
            i = int(np.searchsorted(ends, position, side="right"))
            doc = order[i]
            within = position - int(ends[i] - self.lengths[doc])  # position inside document + </s>
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


def document_ids(tokens: np.ndarray) -> np.ndarray:
    """int32, the shape of `tokens` [n, T]: each token's document within its row, the number of </s>
    before it (a </s> ends its own document)."""
    ends = np.cumsum(tokens == EOS_ID, axis=1)
    return np.concatenate([np.zeros((len(tokens), 1), np.int64), ends[:, :-1]], axis=1).astype(np.int32)


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
        self._warned: set[int] = set()

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
            self._check_epochs(d)
        batch = {"tokens": tokens, "domain": domain}
        if self.document_mask:
            batch["doc_ids"] = document_ids(tokens)
        return batch

    def _epochs_used(self, d: int) -> float:
        # Sequence k reads tokens [k * T, (k + 1) * T]: c sequences reach token c * T + 1.
        count = int(self.per_domain[d])
        return (count * self.context_length + (count > 0)) / self.domains[d].epoch_tokens

    def _check_epochs(self, d: int) -> None:
        if self._epochs_used(d) > self.mixture[d].epochs and d not in self._warned:
            self._warned.add(d)
            warnings.warn(
                f"domain {self.mixture[d].name!r} is being repeated past its {self.mixture[d].epochs} epochs "
                f"({self.domains[d].epoch_tokens:,} tokens per epoch); lower its proportion or add data",
                stacklevel=3,
            )

    def epochs_used(self) -> dict[str, float]:
        """Passes made over each domain so far (all ranks together)."""
        return {m.name: self._epochs_used(i) for i, m in enumerate(self.mixture)}

    def epochs_needed(self, global_sequences: int) -> dict[str, float]:
        """Passes over each domain that `global_sequences` sequences will make (for a token budget,
        before training: compare with each domain's `epochs`)."""
        return {
            m.name: float(p * global_sequences * self.context_length / s.epoch_tokens)
            for m, p, s in zip(self.mixture, self.proportions, self.domains, strict=True)
        }

    def delivered_proportions(self) -> dict[str, float]:
        total = max(int(self.per_domain.sum()), 1)
        return {m.name: float(self.per_domain[i] / total) for i, m in enumerate(self.mixture)}

    def state_dict(self) -> dict:
        """JSON-ready; the same on every rank once all have drawn the same number of sequences."""
        return {"drawn": int(self.drawn), "per_domain": [int(c) for c in self.per_domain]}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state` (from any number of ranks); the stream continues exactly where it stopped."""
        per_domain = [int(c) for c in state["per_domain"]]
        if len(per_domain) != len(self.mixture):
            raise ValueError(f"stream state has {len(per_domain)} domains, the mixture {len(self.mixture)}")
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
        self._warned = {i for i, m in enumerate(self.mixture) if self._epochs_used(i) > m.epochs}
