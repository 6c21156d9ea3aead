"""Quality filters: each drops the document it is meant for and keeps real text, and prepare counts
the drops per filter and domain."""

from teleflm.data import sample
from teleflm.data.prepare import prepare
from teleflm.data.quality import FilterConfig, QualityFilter, words
from teleflm.data.shards import open_shards
from teleflm.data.tokenizer import load_tokenizer
from tests.data.conftest import write_jsonl

GOPHER = FilterConfig(
    min_words=50,
    max_words=100_000,
    min_mean_word_length=3,
    max_mean_word_length=10,
    max_symbol_word_ratio=0.1,
    max_duplicate_line_fraction=0.3,
    max_duplicate_line_char_fraction=0.2,
    max_duplicate_paragraph_fraction=0.3,
    max_duplicate_paragraph_char_fraction=0.2,
    max_top_ngram_fraction={"2": 0.2, "3": 0.18, "4": 0.16},
    max_duplicate_ngram_fraction={str(n): 0.15 - 0.01 * (n - 5) for n in range(5, 11)},
    min_letter_fraction=0.6,
    max_digit_fraction=0.2,
    max_punctuation_fraction=0.2,
    languages=["en"],
)

PROSE = (
    "The harbour town woke slowly that winter. Fishermen mended their nets beside the grey water while "
    "children ran between the stalls of the market, where bakers sold warm bread and old women argued "
    "about the price of apples. Nobody expected the storm that evening, although the sky had turned a "
    "strange colour before noon. By the time the lighthouse keeper climbed his stairs, waves were already "
    "breaking over the northern wall, and the boats tied in the inner basin knocked against each other "
    "like restless horses. In the morning the square was covered with seaweed, broken crates and one "
    "very surprised crab, which the mayor carried back to the beach with great ceremony."
)
GERMAN = (
    "Der kleine Hafen erwachte langsam an jenem Wintermorgen. Die Fischer flickten ihre Netze neben dem "
    "grauen Wasser, während Kinder zwischen den Ständen des Marktes liefen, wo Bäcker warmes Brot "
    "verkauften und alte Frauen über den Preis der Äpfel stritten. Niemand erwartete den Sturm am Abend, "
    "obwohl der Himmel schon vor Mittag eine seltsame Farbe angenommen hatte. Als der Wärter des "
    "Leuchtturms seine Treppe hinaufstieg, brachen die Wellen bereits über die nördliche Mauer."
)
NUMBERS = " ".join(str(10_000 + i * 7_919 % 90_000) for i in range(60))
BAD = {
    "min_words": "Too short to be a document.",
    "mean_word_length": " ".join(["a b c d e f"] * 20),
    "symbol_word_ratio": PROSE + " #tag" * 30,
    "duplicate_lines": "\n".join([PROSE[:400]] + ["click here to subscribe to the newsletter now"] * 8),
    "top_ngram": PROSE[:300] + " the lord of hosts" * 40,
    "digit_fraction": PROSE + " " + NUMBERS,
    "punctuation_fraction": PROSE + " ---!!!---" * 30,
    "language": GERMAN,
}


def test_each_filter_drops_its_document_and_keeps_prose():
    quality = QualityFilter(GOPHER)
    assert quality.verdict(PROSE) is None
    for expected, doc in BAD.items():
        assert quality.verdict(doc, words(doc)) == expected, expected
    # Real English text: most of the KJV passes Gopher's rules (genealogies and the law's repeated
    # formulas do not: the rules were made for web text).
    chapters = sample.kjv_chapters()
    assert sum(quality.verdict(c) is None for c in chapters) > 0.8 * len(chapters)
    assert QualityFilter(FilterConfig()).verdict("x") is None  # nothing is filtered unless asked


def test_prepare_counts_drops_per_filter_and_domain(tmp_path, tokenizer_dir):
    docs = [PROSE, *BAD.values(), PROSE + " and more."]
    write_jsonl(tmp_path / "web.jsonl", docs)
    write_jsonl(tmp_path / "zh.jsonl", sample.poems()[:50])
    filters = "\n".join(
        f"{k} = {v!r}".replace("'", '"') for k, v in vars(GOPHER).items() if v and not isinstance(v, dict)
    )
    filters += "\nmax_top_ngram_fraction = { 2 = 0.2, 3 = 0.18, 4 = 0.16 }\n"
    (tmp_path / "data.toml").write_text(
        f'tokenizer = "{tokenizer_dir}"\nout = "shards"\nheldout_fraction = 0.0\n'
        f'[[domains]]\nname = "web"\ninputs = ["web.jsonl"]\n[domains.filters]\n{filters}\n'
        '[[domains]]\nname = "zh"\ninputs = ["zh.jsonl"]\n[domains.filters]\nlanguages = ["zh"]\nmin_chars = 20\n'
    )
    manifest = prepare(tmp_path / "data.toml", progress=False, workers=1)
    assert manifest["domains"]["web"]["filtered"] == dict.fromkeys(BAD, 1)
    tok = load_tokenizer(tokenizer_dir)
    kept = [tok.decode(ids.tolist()) for ids, _ in open_shards(tmp_path / "shards").documents("web")]
    assert kept == [PROSE, PROSE + " and more."]
    zh = manifest["domains"]["zh"]
    assert zh["splits"]["train"]["documents"] + sum(zh["filtered"].values()) == 50
    assert zh["splits"]["train"]["documents"] >= 45
