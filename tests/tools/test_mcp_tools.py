"""MCP tools (`tools.mcp_servers`) through the official SDK: a tiny stdio server written here with the SDK's
server helper, its tools under the hermes protocol, a server that dies or hangs mid-rollout (error results, a
restarted server, a rollout that goes on)."""
import json
import os
import signal
import sys
import textwrap

import pytest

pytest.importorskip("mcp")

from arpo.build import build_tools  # noqa: E402
from arpo.config import ConfigError, load_config  # noqa: E402
from arpo.rollout import RolloutConfig, TreeRollout  # noqa: E402
from arpo.rollout.prompts import PromptInput  # noqa: E402
from arpo.tools.mcp import McpServer, McpTool  # noqa: E402

from chat_templates import qwen_chat_tokenizer  # noqa: E402
from scripted_policy import turn_scripted_engine  # noqa: E402

SERVER = textwrap.dedent('''
    import os, sys, time
    try:
        from mcp.server.mcpserver import MCPServer as Server  # mcp >= 2
    except ImportError:
        from mcp.server.fastmcp import FastMCP as Server  # mcp 1.x

    app = Server("calc", log_level="WARNING")

    @app.tool()
    def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    @app.tool()
    def pid() -> str:
        """The server's process id."""
        return str(os.getpid())

    @app.tool()
    def die() -> str:
        """Exit at once, answering nothing."""
        os._exit(3)

    @app.tool()
    def hang() -> str:
        """Never answer."""
        time.sleep(3600)
        return "woke"

    @app.tool()
    def fail(why: str) -> str:
        """Raise an error."""
        raise ValueError(why)

    app.run()
''')
CALL_TIMEOUT_S = 5.0  # the hang test's deadline; the other calls answer in milliseconds
HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("mcp") / "calc_server.py"
    path.write_text(SERVER)
    return str(path)


def _config(server_script, name="calc"):
    """A hermes run's config with the test server, given as a command-line override would give it."""
    servers = json.dumps([{"name": name, "command": sys.executable, "args": [server_script]}])
    return load_config(overrides=["tools.protocol=hermes", "tools.enabled=[search]", "data.chat_template=true",
                                  f"tools.mcp_timeout_s={CALL_TIMEOUT_S}", f"tools.mcp_servers={servers}"])


def _tools(server_script, tok):
    return build_tools(_config(server_script), tok)


def _call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_mcp_tools_join_the_builtins_under_hermes(server_script):
    tok = qwen_chat_tokenizer("qwen2.5")
    with _tools(server_script, tok) as ex:
        names = [s["function"]["name"] for s in ex.protocol.schemas]
        assert names == ["search", "add", "pid", "die", "hang", "fail"]
        add = next(s for s in ex.protocol.schemas if s["function"]["name"] == "add")["function"]
        assert add["description"] == "Add two integers." and add["parameters"]["required"] == ["a", "b"]
        assert '"name": "add"' in tok.decode(ex.protocol.render_prompt(tok, [{"role": "user", "content": "hi"}]))
        results = ex.run_many([ex.parse(_call("add", a=2, b=3)), ex.parse(_call("search", query="Paris")),
                               ex.parse(_call("fail", why="bad input")), ex.parse(_call("add", a=1))])
        assert results[0].ok and results[0].text == "5" and results[1].ok
        assert not results[2].ok and "fail" in results[2].text  # isError: the SDK says which tool failed
        assert not results[3].ok and results[3].text.startswith("Error")  # the server rejects a missing argument


def test_a_server_killed_from_outside_is_restarted(server_script):
    server = McpServer("calc", sys.executable, [server_script], call_timeout_s=CALL_TIMEOUT_S)
    try:
        tool = McpTool(server, next(s for s in server.tools if s.name == "pid"))
        first = tool.run("{}")
        assert first.ok
        os.kill(int(first.text), signal.SIGKILL)
        dead = tool.run("{}")
        assert not dead.ok and "MCP server 'calc'" in dead.text and "restarted" in dead.text
        again = tool.run("{}")
        assert again.ok and again.text != first.text and server.restarts == 1
    finally:
        server.close()


def _turns(tok, *texts):
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def _rollout(tok, tools, turns):
    engine = turn_scripted_engine(tok, turns, tok.encode(HEADER, add_special_tokens=False))
    prompt = tools.protocol.render_prompt(tok, [{"role": "user", "content": "compute"}])
    cfg = RolloutConfig(mode="trajectory", leaves=1, initial=1, max_tool_calls=3, max_response_tokens=1500,
                        prefix_mode="resubmit")
    return TreeRollout(engine, tools, cfg, tokenizer=tok).run([PromptInput(prompt, "compute")]).trees[0]


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_a_server_that_dies_or_hangs_mid_rollout_gives_an_error_and_comes_back(server_script, fault):
    tok = qwen_chat_tokenizer("qwen3")
    with _tools(server_script, tok) as tools:
        turns = _turns(tok, _call("add", a=2, b=3), _call(fault), _call("add", a=4, b=5),
                       "<answer>\\boxed{9}</answer><|im_end|>")
        tree = _rollout(tok, tools, turns)
        leaf = tree.leaves[0]
        assert leaf.tool_calls == 3 and leaf.finish_reason == "stop"
        assert leaf.metadata["tool_ok"] == [True, False, True]
        text = tok.decode(tree.leaf_token_ids(leaf))
        responses = [part.split("\n</tool_response>")[0] for part in text.split("<tool_response>\n")[1:]]
        assert responses[0] == "5" and responses[2] == "9"
        why = "did not answer within 5 s" if fault == "hang" else "failed"
        assert responses[1].startswith(f"Error: MCP server 'calc' {why}")
        assert text.endswith("<answer>\\boxed{9}</answer><|im_end|>")
        assert tools.tools["add"].server.restarts == 1


def test_mcp_servers_need_hermes_and_a_starting_server(server_script):
    from arpo.tools.config import McpServerConfig, ToolsConfig

    with pytest.raises(ConfigError, match="needs tools.protocol=hermes"):
        ToolsConfig(mcp_servers=[McpServerConfig(name="calc", command=sys.executable, args=[server_script])])
    cfg = _config(server_script)
    cfg.tools.mcp_servers = [McpServerConfig(name="broken", command=sys.executable, args=["-c", "raise SystemExit(1)"])]
    with pytest.raises(ConfigError, match="MCP server 'broken'.*did not start"):
        build_tools(cfg, qwen_chat_tokenizer("qwen2.5"))
