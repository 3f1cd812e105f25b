"""A policy that writes a fixed token script: at position p it puts all its mass on `script[p + 1]`.

The hermes tests need a model that writes exact tool calls (JSON, chat-template markup) three times in a row —
no bigram can, the same contexts recur. This one ignores what it is fed and reads the position, so a rollout's
tokens equal the script only when every token the rollout appends itself (prompt, tool turns) sits where the
script has it: a wrong or extra token shifts the positions and the output visibly diverges. A *missing* appended
token the model writes itself (it is next in the script), so tests also check which tokens were given (loss mask
0) against the template's text. It runs
through the real engine (paged cache allocated, scheduler, sampler, stop strings, extend, fork); the cache is
simply never read.
"""
import torch

from arpo.engine import LLMEngine
from arpo.model import CausalLM, ModelConfig


class ScriptedModel(CausalLM):
    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__(ModelConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                     tie_word_embeddings=False, max_position_embeddings=4096))
        self.script = torch.tensor(script, dtype=torch.long)
        self.eval()

    def forward(self, input_ids, position_ids, ctx=None):
        return position_ids.to(torch.float32)[:, None].expand(-1, self.config.hidden_size).contiguous()

    def compute_logits(self, hidden):
        nxt = self.script[(hidden[:, 0].round().long() + 1).clamp(max=len(self.script) - 1)]
        logits = torch.full((hidden.shape[0], self.config.vocab_size), -40.0)
        logits[torch.arange(hidden.shape[0]), nxt] = 40.0
        return logits


def scripted_engine(tokenizer, script: list[int]) -> LLMEngine:
    model = ScriptedModel(len(tokenizer), script)
    return LLMEngine(model, tokenizer=tokenizer, num_blocks=256, block_size=8, max_model_len=2048,
                     decode_graphs="off")


class TurnScriptedModel(ScriptedModel):
    """Writes assistant turn k's tokens after the k-th assistant header it was fed, whatever stood in between.

    For rollouts whose tool results are not known in advance (an MCP server that dies, an error message): it
    keeps the tokens it was fed (one sequence only: use `leaves=1`, `prefix_mode="resubmit"`), finds the last
    `header` (the chat template's `<|im_start|>assistant\\n`) and writes that turn from the start."""

    def __init__(self, vocab_size: int, turns: list[list[int]], header: list[int]):
        super().__init__(vocab_size, [0])
        self.turns, self.header, self.fed = turns, header, []

    def forward(self, input_ids, position_ids, ctx=None):
        self.fed += input_ids.tolist()
        return super().forward(input_ids, position_ids, ctx)

    def compute_logits(self, hidden):
        h, ends = len(self.header), []
        for i in range(len(self.fed) - h + 1):
            if self.fed[i:i + h] == self.header:
                ends.append(i + h)
        turn = self.turns[min(len(ends), len(self.turns)) - 1]
        nxt = turn[min(len(self.fed) - ends[-1], len(turn) - 1)]
        logits = torch.full((hidden.shape[0], self.config.vocab_size), -40.0)
        logits[:, nxt] = 40.0
        return logits


def turn_scripted_engine(tokenizer, turns: list[list[int]], header: list[int]) -> LLMEngine:
    model = TurnScriptedModel(len(tokenizer), turns, header)
    return LLMEngine(model, tokenizer=tokenizer, num_blocks=256, block_size=8, max_model_len=2048,
                     decode_graphs="off")
