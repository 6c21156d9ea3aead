"""Write the export that scripts/compat.sh checks under other transformers releases: a tiny muP
Tele-FLM with the 52B checkpoint's multipliers, its byte-level BPE tokenizer (trained on the embedded
sample) and a vocabulary padded past the tokenizer, exported by `teleflm.model.io.export_hf`.

    python -m tests.compat.make_export OUT
"""

import sys
from pathlib import Path

from teleflm.data.tokenizer import train_tokenizer
from teleflm.model.io import export_hf
from tests.conftest import sample_text
from tests.model.reference import random_model


def main(out: Path) -> Path:
    tokenizer = train_tokenizer(iter(sample_text("kjv")[:100_000].splitlines()), 500, out / "tokenizer")
    model = random_model(vocab_size=512, use_mup=True, input_mult=1.0, output_mult=0.5, mup_scale_factor=16.0)
    return export_hf(model, out / "export", tokenizer_dir=tokenizer, overwrite=True)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
