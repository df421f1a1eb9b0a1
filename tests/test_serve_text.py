"""Stop strings on a growing answer: each row's text decoded once, incrementally (``serve/text.IncrementalText``,
``StopWatch``), must answer exactly what decoding the whole sequence answers after every step (``StopStrings.cut``),
on random token streams with multi-byte characters split across tokens, invalid bytes, special tokens, and stop
strings that straddle steps; on a byte-level tokenizer (the tiny models'), a SentencePiece-style one (a word's
leading space dropped at the start of a decode, byte fallback) and SmolLM2's real BPE when it is cached."""

from __future__ import annotations

import random

import pytest
from tiny import make_tokenizer
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from softprompts.files import cache_dir
from softprompts.serve.text import IncrementalText, StopStrings, StopWatch

CHARS = ["a", "b", " ", "\n", "e", "\u00e9", "\u00fc", "\u6f22", "\u5b57", "\U0001f600", "st", "op"]
PIECES = ["\u2581", "\u2581hello", "\u2581world", "lo", "he", "ll", "o", "\u2581a", "b", "c", "\u2581stop", "s", "t",
          "p", "\u00e9", "\u2581\u00e9"]


def byte_level_stream(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Token ids of random characters (1-4 UTF-8 bytes each, one token a byte), lone invalid bytes and the
    specials (<pad>, <eos>: decoded as nothing)."""
    ids: list[int] = []
    while len(ids) < length:
        roll = rng.random()
        if roll < 0.1:
            ids.append(rng.choice([256, 257]))
        elif roll < 0.2:
            ids.append(tokenizer.convert_tokens_to_ids(_byte_char(rng.randrange(0x80, 0x100))))
        else:
            ids += tokenizer.encode(rng.choice(CHARS), add_special_tokens=False)
    return ids


def _byte_char(b: int) -> str:
    """GPT-2's printable character for byte ``b`` (the byte-level vocabulary's token)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(
        range(ord("\u00ae"), ord("\u00ff") + 1))
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2's decoding: '\u2581' is a space, bytes fall back to <0xNN> tokens, the first space is stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in PIECES:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def sentencepiece_stream(tokenizer, rng: random.Random, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        roll = rng.random()
        if roll < 0.3:
            ids += [3 + b for b in rng.choice(CHARS).encode()]  # a character as byte-fallback tokens
        elif roll < 0.35:
            ids.append(rng.choice([1, 2]))
        else:
            ids.append(tokenizer.convert_tokens_to_ids(rng.choice(PIECES)))
    return ids


def smollm_stream(tokenizer, rng: random.Random, length: int) -> list[int]:
    text = "".join(rng.choice(CHARS + [" the", " stop", "ing", "\u00e7a", " \u00fcber"]) for _ in range(length))
    ids = tokenizer.encode(text, add_special_tokens=False)[:length]
    return [i if rng.random() > 0.1 else rng.randrange(len(tokenizer)) for i in ids]


def _smollm():
    path = cache_dir() / "models" / "smollm2-135m-v1"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("SmolLM2's converted copy is not cached")
    return AutoTokenizer.from_pretrained(path)


TOKENIZERS = {"byte-level": (make_tokenizer, byte_level_stream), "sentencepiece": (sentencepiece_tokenizer,
                                                                                   sentencepiece_stream),
              "smollm2": (_smollm, smollm_stream)}


def chunks(rng: random.Random, ids: list[int]) -> list[int]:
    """Where a stream is cut into steps: mostly one token, sometimes several at once."""
    cuts, k = [], 0
    while k < len(ids):
        k = min(len(ids), k + (1 if rng.random() < 0.7 else rng.randint(2, 4)))
        cuts.append(k)
    return cuts


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@pytest.mark.parametrize("seed", range(12))
def test_incremental_text_equals_the_whole_decode_after_every_step(kind, seed):
    make, stream = TOKENIZERS[kind]
    tokenizer, rng = make(), random.Random(seed)
    ids = stream(tokenizer, rng, 80)
    text = IncrementalText(tokenizer)
    previous = 0
    for k in chunks(rng, ids):
        got = text.extend(ids[previous:k])
        previous = k
        assert got == tokenizer.decode(ids[:k], skip_special_tokens=True), (kind, seed, k)
        assert got[: text.stable] == tokenizer.decode(ids, skip_special_tokens=True)[: text.stable]  # final


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@pytest.mark.parametrize("seed", range(12))
def test_stop_watch_answers_what_the_whole_cut_answers(kind, seed):
    """Stop strings taken from the answer's own text (so they straddle tokens and steps, and hold multi-byte
    characters and U+FFFD), plus ones that never occur; with and without ``min_tokens``; every step compared."""
    make, stream = TOKENIZERS[kind]
    tokenizer, rng = make(), random.Random(1000 + seed)
    ids = stream(tokenizer, rng, 60)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    for _ in range(4):
        start = rng.randrange(max(1, len(whole) - 3))
        found = [whole[start : start + rng.randint(1, 4)] for _ in range(rng.randint(1, 2))]
        stops = StopStrings.of(found + ["never-here"], min_tokens=rng.choice([0, 0, 3, 10]))
        watch, check = StopWatch(stops, tokenizer), stops.check(tokenizer)
        for k in chunks(rng, ids):
            want = stops.cut(tokenizer, ids[:k])
            assert watch.cut(ids[:k]) == want, (kind, seed, stops, k)
            assert check(ids[:k]) == want[1]


def test_a_stop_string_split_across_three_steps_stops_at_the_step_that_completes_it():
    tokenizer = make_tokenizer()
    ids = tokenizer.encode("ab\u6f22cd", add_special_tokens=False)  # the middle character is 3 byte tokens
    watch = StopStrings.of(["b\u6f22c"]).check(tokenizer)
    assert [watch(ids[:k]) for k in range(1, len(ids) + 1)] == [False, False, False, False, False, True, True]


class CountingTokenizer:
    """A tokenizer that counts the tokens it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("min_tokens", [0, 5])
def test_a_growing_answer_is_decoded_once_not_again_on_every_step(min_tokens):
    """300 steps of a stop check decode a few tokens each (the lookback), not the whole answer every time (which
    would be 300 * 301 / 2 = 45150 tokens)."""
    tokenizer = CountingTokenizer(make_tokenizer())
    ids = tokenizer.encode("plain text \u00e9\u6f22 " * 30, add_special_tokens=False)[:300]
    check = StopStrings.of(["never"], min_tokens).check(tokenizer)
    assert not any(check(ids[:k]) for k in range(1, len(ids) + 1))
    assert tokenizer.decoded < 6 * len(ids)
