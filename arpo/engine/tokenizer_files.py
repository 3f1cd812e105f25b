"""Load the tokenizer a checkpoint directory actually has, never a guessed one.

With transformers 5, `AutoTokenizer.from_pretrained` on a directory without tokenizer files does not fail: it
builds an empty tokenizer of the class `config.json`'s model type suggests (a `Qwen2Tokenizer` whose
`eos_token_id` is 0), and an engine using it stops at the first token 0 it samples. So a tokenizer is loaded only
when the directory holds a vocabulary file that some transformers tokenizer reads: `tokenizer.json` (every fast
tokenizer), `vocab.json` (byte-level BPE, with merges.txt), `vocab.txt` (WordPiece), a SentencePiece model or a
tiktoken file. `tokenizer_config.json` or `special_tokens_map.json` alone hold no vocabulary and do not count.

A tokenizer saved as a plain `tokenizers` pipeline (the embedded character tokenizer: `tokenizer_class`
`TokenizersBackend` or `PreTrainedTokenizerFast`) is loaded as one. AutoTokenizer would pick the class that
config.json's model type suggests (`Qwen2Tokenizer`), whose own pre-tokenizer drops spaces, newlines and unknown
characters from every encoded text, tool results included.

    tok = checkpoint_tokenizer("ckpt/")     # None when ckpt/ has no tokenizer files; load errors propagate
"""
from __future__ import annotations

import json
import os

VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
               "sentencepiece.bpe.model", "sentencepiece.model", "spm.model")
PIPELINE_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
NO_TOKENIZER = ("stop strings, tool calls and chat need a tokenizer; the engine works on token ids only "
                "(pass tokenizer=..., or save one next to the checkpoint)")


def tokenizer_files(path: str) -> list[str]:
    """The vocabulary files in checkpoint directory `path` (empty when it has none, or is not a directory)."""
    if not os.path.isdir(path):
        return []
    return sorted(f for f in os.listdir(path) if f in VOCAB_FILES or f.endswith(".tiktoken"))


def checkpoint_tokenizer(path: str):
    """transformers' tokenizer of `path` if the directory has tokenizer files, else None.

    A directory that has them but fails to load raises, naming the directory: running on without the
    checkpoint's own tokenizer would silently change what the text features mean."""
    if not tokenizer_files(path):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if saved_tokenizer_class(path) in PIPELINE_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - name the directory; transformers' messages rarely do
        raise RuntimeError(f"{path}: has tokenizer files {tokenizer_files(path)} but they do not load "
                           f"({type(exc).__name__}: {exc})") from exc


def saved_tokenizer_class(path: str) -> str | None:
    """The `tokenizer_class` recorded in `path`/tokenizer_config.json (None when absent or unreadable)."""
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
