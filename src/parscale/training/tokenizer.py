"""Tokenizers: Hugging Face `tokenizers` objects loaded from tokenizer.json, or built here.

- `load_tokenizer(folder_or_file)` (in checkpoint.py) reads any tokenizer.json, e.g. a released
  checkpoint's Qwen2 vocabulary.
- `byte_tokenizer()` is a byte-level BPE with no merges: 256 byte tokens plus `<|endoftext|>`
  (id 256). Any text round-trips; it needs no training, which makes it the default for tiny models.
- `train_bpe(texts, vocab_size)` trains a byte-level BPE on an iterator of strings.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"


def _byte_level_parts():
    from tokenizers import decoders, pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), decoders.ByteLevel()


def byte_tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {ch: i for i, ch in enumerate(_gpt2_bytes_to_unicode())}  # id = byte value
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = _byte_level_parts()
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _gpt2_bytes_to_unicode() -> list[str]:
    """The printable character ByteLevel uses for each byte value 0..255 (GPT-2's table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    by_byte = dict(zip(bs, cs, strict=True))
    return [chr(by_byte[b]) for b in range(256)]


MIN_VOCAB_SIZE = 257  # the 256 byte tokens and <|endoftext|>: a byte-level BPE has them whatever it is asked


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"a byte-level BPE needs a vocabulary of at least {MIN_VOCAB_SIZE} (the 256 bytes and "
                         f"{EOS_TOKEN}), got {vocab_size}")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE with `vocab_size` entries (including `<|endoftext|>`) trained on `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = _byte_level_parts()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_id(tokenizer) -> int | None:
    return tokenizer.token_to_id(EOS_TOKEN)
