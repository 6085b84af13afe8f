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


@pytest.mark.parametrize("free_bytes, full", [(1_000, True), (10 * 2**30, False)])
def test_torch_s_unexpected_pos_on_a_full_disk_is_reported_as_no_space_naming_the_file(tmp_path, monkeypatch,
                                                                                      free_bytes, full):
    import errno
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2 * free_bytes, free_bytes, free_bytes))

    def torch_on_a_full_disk(f):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 5137600 vs 5137492")

    target = tmp_path / "checkpoint.pt"
    if full:
        with pytest.raises(OSError) as e:
            atomic_write(target, torch_on_a_full_disk)
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    else:  # plenty of space: a RuntimeError is someone's bug, passed on as it is
        with pytest.raises(RuntimeError, match="unexpected pos"):
            atomic_write(target, torch_on_a_full_disk)
    assert list(tmp_path.iterdir()) == []
