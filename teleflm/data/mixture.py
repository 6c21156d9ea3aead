"""The domain mixture: a deterministic stream of packed training sequences, sharded over ranks.

One global stream, the same on every rank. Global sequence g is drawn from the domain with the
largest deficit `proportion * (g + 1) - delivered` (a low-discrepancy rule: delivered proportions
track the table within a sequence), and goes to data-parallel rank `g % dp_size`: ranks never overlap
and leave no gap. Within a domain, documents are visited in a seeded permutation per epoch, joined
with `</s>`, and cut into windows of `context_length + 1` tokens advancing by `context_length`, so
every token is a target once. The state is a few integers (sequences drawn, per domain), so a
resumed stream is the same stream, on any number of ranks.
"""

import warnings
from dataclasses import dataclass

import numpy as np

from teleflm.data.tokenizer import EOS_ID


@dataclass
class DomainWeight:
    name: str
    proportion: float
    epochs: float = 1.0


class DomainStream:
    """Windows of one domain's documents, joined with </s>, in a fresh permutation each epoch."""

    def __init__(self, shards, name: str, seed: int, split: str):
        self.tokens = shards.tokens(name, split)
        self.offsets = np.asarray(shards.doc_offsets(name, split))
        self.lengths = np.diff(self.offsets) + 1  # each document plus its </s>
        self.epoch_tokens = int(self.lengths.sum())
        self.seed, self.name = seed, name
        self._epoch, self._order, self._ends = -1, None, None

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, len(self.lengths)])
            self._order = rng.permutation(len(self.lengths))
            self._ends = np.cumsum(self.lengths[self._order])
            self._epoch = epoch

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the endless stream (epoch after epoch) from position `start`."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            epoch, pos = divmod(start + filled, self.epoch_tokens)
            self._load_epoch(epoch)
            i = int(np.searchsorted(self._ends, pos, side="right"))
            doc = self._order[i]
            doc_start = int(self._ends[i] - self.lengths[doc])
            within = pos - doc_start
            body = self.tokens[self.offsets[doc] : self.offsets[doc + 1]]
            piece = (
                np.append(np.asarray(body[within:], dtype=np.int64), EOS_ID)
                if within < len(body)
                else np.array([EOS_ID])
            )
            take = min(len(piece), length - filled)
            out[filled : filled + take] = piece[:take]
            filled += take
        return out


class MixtureStream:
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
        known = set(shards.domains)
        for m in mixture:
            if m.name not in known:
                raise ValueError(
                    f"mixture domain {m.name!r} is not in the shards {shards.root} (domains: {sorted(known)})"
                )
            if shards.n_tokens(m.name, split) == 0:
                raise ValueError(f"mixture domain {m.name!r} has no {split} data in {shards.root}")
            if m.proportion <= 0 or m.epochs <= 0:
                raise ValueError(f"mixture domain {m.name!r}: proportion and epochs must be positive")
        if not mixture:
            raise ValueError("the mixture is empty")
        total = sum(m.proportion for m in mixture)
        self.mixture = mixture
        self.proportions = np.array([m.proportion / total for m in mixture])
        self.domains = [DomainStream(shards, m.name, seed * 1009 + i, split) for i, m in enumerate(mixture)]
        self.context_length = context_length
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_mask = document_mask
        self.drawn = 0  # global sequences drawn, all ranks together
        self.per_domain = np.zeros(len(mixture), dtype=np.int64)
        self._warned: set[int] = set()

    def _next_domain(self) -> int:
        deficit = self.proportions * (self.drawn + 1) - self.per_domain
        return int(np.argmax(deficit))

    def next_sequences(self, n: int) -> dict:
        """This rank's next `n` sequences (the global stream advances by n x dp_size)."""
        T = self.context_length
        tokens = np.empty((n, T + 1), dtype=np.int64)
        domain = np.empty(n, dtype=np.int64)
        row = 0
        for _ in range(n * self.dp_size):
            d = self._next_domain()
            index = int(self.per_domain[d])
            if self.drawn % self.dp_size == self.dp_rank:
                tokens[row] = self.domains[d].read(index * T, T + 1)
                domain[row] = d
                row += 1
            self.per_domain[d] += 1
            self.drawn += 1
            self._check_epochs(d)
        batch = {"tokens": tokens, "domain": domain}
        if self.document_mask:
            # A token's document is the number of </s> before it in the window (</s> ends its own).
            ends = np.cumsum(tokens == EOS_ID, axis=1)
            batch["doc_ids"] = np.concatenate([np.zeros((n, 1), np.int64), ends[:, :-1]], axis=1).astype(
                np.int32
            )
        return batch

    def _check_epochs(self, d: int) -> None:
        used = self.per_domain[d] * self.context_length / self.domains[d].epoch_tokens
        if used > self.mixture[d].epochs and d not in self._warned:
            self._warned.add(d)
            warnings.warn(
                f"domain {self.mixture[d].name!r} is being repeated past its {self.mixture[d].epochs} epochs "
                f"({self.domains[d].epoch_tokens:,} tokens per epoch); lower its proportion or add data",
                stacklevel=3,
            )

    def epochs_used(self) -> dict[str, float]:
        return {
            m.name: float(self.per_domain[i] * self.context_length / self.domains[i].epoch_tokens)
            for i, m in enumerate(self.mixture)
        }

    def delivered_proportions(self) -> dict[str, float]:
        total = max(int(self.per_domain.sum()), 1)
        return {m.name: float(self.per_domain[i] / total) for i, m in enumerate(self.mixture)}

    def state_dict(self) -> dict:
        if self.drawn % self.dp_size:
            raise RuntimeError("stream state taken mid-batch: every rank must have drawn the same count")
        return {"drawn": int(self.drawn), "per_domain": [int(c) for c in self.per_domain]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["per_domain"]) != len(self.mixture):
            raise ValueError(
                f"stream state has {len(state['per_domain'])} domains, the mixture {len(self.mixture)}"
            )
        if state["drawn"] % self.dp_size:
            raise ValueError(
                f"stream state at {state['drawn']} sequences does not divide over {self.dp_size} ranks"
            )
        self.drawn = int(state["drawn"])
        self.per_domain = np.array(state["per_domain"], dtype=np.int64)
