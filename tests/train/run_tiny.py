"""Entry point for tests that need a real process (killed, or launched by torchrun):
`python run_tiny.py OUT '{"section": {"key": value}}' [KILL_AFTER_STEP]` trains the tiny config on
pattern data. With KILL_AFTER_STEP every process SIGKILLs itself right after logging that step, so
the interruption lands at that point whatever the timing."""

import json
import os
import signal
import sys
from pathlib import Path

from teleflm.data.synthetic import ArrayStream
from teleflm.testing import pattern_sequences, tiny_train_config
from teleflm.train.monitor import Monitor
from teleflm.train.trainer import Trainer, close


def die_after_logging(kill_step: int) -> None:
    log = Monitor.log

    def log_then_die(self, step, record):
        log(self, step, record)
        if step == kill_step:
            if self.enabled:
                self.tb.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    Monitor.log = log_then_die


if __name__ == "__main__":
    out, sections = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if len(sys.argv) > 3:
        die_after_logging(int(sys.argv[3]))
    sequences = pattern_sequences()
    try:
        Trainer(tiny_train_config(Path(out), **sections), lambda r, n: ArrayStream(sequences, r, n)).run()
    finally:
        close()
