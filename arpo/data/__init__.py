"""Datasets: JSONL loading, the embedded tasks (questions, demonstrations, corpora) and their tokenizers."""
from arpo.data.char_tokenizer import VOCAB, build_char_tokenizer, load_embedded_tokenizer
from arpo.data.embedded import (ARITH, LOOKUP, Example, arith_examples, demo_segments, demo_text,
                                embedded_examples, embedded_search_tool, lookup_examples, split_of)
from arpo.data.tasks import task_demo_segments, task_examples, task_tokenizer
from arpo.data.world import AGENT_CORPUS_PATH, CORPUS_PATH

__all__ = ["VOCAB", "build_char_tokenizer", "load_embedded_tokenizer", "ARITH", "LOOKUP", "Example",
           "arith_examples", "demo_segments", "demo_text", "embedded_examples", "embedded_search_tool",
           "lookup_examples", "split_of", "task_demo_segments", "task_examples", "task_tokenizer",
           "AGENT_CORPUS_PATH", "CORPUS_PATH"]
