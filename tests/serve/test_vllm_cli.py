"""`teleflm serve --engine vllm`: the command it hands vLLM, and clear refusals. (vLLM itself runs in
scripts/vllm_check.sh, in an environment of its own.)"""

import socket
import sys

import pytest

from teleflm.cli.main import main


def test_vllm_gets_the_serve_options(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    python = tmp_path / "python"
    python.write_text("")
    calls = []
    monkeypatch.setattr("subprocess.call", lambda command: calls.append(command) or 0)
    args = ["serve", "--model", str(tmp_path / "m"), "--engine", "vllm", "--vllm-python", str(python)]
    args += ["--port", "0", "--api-key", "k", "--max-batch", "8", "--dtype", "bf16", "--"]
    assert main([*args, "--enforce-eager", "--max-model-len", "256"]) == 0
    (command,) = calls
    assert command[:3] == [str(python), "-m", "vllm.entrypoints.openai.api_server"]

    def value(flag):
        return command[command.index(flag) + 1]

    assert value("--model") == str(tmp_path / "m") and value("--served-model-name") == "m"
    assert value("--max-num-seqs") == "8" and value("--dtype") == "bfloat16" and value("--api-key") == "k"
    assert "--trust-remote-code" in command and command[-3:] == ["--enforce-eager", "--max-model-len", "256"]


def test_refusals_name_what_is_wrong(tmp_path, capsys, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    base = ["serve", "--model", str(tmp_path / "m"), "--engine", "vllm", "--port", "0"]
    if "vllm" not in sys.modules:
        monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
        assert main(base) == 2
        assert "vllm is not installed here: give --vllm-python" in capsys.readouterr().err
    assert main([*base, "--vllm-python", str(tmp_path / "nope")]) == 2
    assert "--vllm-python" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--engine", "vllm"]) == 2
    assert "serves an export" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr("subprocess.call", lambda command: pytest.fail("vLLM started on a taken port"))
        assert main([*base[:-1], str(port), "--vllm-python", sys.executable]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
