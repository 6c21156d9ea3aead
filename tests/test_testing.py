"""The rank runner (`teleflm.testing.run_ranks`): a rank sees the caller's environment and working
folder as they are at the call, also when forked from a server started before they changed."""

import os

import torch.distributed as dist

from teleflm.testing import run_ranks


def what_a_rank_sees() -> tuple:
    return dist.get_rank(), os.environ.get("TELEFLM_RANK_TEST"), os.getcwd()


def test_forked_ranks_see_the_callers_environment_and_folder(tmp_path, monkeypatch):
    run_ranks(2, what_a_rank_sees)  # the fork server starts (if it has not) before the change
    monkeypatch.setenv("TELEFLM_RANK_TEST", "set after the server started")
    monkeypatch.chdir(tmp_path)
    seen = run_ranks(2, what_a_rank_sees)
    assert seen == [(rank, "set after the server started", str(tmp_path)) for rank in range(2)]
