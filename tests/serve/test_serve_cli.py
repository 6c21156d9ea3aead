"""`teleflm serve` wires the model folder, host, port, key and batch size into the app it runs."""

import pytest
from fastapi.testclient import TestClient

from teleflm.cli.main import main


@pytest.fixture
def ran(monkeypatch):
    """What `teleflm serve` hands to uvicorn.run, instead of serving."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
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
