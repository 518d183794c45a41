"""One routine writes every file whole or not at all (specforge.atomic)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from specforge.atomic import TEMP_PREFIX, atomic_path, write_atomically
from specforge.weights import load_weights, save_weights


def test_a_success_replaces_the_old_content(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_atomically(target, '{"new": "é"}')
    assert target.read_text(encoding="utf-8") == '{"new": "é"}'
    write_atomically(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_the_folder_is_made(tmp_path):
    target = tmp_path / "a" / "b" / "script.py"
    write_atomically(target, "print()\n")
    assert target.read_text() == "print()\n"


@pytest.mark.parametrize("old", [None, b"old content"])
def test_a_writer_that_raises_leaves_the_target_and_no_temporary_file(tmp_path, old):
    target = tmp_path / "checkpoint.pt"
    if old is not None:
        target.write_bytes(old)
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of it")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ([] if old is None else ["checkpoint.pt"])
    if old is not None:
        assert target.read_bytes() == old


def test_an_interrupt_also_removes_the_temporary_file(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "x.bin"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_is_next_to_the_target_and_ends_with_its_name(tmp_path):
    target = tmp_path / "checkpoint-000000010.weights.h5"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path  # one filesystem: the rename is atomic
        assert tmp.name.startswith(TEMP_PREFIX)
        assert tmp.name.endswith(".weights.h5")  # as Keras's save_weights insists
        assert tmp.exists() and not target.exists()
        tmp.write_bytes(b"h5")
    assert target.read_bytes() == b"h5"


def test_a_long_name_keeps_its_suffixes(tmp_path):
    target = tmp_path / ("w" * 235 + ".state.npz")  # the name fits, with the prefix not
    with atomic_path(target) as tmp:
        assert len(tmp.name) <= 255 and tmp.name.endswith(".state.npz")
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_np_savez_writes_where_it_is_told(tmp_path):
    """np.savez appends .npz to a name without it: the temporary name ends in .npz."""
    target = tmp_path / "arrays.npz"
    with atomic_path(target) as tmp:
        np.savez(tmp, a=np.arange(3))
    with np.load(target) as data:
        assert data["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["arrays.npz"]


def test_save_weights_to_a_name_without_npz(tmp_path):
    target = tmp_path / "weights.bin"
    save_weights(target, {"dense.kernel": np.ones((2, 3), np.float32)})
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
    assert load_weights(target)["dense.kernel"].shape == (2, 3)


def test_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a built script or run folder file reads like any other file."""
    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "script.py"
    write_atomically(target, "")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
