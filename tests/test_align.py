"""Span -> token alignment across tokenizer families (built locally), with non-ASCII text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from preprocess.align import (
    AlignmentError,
    TokenizerBundle,
    align_spans,
    byte_length_table,
    bytes_to_unicode,
    char_to_byte_positions,
    mark_overlaps,
)
from preprocess.assets import TOKENIZER_DIR
from preprocess.extractors.base import Span, validate_spans

CORPUS = ["naïve café → 東京 and the naïve Zürich coder wrote ⭢ if x > 0: return y",
          "déjà vu über straße 😀 emoji, total = 3 * 4 = 12",
          "def f(x):\n    return x * 2  # ok"] * 40
TEXT = "Naïve café → 東京: if x > 0: return 12 😀 straße"


def _byte_bpe(trim_offsets: bool = True, add_prefix_space: bool = False) -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=trim_offsets)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t


def _unigram_metaspace() -> Tokenizer:
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.NFKC()
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=200, special_tokens=["<eos>", "<unk>"],
                                                          unk_token="<unk>"))
    return t


def _wordpiece() -> Tokenizer:
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.decoder = decoders.WordPiece()
    t.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200,
                                                            special_tokens=["[UNK]", "[SEP]"]))
    return t


@pytest.fixture(scope="module")
def families() -> dict[str, Tokenizer]:
    return {"byte_bpe": _byte_bpe(),
            "byte_bpe_untrimmed": _byte_bpe(trim_offsets=False, add_prefix_space=True),
            "unigram_metaspace": _unigram_metaspace(), "wordpiece": _wordpiece()}


def _word_span(text: str, word: str) -> Span:
    a = text.index(word)
    return Span(a, a + len(word))


def test_mark_overlaps_edges():
    ss, se = np.array([5, 20]), np.array([10, 25])
    tok_s = np.array([0, 4, 5, 9, 10, 12, 19, 25, 7, 22])
    tok_e = np.array([5, 6, 6, 10, 12, 12, 20, 30, 7, 22])  # last two are zero-width tokens
    got = mark_overlaps(tok_s, tok_e, ss, se)
    # [0,5) touches the span start only: not overlapping; [10,12) starts at the span end: not overlapping.
    assert got.tolist() == [False, True, True, True, False, False, False, False, True, True]
    assert not mark_overlaps(tok_s, tok_e, np.array([], dtype=np.int64), np.array([], dtype=np.int64)).any()


def test_char_to_byte_positions():
    text = "aé東😀b"
    pos = char_to_byte_positions(text)
    assert pos.tolist() == [len(text[:i].encode()) for i in range(len(text) + 1)]


def test_bundled_tokenizer_uses_exact_byte_alignment():
    bundle = TokenizerBundle(TOKENIZER_DIR)
    assert bundle.byte_table is not None
    enc = bundle.backend.encode(TEXT, add_special_tokens=False)
    res = align_spans(np.array(enc.ids), enc.offsets, TEXT, [_word_span(TEXT, "東京")], bundle.byte_table)
    assert res.method == "bytes"
    marked = bundle.hf.decode([i for i, m in zip(enc.ids, res.dense) if m])
    assert "東京" in marked and "café" not in marked and ":" not in marked.replace("東京", "")


def test_byte_table_only_for_pure_byte_level(families):
    assert byte_length_table(families["byte_bpe"]) is not None
    assert byte_length_table(families["byte_bpe_untrimmed"]) is not None
    assert byte_length_table(families["unigram_metaspace"]) is None
    assert byte_length_table(families["wordpiece"]) is None


_ALPHABET = st.sampled_from(list("ab xyz=:\n") + ["é", "東", "京", "😀", "→", "ß", "ï"])


@settings(max_examples=150, deadline=None)
@given(text=st.text(_ALPHABET, min_size=1, max_size=40), data=st.data())
def test_byte_level_alignment_matches_brute_force(families, text, data):
    """Exact byte path vs a char-by-char reference built from the token strings themselves."""
    dec = {c: b for b, c in bytes_to_unicode().items()}
    for name in ("byte_bpe", "byte_bpe_untrimmed"):
        tok = families[name]
        enc = tok.encode(text, add_special_tokens=False)
        pieces = [bytes(dec[c] for c in tok.id_to_token(i)) for i in enc.ids]
        raw = text.encode()
        joined = b"".join(pieces)
        # add_prefix_space adds a space the text does not have (unless it already starts with one).
        assert joined == raw or (name == "byte_bpe_untrimmed" and joined == b" " + raw)
        n = len(text)
        a = data.draw(st.integers(0, n - 1))
        b = data.draw(st.integers(a + 1, n))
        spans = validate_spans([Span(a, b)], text)
        res = align_spans(np.array(enc.ids), enc.offsets, text, spans, byte_length_table(tok))
        # Reference: which characters does each token touch?  Walk bytes, map each to its char.
        char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode()]
        shift = len(joined) - len(raw)
        expected, pos = [], -shift
        for p in pieces:
            chars = {char_of_byte[j] for j in range(max(pos, 0), pos + len(p)) if 0 <= j < len(raw)}
            expected.append(any(a <= c < b for c in chars))
            pos += len(p)
        if joined == raw:
            assert res.method == "bytes"
            assert res.dense.tolist() == expected
        else:
            # Lengths do not add up (prefix space) -> validated tokenizer offsets are used instead;
            # every char of the span must still be covered by a marked token.
            assert res.method == "offsets"
            off = np.array(enc.offsets)
            covered = set()
            for (s, e), m in zip(off, res.dense):
                if m:
                    covered.update(range(s, e))
            assert set(range(a, b)) <= covered


@pytest.mark.parametrize("family,word,expect", [
    ("unigram_metaspace", "café", "café"),
    ("unigram_metaspace", "東京", "東京"),
    ("wordpiece", "café", "cafe"),  # lowercased, accent stripped by the normalizer
    ("wordpiece", "straße", "straße"),
    ("byte_bpe", "→ 東京", "→ 東京"),
])
def test_word_span_marks_exactly_that_word(families, family, word, expect):
    tok = families[family]
    enc = tok.encode(TEXT, add_special_tokens=False)
    res = align_spans(np.array(enc.ids), enc.offsets, TEXT, [_word_span(TEXT, word)], byte_length_table(tok))
    marked = [i for i, m in zip(enc.ids, res.dense) if m]
    assert marked, "a word span must mark at least one token"
    assert tok.decode(marked).replace(" ", "").replace("▁", "") == expect.replace(" ", "")
    unmarked = tok.decode([i for i, m in zip(enc.ids, res.dense) if not m])
    assert expect.split()[-1] not in unmarked


def test_invalid_offsets_raise(families):
    tok = families["wordpiece"]
    enc = tok.encode("hello", add_special_tokens=False)
    with pytest.raises(AlignmentError):
        align_spans(np.array(enc.ids), [(0, 50)] * len(enc.ids), "hello", [Span(0, 2)], None)


def test_byte_mismatch_falls_back_to_offsets(families):
    tok = families["byte_bpe"]
    text = "naïve café"
    enc = tok.encode(text, add_special_tokens=False)
    # Pretend the text were different: byte lengths no longer add up, so offsets must be used.
    res = align_spans(np.array(enc.ids), enc.offsets, text + "!", [Span(0, 5)], byte_length_table(tok))
    assert res.method == "offsets"


@pytest.mark.parametrize("family", ["byte_bpe", "unigram_metaspace", "wordpiece"])
def test_autotokenizer_bundle_per_family(tmp_path: Path, families, family):
    eos = {"byte_bpe": "<eos>", "unigram_metaspace": "<eos>", "wordpiece": "[SEP]"}[family]
    PreTrainedTokenizerFast(tokenizer_object=families[family], eos_token=eos).save_pretrained(tmp_path)
    bundle = TokenizerBundle(tmp_path, use_chat_template=True)
    assert bundle.eos_id == families[family].token_to_id(eos)
    assert not bundle.use_chat_template  # no template in these tokenizers -> raw prompt text
    assert bundle.render_prompt("Q?", None) == "Q?"
    assert (bundle.byte_table is not None) == (family == "byte_bpe")
    assert bundle.info()["alignment"] == ("bytes" if family == "byte_bpe" else "offsets")


def test_chat_template_fast_path_matches_jinja():
    bundle = TokenizerBundle(TOKENIZER_DIR)
    assert bundle._affixes is not None
    for content in ["hi", "  spaced  \n", "{{ not jinja }}", "<|im_end|> inside", "東京 😀"]:
        msgs = [{"role": "user", "content": content}]
        assert bundle.render_prompt(content, None) == bundle.hf.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=False)


def test_chat_template_that_transforms_content_disables_fast_path(tmp_path: Path):
    bundle = TokenizerBundle(TOKENIZER_DIR)
    bundle.hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                               "{% endif %}")
    bundle.hf.save_pretrained(tmp_path)
    b2 = TokenizerBundle(tmp_path)
    assert b2._affixes is None
    assert b2.render_prompt("  x  ", None) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_spec_pickles_and_behaves_like_the_bundle():
    """Workers get a pickled TokenizerSpec (no transformers import); it must encode identically."""
    import pickle

    bundle = TokenizerBundle(TOKENIZER_DIR)
    spec = pickle.loads(pickle.dumps(bundle.spec()))
    assert "_backend" not in spec.__dict__ and "_hf_tokenizer" not in spec.__dict__
    assert spec.backend.encode(TEXT, add_special_tokens=False).ids == \
        bundle.backend.encode(TEXT, add_special_tokens=False).ids
    assert spec.render_prompt("hi 東京", None) == bundle.hf.apply_chat_template(
        [{"role": "user", "content": "hi 東京"}], add_generation_prompt=True, tokenize=False)
    assert spec.fingerprint() == bundle.fingerprint() and spec.info() == bundle.info()
    np.testing.assert_array_equal(spec.byte_table, bundle.byte_table)
