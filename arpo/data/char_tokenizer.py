"""The 54-symbol character tokenizer of the embedded default task, as a Hugging Face `tokenizer.json`.

A tiny model learns `Q: 123*45+6=?` -> `<python>print(123*45+6)</python>...` far faster over characters than over
a 150k BPE vocabulary (see ../shared/CALIBRATION.md). Built with `tokenizers` as a BPE model with no merges (so
every character is one token), a Fuse decoder (decode joins characters with nothing in between) and an `<unk>`
for anything else (a capital in a traceback, say). Loadable by `transformers.PreTrainedTokenizerFast`.

Vocabulary (54): <pad> <bos> <eos> <unk>, digits, a-z, `Q`, and ` \\n<>/()*+=?:.` — enough to spell every tag,
the questions, the arithmetic and the bundled search corpus.

`python -m arpo.data.char_tokenizer` rewrites `arpo/data/embedded/tokenizer.json`.
"""
from __future__ import annotations

import os
import string

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = SPECIAL_TOKENS
CHARS = list(string.digits) + list(string.ascii_lowercase) + ["Q"] + list(" \n<>/()*+=?:.")
VOCAB = SPECIAL_TOKENS + CHARS
TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "tokenizer.json")


def build_char_tokenizer():
    """A `tokenizers.Tokenizer` with one token per character of `CHARS` and the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def save_char_tokenizer(path: str = TOKENIZER_PATH) -> None:
    build_char_tokenizer().save(path)


def load_embedded_tokenizer(path: str = TOKENIZER_PATH):
    """The bundled tokenizer as a `transformers.PreTrainedTokenizerFast` with pad/bos/eos/unk set."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path} (run `python -m arpo.data.char_tokenizer`)")
    return PreTrainedTokenizerFast(tokenizer_file=path, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK)


def unknown_chars(text: str) -> set[str]:
    """Characters of `text` the tokenizer would map to <unk>."""
    known = set(CHARS)
    return {c for c in text if c not in known}


if __name__ == "__main__":
    save_char_tokenizer()
    print(f"wrote {len(VOCAB)}-symbol tokenizer to {TOKENIZER_PATH}")
