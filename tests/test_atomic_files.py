"""atomic_write: whole or untouched, never through a symlink, no leftovers, the permissions of a plain open."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from fila_cli.atomic_files import atomic_path, atomic_write, write_bytes_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.json"]


def test_planted_symlinks_are_neither_followed_nor_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    # The names fila used before were predictable; plant links under every such guess.
    for guess in ("out.json.partial", f".out.json.{os.getpid()}.partial", "out.partial"):
        (tmp_path / guess).symlink_to(victim)
    target = tmp_path / "out.json"
    target.symlink_to(victim)  # a link at the destination itself is replaced, not followed
    write_bytes_atomically(target, b"new")
    assert victim.read_bytes() == b"precious"
    assert not target.is_symlink() and target.read_bytes() == b"new"


def test_a_name_writer_whose_file_became_a_symlink_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out.bin"
    with pytest.raises(OSError), atomic_path(target) as temporary:
        temporary.unlink()
        temporary.symlink_to(victim)
    assert not target.exists() and victim.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["victim"]


def test_temporary_names_are_unique_and_permissions_are_a_plain_opens(tmp_path):
    from safetensors.numpy import load_file, save_file

    seen = set()
    for _ in range(3):
        with atomic_path(tmp_path / "tokens.safetensors") as temporary:
            seen.add(temporary.name)
            save_file({"x": np.arange(3, dtype=np.float32)}, str(temporary))  # safetensors renames its own temp file
    assert len(seen) == 3
    assert load_file(str(tmp_path / "tokens.safetensors"))["x"].tolist() == [0, 1, 2]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "tokens.safetensors").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert sorted(os.listdir(tmp_path)) == ["plain", "tokens.safetensors"]
