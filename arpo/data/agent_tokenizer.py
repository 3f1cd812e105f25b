"""The word-level tokenizer of the agent task, as a Hugging Face `tokenizer.json` built with `tokenizers`.

A search result of the agent task is two passages (~170 characters each): over characters a three-call trace is
~900 tokens, over words ~250. Pieces are split by one regex — a tag (`<search>`, ` <result>`), a word with its
leading space (` bramwick`), a single digit with or without a space (numbers are spelt digit by digit, so the
model can copy any number a tool prints), or any other single character — and a Fuse decoder joins them with
nothing in between, so decoding gives back the exact text (tool calls and stop strings are found in decoded
text). The vocabulary is every piece of every prompt, corpus passage and gold trace of the task
(`arpo.data.agent.all_agent_texts`), plus digits and single letters; anything else (a capital in a traceback)
is `<unk>`. Special tokens: `<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3, as in the character tokenizer.

`python -m arpo.data.agent_tokenizer` rewrites `arpo/data/embedded/agent_tokenizer.json`; a test checks the file
matches this builder.
"""
from __future__ import annotations

import os
import re
import string

from arpo.data.char_tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK

PIECE = r" ?</?[a-z]+>| ?[a-z]+| ?[0-9]|\n|."
AGENT_TOKENIZER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded", "agent_tokenizer.json")


def pieces(text: str) -> list[str]:
    """The pieces the tokenizer's pre-tokenizer cuts `text` into (the same regex)."""
    return re.findall(PIECE, text, flags=re.S)


def agent_vocab() -> list[str]:
    """Special tokens, then the sorted pieces of the task's texts, digits, letters and printable characters."""
    from arpo.data.agent import all_agent_texts

    found = {p for text in all_agent_texts() for p in pieces(text)}
    base = set(string.digits) | {" " + d for d in string.digits} | set(string.ascii_lowercase)
    base |= {" " + c for c in string.ascii_lowercase} | set(string.punctuation) | {" ", "\n"}
    return SPECIAL_TOKENS + sorted(found | base)


def build_agent_tokenizer():
    """A `tokenizers.Tokenizer`: WordLevel over `agent_vocab()`, regex pre-tokenizer, Fuse decoder."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(agent_vocab())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def load_agent_tokenizer(path: str = AGENT_TOKENIZER_PATH):
    """The bundled agent tokenizer as a `transformers.PreTrainedTokenizerFast` with pad/bos/eos/unk set."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path} (run `python -m arpo.data.agent_tokenizer`)")
    return PreTrainedTokenizerFast(tokenizer_file=path, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK)


if __name__ == "__main__":
    tok = build_agent_tokenizer()
    tok.save(AGENT_TOKENIZER_PATH)
    print(f"wrote {tok.get_vocab_size()}-token tokenizer to {AGENT_TOKENIZER_PATH}")
