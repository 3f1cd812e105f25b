"""`arpo serve` and `arpo chat`: an OpenAI-compatible HTTP server on one `LLMEngine`, and a terminal chat.

Files, one job each: `settings.py` (server-only settings), `schemas.py` (request/response models),
`engine_loop.py` (the engine process: the loop that owns the engine), `engine_client.py` (the front end's handle
on that process), `agent.py` (tool calls in the loop), `text.py` (prompts in,
streamed text out), `choices.py` (per-choice state), `app.py` + `completions.py` (the endpoints), `errors.py`
(OpenAI error JSON), `server.py` (assembly and uvicorn), `chat.py` (the terminal client).
"""
