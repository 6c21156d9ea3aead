"""Text embeddings from a Tele-FLM model's final-norm hidden states: mean or last-token pooling,
optional L2 normalisation, batched by length.

Works on `TeleFLMModel` (what `AutoModel` loads from an export) and on `TeleFLMForCausalLM` alike.
Batches are right-padded: under causal attention a real token never sees the padding after it, and
the padding keys are masked as well, so a text gives the same vector alone and inside a batch.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch

POOLINGS = ("mean", "last")


def embed(
    model,
    tokenizer,
    texts: Sequence[str],
    pooling: str = "mean",
    normalize: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """(embeddings as a float32 (len(texts), hidden_size) tensor on the CPU, token count per text).

    Texts are tokenized as the tokenizer does by default (a BOS only if it adds one) and cut at the
    model's context; an empty text (no tokens) is refused."""
    from tqdm import tqdm

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    decoder = model.base_model  # TeleFLMModel itself, or the one inside TeleFLMForCausalLM
    context = decoder.config.max_position_embeddings
    # Plain encoding, no padding=True: a fast tokenizer shared with other threads (the server) must
    # not have its padding state changed.
    ids = [tokenizer(text)["input_ids"][:context] for text in texts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"text {i} is empty (no tokens to embed)")
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    vectors = torch.empty(len(ids), decoder.config.hidden_size, dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="embed", unit="batch", disable=not progress):
        lengths = torch.tensor([len(ids[i]) for i in batch])
        input_ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
        mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        with torch.no_grad():
            hidden = (
                decoder(
                    input_ids=input_ids.to(decoder.device),
                    attention_mask=mask.to(decoder.device),
                    use_cache=False,
                )
                .last_hidden_state.float()
                .cpu()
            )
        if pooling == "mean":
            pooled = (hidden * mask[:, :, None]).sum(dim=1) / lengths[:, None]
        else:
            pooled = hidden[torch.arange(len(batch)), lengths - 1]
        vectors[batch] = pooled
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors, [len(row) for row in ids]


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The texts of a JSONL file: each non-blank line an object whose `text_field` is a string, or a
    bare JSON string. A bad line raises ValueError naming the file and the line number."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{number}: expected a string or an object with a string {text_field!r}"
                )
            texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def write_embeddings(vectors: torch.Tensor, out: str | Path) -> None:
    """`.npy`: one float32 matrix, row i for the i-th text. `.jsonl`: one line per text,
    {"index": i, "embedding": [...]}."""
    import numpy as np

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, vectors.numpy())
    elif out.suffix == ".jsonl":
        with out.open("w") as f:
            for i, vector in enumerate(vectors.tolist()):
                f.write(json.dumps({"index": i, "embedding": vector}) + "\n")
    else:
        raise ValueError(f"{out}: the output must end in .npy or .jsonl")
