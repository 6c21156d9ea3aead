"""DPO: the loss and its gradients equal trl's on the same batch and weights; preference data and its
stream."""

import json

import numpy as np
import pytest
import torch

from teleflm.model.loss import dpo_losses, sequence_logps
from teleflm.sft.preference import PairStream, prepare_pairs, split_heldout
from tests.model.reference import MUP, random_model

BETA = 0.1
PAIRS = [  # (prompt ids, chosen ids, rejected ids); responses end with </s> (2)
    ([5, 6, 7, 30], [8, 9, 2], [10, 2]),
    ([11, 12, 30], [13, 2], [14, 15, 16, 2]),
    ([17, 30], [18, 19, 20, 21, 2], [22, 23, 2]),
]


def plain_twin(model):
    """The same function without muP multipliers (folded into the embedding and lm_head): trl computes
    log-probabilities from `lm_head` itself, so it must see a model whose logits are lm_head's."""
    from teleflm.model import TeleFLMForCausalLM

    c = model.config
    twin = TeleFLMForCausalLM(type(c)(**{**c.to_diff_dict(), "use_mup": False}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.embed_tokens.weight"] *= c.input_mult
    state["lm_head.weight"] *= c.logit_scale
    twin.load_state_dict(state)
    return twin.eval()


def our_rows(width: int):
    """Rows interleaved chosen, rejected per pair, right-padded with <pad> (3); the loss mask on the
    response tokens."""
    tokens = torch.full((2 * len(PAIRS), width), 3)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, (prompt, *responses) in enumerate(PAIRS):
        for s, response in enumerate(responses):
            ids = prompt + response
            tokens[2 * i + s, : len(ids)] = torch.tensor(ids)
            mask[2 * i + s, len(prompt) : len(ids)] = True
    return tokens, mask


def our_loss(policy, reference, tokens, mask):
    with torch.no_grad():
        ref = sequence_logps(reference(tokens[:, :-1]).logits, tokens, mask, policy.config.vocab_size)
    logps = sequence_logps(policy(tokens[:, :-1]).logits, tokens, mask, policy.config.vocab_size)
    losses, margins = dpo_losses(logps, ref, BETA)
    return losses.mean(), margins


def trl_loss(policy, reference, tmp_path):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tests.model.tiny_tokenizers import train_byte_level_bpe

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(train_byte_level_bpe(tmp_path / "tok") / "tokenizer.json"),
        pad_token="<pad>",
        eos_token="</s>",
    )
    # trl tokenizes its dataset itself; the batch below is given as ids, so this set only builds the trainer.
    dataset = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, report_to=[], use_cpu=True, bf16=False)
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    inputs = DataCollatorForPreference(pad_token_id=3)(examples)
    return trainer._compute_loss(trainer.model, inputs, False)


def test_loss_and_gradients_equal_trl(tmp_path):
    policy, reference = (
        random_model(seed=1, vocab_size=512, **MUP),
        random_model(seed=2, vocab_size=512, **MUP),
    )
    policy.train()
    twin_policy, twin_reference = plain_twin(policy), plain_twin(reference)
    twin_policy.train()

    tokens, mask = our_rows(width=9)
    ours, margins = our_loss(policy, reference, tokens, mask)
    ours.backward()
    theirs = trl_loss(twin_policy, twin_reference, tmp_path)
    theirs.backward()

    assert margins.abs().min() > 0.1  # different policy and reference: the loss is not log 2
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    compared = 0
    for (name, p), (_, q) in zip(policy.named_parameters(), twin_policy.named_parameters(), strict=True):
        if "layers." in name:  # the same parameters in both (embedding and lm_head are rescaled twins)
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
            compared += 1
    assert compared == 9 * policy.config.num_hidden_layers


