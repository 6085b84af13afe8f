"""Atomic writes: a crash mid-write leaves the previous file whole and no temp file behind."""

from __future__ import annotations

import pytest
import torch

from pipeline.fileio import atomic_torch_save, atomic_write, atomic_write_json


class _Crash(Exception):
    pass


def test_a_crash_mid_write_keeps_the_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save({"w": torch.arange(3)}, target)

    def half_then_crash(f):
        f.write(b"partial bytes of a new checkpoint")
        raise _Crash

    with pytest.raises(_Crash):
        atomic_write(target, half_then_crash)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_json_round_trip_and_parent_directories_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "result.json"
    atomic_write_json({"status": "finished"}, target)
    assert target.read_text() == '{\n  "status": "finished"\n}\n'
