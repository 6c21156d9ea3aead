"""Entry point for tests that need a real process (killed, or launched by torchrun):
`python run_tiny.py OUT '{"section": {"key": value}}'` trains the tiny config on pattern data."""

import json
import sys
from pathlib import Path

from teleflm.data.synthetic import ArrayStream  # noqa: E402
from teleflm.testing import pattern_sequences, tiny_train_config
from teleflm.train.trainer import Trainer, close  # noqa: E402

if __name__ == "__main__":
    out, sections = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    sequences = pattern_sequences()
    try:
        Trainer(tiny_train_config(Path(out), **sections), lambda r, n: ArrayStream(sequences, r, n)).run()
    finally:
        close()
