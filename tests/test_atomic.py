"""Atomic writes (`svdiff_adapter.atomic`): a killed writer never leaves a partial file under the target's name,
and the temporary files of killed writers are cleaned up by the next write."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from svdiff_adapter.atomic import atomic_save_safetensors, remove_stale_temporaries

_KILLED_WRITER = """
import sys, time
from svdiff_adapter.atomic import atomic_write

def write(temporary):
    with open(temporary, "wb") as handle:
        handle.write(b"half a file")
        handle.flush()
    print("written", flush=True)
    time.sleep(600)  # killed here, between the write and the rename

atomic_write(sys.argv[1], write)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "shift.safetensors"
    atomic_save_safetensors({"x": torch.arange(4.0)}, target)
    before = target.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(60)
    assert target.read_bytes() == before  # the old file, whole
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].read_bytes() == b"half a file"
    atomic_save_safetensors({"x": torch.arange(5.0)}, target)  # the next write in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert torch.equal(load_file(target)["x"], torch.arange(5.0))


def test_temporaries_of_live_writers_are_kept(tmp_path):
    mine = tmp_path / f".shift.safetensors.pid{os.getpid()}.abc.tmp"
    mine.write_bytes(b"in progress")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        theirs = tmp_path / f".shift.safetensors.pid{sleeper.pid}.def.tmp"
        theirs.write_bytes(b"in progress")
        assert remove_stale_temporaries(tmp_path) == []
        assert mine.exists() and theirs.exists()
    finally:
        sleeper.kill()
        sleeper.wait(60)  # reaped: its pid is gone
    assert remove_stale_temporaries(tmp_path) == [theirs]
    assert not theirs.exists() and mine.exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "shift.safetensors"
    atomic_save_safetensors({"x": torch.arange(4.0)}, target)
    before = target.read_bytes()

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("svdiff_adapter.atomic.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_save_safetensors({"x": torch.arange(5.0)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
