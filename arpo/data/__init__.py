"""Datasets: JSONL loading, the embedded default task (questions, demonstrations, corpus) and its tokenizer."""
from arpo.data.char_tokenizer import VOCAB, build_char_tokenizer, load_embedded_tokenizer
from arpo.data.embedded import (ARITH, LOOKUP, Example, arith_examples, demo_segments, demo_text,
                                embedded_examples, embedded_search_tool, lookup_examples, split_of)
from arpo.data.world import CORPUS_PATH

__all__ = ["VOCAB", "build_char_tokenizer", "load_embedded_tokenizer", "ARITH", "LOOKUP", "Example",
           "arith_examples", "demo_segments", "demo_text", "embedded_examples", "embedded_search_tool",
           "lookup_examples", "split_of", "CORPUS_PATH"]
