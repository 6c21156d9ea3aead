"""Coordinate check (SPEC section 2): activation sizes flat in width under muP, growing under SP;
flat in depth with CompleteP's residual scaling, the residual stream growing without it."""

from pathlib import Path

import pytest

from teleflm.cli.main import main
from teleflm.config import read_toml
from teleflm.tune.coord_check import coord_check, passes, write_report

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mup" / "coord-check.toml"
WIDTHS = [64, 128, 256, 512]
DEPTHS = [2, 4, 8, 16]
TOLERANCE = 0.25  # |slope of log size vs log width|; SP's logits grow at ~+1, its blocks at ~+3


@pytest.fixture(scope="module")
def result():
    return coord_check(read_toml(CONFIG), WIDTHS, steps=10, batch_size=4, seq_len=32)


@pytest.fixture(scope="module")
def depth_result():
    return coord_check(read_toml(CONFIG), DEPTHS, steps=10, batch_size=4, seq_len=32, axis="depth")


def test_mup_sizes_are_flat_in_width(result):
    slopes = {q: result.slope("muP", q) for q in result.quantities()}
    layers = {f"layer{i}.{m}" for i in (0, 1) for m in ("attn", "mlp")}
    assert set(slopes) == {"embedding", "residual", "logits"} | layers
    assert all(abs(s) <= TOLERANCE for s in slopes.values()), slopes


def test_complete_p_sizes_are_flat_in_depth_and_width_only_mup_grows(depth_result):
    """2 -> 16 layers at the proxy's width: with each branch x 2 / depth every size stays flat; with
    width-only muP the residual stream grows (measured: about depth^1.9)."""
    slopes = {q: depth_result.slope("CompleteP", q) for q in depth_result.quantities()}
    assert set(slopes) == {"embedding", "attn", "mlp", "residual", "logits"}
    assert all(abs(s) <= TOLERANCE for s in slopes.values()), slopes
    assert depth_result.slope("muP", "residual") > 1.0
    assert passes(depth_result, TOLERANCE)


def test_sp_logits_and_blocks_grow_with_width(result):
    assert result.slope("SP", "logits") > 0.5
    assert all(result.slope("SP", f"layer{i}.mlp") > 1.0 for i in (0, 1))
    assert passes(result, TOLERANCE)


def test_report_has_a_verdict_per_quantity_and_a_png_per_axis(result, depth_result, tmp_path):
    report = write_report([result, depth_result], tmp_path, TOLERANCE, str(CONFIG)).read_text()
    assert "| muP | logits |" in report and "| SP | logits |" in report and "growing" in report
    assert "## Over depth" in report and "| CompleteP | residual |" in report
    assert (tmp_path / "coord_check.png").stat().st_size > 10_000
    assert (tmp_path / "coord_check_depth.png").stat().st_size > 10_000


def test_cli_refuses_bad_widths(capsys):
    assert main(["mup", "coord-check", "--config", str(CONFIG), "--widths", "128,64"]) == 2
    assert "at least two increasing widths" in capsys.readouterr().err
    assert main(["mup", "coord-check", "--config", str(CONFIG), "--depths", "4"]) == 2
    assert "at least two increasing depths" in capsys.readouterr().err
