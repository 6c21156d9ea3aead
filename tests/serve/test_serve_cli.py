"""`teleflm serve` wires the model folder, host, port, key and batch size into the app it runs."""

import pytest
from fastapi.testclient import TestClient

from teleflm.cli.main import main


@pytest.fixture
def ran(monkeypatch):
    """(app, {"host", "port"}) that `teleflm serve` would serve, recorded instead of serving; the
    command's socket is bound on a free port of the host instead of the one asked for."""
    import uvicorn

    from teleflm.cli import serve

    calls, bind = [], serve.bind

    def bind_free_port(host, port):
        calls.append((None, {"host": host, "port": port}))
        return bind(host, 0)

    def record(server, sockets):
        calls[-1] = (server.config.app, calls[-1][1])
        sockets[0].close()

    monkeypatch.setattr(serve, "bind", bind_free_port)
    monkeypatch.setattr(uvicorn.Server, "run", record)
    return calls


def test_defaults_to_loopback_and_the_folder_name(export_dir, ran, capsys):
    assert main(["serve", "--model", str(export_dir), "--dtype", "fp32"]) == 0
    app, kwargs = ran[0]
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 8000)
    assert app.state.engine.max_batch == 16
    assert "warning" not in capsys.readouterr().out
    http = TestClient(app)  # no lifespan: the engine's thread is not needed for /v1/models
    assert http.get("/v1/models").json()["data"][0]["id"] == export_dir.name


def test_key_name_and_batch_size(export_dir, ran, capsys):
    command = ["serve", "--model", str(export_dir), "--host", "0.0.0.0", "--port", "9001", "--max-batch", "4"]
    assert main([*command, "--api-key", "k", "--served-model-name", "flm"]) == 0
    app, kwargs = ran[0]
    assert (kwargs["host"], kwargs["port"], app.state.engine.max_batch) == ("0.0.0.0", 9001, 4)
    http = TestClient(app)
    assert http.get("/v1/models").status_code == 401
    models = http.get("/v1/models", headers={"Authorization": "Bearer k"}).json()
    assert models["data"][0]["id"] == "flm"
    assert "warning" not in capsys.readouterr().out


def test_warns_when_reachable_without_a_key(export_dir, ran, capsys):
    assert main(["serve", "--model", str(export_dir), "--host", "0.0.0.0"]) == 0
    assert "without --api-key" in capsys.readouterr().out


def test_refuses_an_empty_batch(export_dir, ran, capsys):
    assert main(["serve", "--model", str(export_dir), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err and not ran


def test_port_in_use_is_reported_before_the_model_loads(export_dir, monkeypatch, capsys):
    import socket

    from teleflm.train import checkpoint

    loaded = []
    monkeypatch.setattr(checkpoint, "load_any_model", lambda *a, **k: loaded.append(a))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(export_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err
    assert loaded == []
