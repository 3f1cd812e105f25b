"""`data.enable_thinking`: Qwen3's chat-template switch reaches every rendering of a prompt and of a tool turn.

Qwen3's template (the public one, `chat_templates.py`) ends the generation prompt with an empty
`<think>\\n\\n</think>\\n\\n` when `enable_thinking` is false, and with the bare `<|im_start|>assistant\\n` otherwise
(true, or not passed)."""
import pytest

from arpo.config import ConfigError, load_config
from arpo.trainer.data import encode_prompt, prompt_inputs

from chat_templates import qwen_chat_tokenizer

HEADER = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _cfg(*extra):
    return load_config(overrides=["data.chat_template=true", *extra])


@pytest.mark.parametrize("flag,ending", [(None, HEADER), ("true", HEADER), ("false", HEADER + EMPTY_THINK)])
def test_the_flag_changes_the_prompt_as_the_template_says(flag, ending):
    tok = qwen_chat_tokenizer("qwen3")
    cfg = _cfg() if flag is None else _cfg(f"data.enable_thinking={flag}")
    assert cfg.data.enable_thinking == (None if flag is None else flag == "true")
    text = tok.decode(encode_prompt(tok, "hi", cfg.data))
    assert text == "<|im_start|>user\nhi<|im_end|>\n" + ending
    rows = [{"prompt": "hi", "answer": "x", "data_source": "t"}]
    assert prompt_inputs(rows, tok, cfg.data)[0].prompt_ids == encode_prompt(tok, "hi", cfg.data)


def test_serve_and_chat_prompts_and_hermes_tool_turns_carry_the_flag():
    from arpo.build import build_tools
    from arpo.serve.text import chat_prompt_ids

    tok = qwen_chat_tokenizer("qwen3")
    messages = [{"role": "user", "content": "hi"}]
    for flag, ending in (("false", HEADER + EMPTY_THINK), ("true", HEADER)):
        cfg = _cfg(f"data.enable_thinking={flag}", "tools.protocol=hermes", "tools.enabled=[python]")
        tools = build_tools(cfg, tok)
        try:
            served = tok.decode(chat_prompt_ids(tok, messages, cfg.data, tools.protocol))
            assert served.endswith(ending) and '"name": "python"' in served   # the agent prompt
            assert tok.decode(chat_prompt_ids(tok, messages, cfg.data)).endswith(ending)  # a plain chat prompt
            head, tail = tools.protocol.frame                                  # the tool turn resumes the same way
            assert tail == "\n</tool_response><|im_end|>\n" + ending
        finally:
            tools.close()


def test_the_flag_needs_the_chat_template():
    with pytest.raises(ConfigError, match="data.enable_thinking is a chat-template flag: it needs "
                                          "data.chat_template=true"):
        load_config(overrides=["data.chat_template=false", "data.enable_thinking=false"])
