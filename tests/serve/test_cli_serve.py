"""`arpo serve` / `arpo chat` on the command line: bad settings and tool names are refused by name (exit 2)."""
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import serve_helpers as H  # noqa: E402

from arpo.cli import main  # noqa: E402


def test_serve_refuses_a_port_out_of_range(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "serve.port=70000: must be <= 65535" in capsys.readouterr().err


def test_serve_and_chat_name_an_unknown_tool(tmp_path, capsys):
    ckpt = H.make_checkpoint(str(tmp_path))
    for cmd in ("serve", "chat"):
        assert main([cmd, ckpt, *H.OVERRIDES, "--tools", "pyton"]) == 2
        err = capsys.readouterr().err
        assert "'pyton'" in err and "did you mean 'python'" in err, err


def test_chat_refuses_a_bad_temperature_and_a_missing_checkpoint(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert main(["chat", str(tmp_path), "--temperature", "3"]) == 2
    assert "chat.temperature=3.0: must be <= 2" in capsys.readouterr().err
