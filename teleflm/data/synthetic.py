"""A deterministic stream with MixtureStream's interface over a fixed array of sequences, for tests and
benchmarks that must not depend on prepared data."""

import numpy as np


class ArrayStream:
    """Global sequence g of `sequences` goes to rank g % dp_size; state: global sequences consumed."""

    def __init__(self, sequences: np.ndarray, dp_rank: int = 0, dp_size: int = 1, poison: dict | None = None):
        self.sequences = sequences
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed = 0
        self.poison = poison or {}  # global sequence index -> replacement sequence

    def next_sequences(self, n: int) -> dict:
        start = self.consumed + self.dp_rank
        idx = [(start + i * self.dp_size) for i in range(n)]
        self.consumed += n * self.dp_size
        rows = [self.poison.get(g, self.sequences[g % len(self.sequences)]) for g in idx]
        return {"tokens": np.stack(rows).astype(np.int64), "domain": np.zeros(n, dtype=np.int64)}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]