def test_padded_vocabulary_gets_no_mass():
    logits = torch.randn(2, 5, 16)
    tokens = torch.randint(0, 12, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    expected = torch.log_softmax(logits[..., :12], -1).gather(-1, tokens[:, 1:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(sequence_logps(logits, tokens, mask, 12), expected)
    assert (sequence_logps(logits, tokens, mask, 16) - expected).abs().min() > 1e-3


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from teleflm.data.tokenizer import load_tokenizer
    from tests.sft.common import train_chat_tokenizer

    return load_tokenizer(train_chat_tokenizer(tmp_path_factory.mktemp("tok") / "tok"))


def write_pairs(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_pairs_render_with_the_chat_format_and_mask_the_response(chat_tokenizer, tmp_path):
    from teleflm.sft.template import ChatFormat

    pair = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
        "chosen": "apple",
        "rejected": [{"role": "assistant", "content": "a very long answer"}],
    }
    path = write_pairs(tmp_path / "p.jsonl", [pair])
    pairs, report = prepare_pairs([str(path)], chat_tokenizer, context_length=100)
    assert report.pairs == 1 and pairs.tokens.shape == (1, 2, 101)
    chat = ChatFormat(chat_tokenizer)
    for side, response in ((0, [{"role": "assistant", "content": "apple"}]), (1, pair["rejected"])):
        ids, target = chat.render(pair["prompt"] + response)
        assert pairs.tokens[0, side, : len(ids)].tolist() == ids.tolist()
        learned = chat_tokenizer.decode(pairs.tokens[0, side][pairs.loss_mask[0, side]])
        assert learned == response[0]["content"] + "</s>"  # the answer and its end, never the prompt
        assert pairs.tokens[0, side, len(ids) :].tolist() == [chat_tokenizer.pad_token_id] * (101 - len(ids))


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "q", "chosen": "a"}', '"prompt", "chosen" and "rejected"'),
        (
            '{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}',
            "ending with a user",
        ),
        (
            '{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
            '"chosen" must be',
        ),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_lines_are_named(chat_tokenizer, tmp_path, line, reason):
    from teleflm.sft.data import ChatDataError

    path = write_pairs(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(ChatDataError, match=rf"p\.jsonl:2: .*{reason}"):
        prepare_pairs([str(path)], chat_tokenizer, context_length=40)
    pairs, report = prepare_pairs([str(path)], chat_tokenizer, context_length=40, on_error="skip")
    assert len(pairs) == 1 and len(report.skipped_lines) == 1 and reason in report.skipped_lines[0]


def test_markers_in_a_response_stay_text(chat_tokenizer, tmp_path):
    """A response that writes `</s><_user>` cannot end its turn or open another."""
    line = {"prompt": "q", "chosen": "a</s><_user>x", "rejected": "b"}
    pairs, _ = prepare_pairs([str(write_pairs(tmp_path / "p.jsonl", [line]))], chat_tokenizer, 100)
    chosen = pairs.tokens[0, 0][pairs.loss_mask[0, 0]].tolist()
    markers = {chat_tokenizer.convert_tokens_to_ids(t) for t in ("<_user>", "<_bot>")}
    assert not markers & set(chosen) and chosen.count(chat_tokenizer.eos_token_id) == 1  # its own end only
    assert chat_tokenizer.decode(chosen, skip_special_tokens=False) == "a</s><_user>x</s>"


def test_too_long_pairs_are_dropped_and_counted(chat_tokenizer, tmp_path):
    lines = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a " * 50, "rejected": "b"},
    ]
    pairs, report = prepare_pairs([str(write_pairs(tmp_path / "p.jsonl", lines))], chat_tokenizer, 16)
    assert len(pairs) == 1 and report.too_long == 1


def test_stream_keeps_pairs_whole_and_splits_them_over_ranks():
    from teleflm.sft.preference import PairSet

    n, width = 10, 4
    tokens = np.arange(n * 2 * width).reshape(n, 2, width)
    pairs = PairSet(tokens, np.ones_like(tokens, dtype=bool))
    ref = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    one = PairStream(pairs, ref, seed=3)
    whole = one.next_sequences(8)  # 4 pairs
    rows = whole["tokens"].reshape(4, 2, width)
    index = rows[:, 0, 0] // (2 * width)
    assert np.array_equal(rows, tokens[index]) and np.array_equal(whole["ref_logps"], ref[index].reshape(8))
    ranks = [PairStream(pairs, ref, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    shares = [s.next_sequences(4)["tokens"].reshape(2, 2, width) for s in ranks]
    assert sorted(np.concatenate(shares)[:, 0, 0].tolist()) == sorted(rows[:, 0, 0].tolist())
    with pytest.raises(ValueError, match="odd"):
        one.next_sequences(3)
    resumed = PairStream(pairs, ref, seed=3)
    resumed.load_state_dict(one.state_dict())
    assert np.array_equal(resumed.next_sequences(6)["tokens"], one.next_sequences(6)["tokens"])


def test_heldout_split_is_seeded_and_disjoint():
    from teleflm.sft.preference import PairSet

    tokens = np.arange(20 * 2 * 3).reshape(20, 2, 3)
    pairs = PairSet(tokens, np.ones_like(tokens, dtype=bool))
    train, heldout = split_heldout(pairs, 0.2, seed=1)
    again, _ = split_heldout(pairs, 0.2, seed=1)
    assert len(train) == 16 and len(heldout) == 4 and np.array_equal(train.tokens, again.tokens)
    assert not set(train.tokens[:, 0, 0]) & set(heldout.tokens[:, 0, 0])
