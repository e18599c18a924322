"""Atomic checkpoint export: symbolic links in the way, best-effort cleanup, durable renames, and a monitor
putting back what a crash between the renames left."""
from __future__ import annotations

import os
import shutil
import warnings

import pytest

from lora_monitor import export as exporting

WEIGHTS = "pytorch_lora_weights.safetensors"


def writer(content: bytes):
    def write(folder):
        (folder / WEIGHTS).write_bytes(content)

    return write


def export(folder, content: bytes, epoch: int):
    return exporting.export_checkpoint(folder, writer(content), {"epoch": epoch})


@pytest.fixture
def outside(tmp_path):
    """A folder outside the output folder that a user's symbolic link points at, with content to protect."""
    target = tmp_path / "elsewhere" / "keep"
    target.mkdir(parents=True)
    (target / WEIGHTS).write_bytes(b"user data")
    (target / "notes.txt").write_text("do not delete")
    return target


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_new_best(best, content, epoch):
    assert best.is_dir() and not best.is_symlink()
    assert (best / WEIGHTS).read_bytes() == content
    assert exporting.read_sidecar(best)["epoch"] == epoch


def no_leftovers(out):
    return not (out / "best.previous").exists() and not (out / "best.previous").is_symlink() \
        and not list(out.glob(".best.tmp-*"))


def test_best_a_symlink_is_replaced_and_its_target_untouched(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(outside)
    (out / "best").symlink_to(outside, target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(out / "best", b"new weights", 1)
    assert_new_best(out / "best", b"new weights", 1)
    assert snapshot(outside) == before
    assert no_leftovers(out)
    export(out / "best", b"newer weights", 2)  # and the next export works too
    assert_new_best(out / "best", b"newer weights", 2)
    assert snapshot(outside) == before


def test_best_previous_a_symlink_is_removed_not_followed(tmp_path, outside):
    out = tmp_path / "out"
    export(out / "best", b"old", 1)
    before = snapshot(outside)
    (out / "best.previous").symlink_to(outside, target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(out / "best", b"new", 2)
    assert_new_best(out / "best", b"new", 2)
    assert snapshot(outside) == before
    assert no_leftovers(out)


def test_recover_puts_back_a_best_symlink_moved_to_previous(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(outside)
    (out / "best.previous").symlink_to(outside, target_is_directory=True)  # crash between the renames
    exporting.recover(out / "best")
    assert (out / "best").is_symlink() and os.readlink(out / "best") == str(outside)
    assert not os.path.lexists(out / "best.previous")
    assert snapshot(outside) == before


@pytest.mark.parametrize("name", ["best", "best.previous"])
def test_dangling_symlink_in_the_way(tmp_path, name):
    out = tmp_path / "out"
    if name == "best.previous":
        export(out / "best", b"old", 1)
    out.mkdir(exist_ok=True)
    (out / name).symlink_to(tmp_path / "gone", target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export(out / "best", b"new", 2)
    assert_new_best(out / "best", b"new", 2)
    assert no_leftovers(out)
    assert not (tmp_path / "gone").exists()


def test_stale_temp_symlink_is_removed_not_followed(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(outside)
    (out / ".best.tmp-stale").symlink_to(outside, target_is_directory=True)
    export(out / "best", b"new", 1)
    assert_new_best(out / "best", b"new", 1)
    assert snapshot(outside) == before and no_leftovers(out)


def test_remove_checkpoint_of_a_symlink_leaves_its_target(tmp_path, outside):
    out = tmp_path / "out" / "top"
    out.mkdir(parents=True)
    before = snapshot(outside)
    (out / "epoch-0001").symlink_to(outside, target_is_directory=True)
    exporting.remove_checkpoint(out / "epoch-0001")
    assert not os.path.lexists(out / "epoch-0001")
    assert snapshot(outside) == before
    assert list(out.iterdir()) == []


def test_remove_checkpoint_removes_a_real_folder(tmp_path):
    top = tmp_path / "top"
    export(top / "epoch-0001", b"w", 1)
    exporting.remove_checkpoint(top / "epoch-0001")
    assert list(top.iterdir()) == []


def test_cleanup_failure_after_the_swap_warns_and_export_succeeds(tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(out / "best", b"old", 1)
    real_rmtree = shutil.rmtree

    def failing_rmtree(path, *args, **kwargs):
        if "best.previous" in str(path):
            raise OSError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with pytest.warns(RuntimeWarning, match=r"could not remove .*best\.previous.*Permission denied") as record:
        result = export(out / "best", b"new", 2)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert result == out / "best"
    assert_new_best(out / "best", b"new", 2)

    # The leftover does not block later exports (it is set aside), and once removal works it goes away.
    with pytest.warns(RuntimeWarning, match="could not remove"):
        export(out / "best", b"newer", 3)
    assert_new_best(out / "best", b"newer", 3)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    export(out / "best", b"newest", 4)
    assert_new_best(out / "best", b"newest", 4)
    assert no_leftovers(out)


def test_stale_temp_cleanup_failure_warns(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / ".best.tmp-stale").mkdir(parents=True)
    real_rmtree = shutil.rmtree

    def failing_rmtree(path, *args, **kwargs):
        if ".best.tmp-stale" in str(path):
            raise OSError(16, "Device or resource busy", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_rmtree)
    with pytest.warns(RuntimeWarning, match=r"\.best\.tmp-stale.*busy"):
        export(out / "best", b"new", 1)
    assert_new_best(out / "best", b"new", 1)


def test_export_fsyncs_the_parent_folder_after_the_renames(tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(out / "best", b"old", 1)
    parent = os.stat(out)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        info = os.fstat(fd)
        # record what was fsynced, and whether the swap had already happened at that moment
        synced.append(((info.st_dev, info.st_ino), (out / "best" / WEIGHTS).read_bytes()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    export(out / "best", b"new", 2)
    parent_syncs = [content for key, content in synced if key == (parent.st_dev, parent.st_ino)]
    assert parent_syncs, "the output folder holding best/ was never fsynced"
    assert b"new" in parent_syncs  # fsynced after the new best/ was renamed into place
    assert_new_best(out / "best", b"new", 2)


def test_fsync_dir_is_skipped_where_folders_cannot_be_opened(tmp_path, monkeypatch):
    def no_dir_open(path, flags, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", no_dir_open)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exporting._fsync_dir(tmp_path)  # no error, no warning


def test_fsync_dir_unsupported_is_silent(tmp_path, monkeypatch):
    def unsupported(fd):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "fsync", unsupported)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exporting._fsync_dir(tmp_path)


# --- a monitor puts back what a crash during an export left, when it is built and when its state is loaded ---------
def monitor_on(output_dir):
    import torch

    from lora_monitor.monitor import LoraMonitor
    from lora_monitor.spec import PreviewSpec

    class Brightness:
        name, higher_is_better, needs_reference = "brightness", True, False

        def __call__(self, images, reference=None):
            return images.mean(dim=(1, 2, 3))

    spec = PreviewSpec.from_prompts(["a", "b"], width=16, height=16)
    monitor = LoraMonitor(
        spec=spec, output_dir=output_dir, metrics=None, scorers=[Brightness()], metric="brightness", top_k=2, write_weights=writer(b"w")
    )
    return monitor, [torch.full((3, 16, 16), 0.5)] * 2


def crash_between_the_renames(folder, content: bytes, epoch: int) -> None:
    """What export_checkpoint leaves when the process dies after old -> .previous and before new -> folder."""
    export(folder, content, epoch)
    new = folder.parent / f".{folder.name}.tmp-crashed"
    new.mkdir()
    (new / WEIGHTS).write_bytes(b"half written")
    folder.rename(folder.with_name(folder.name + ".previous"))


def test_building_a_monitor_puts_best_back_after_a_crash_between_the_renames(tmp_path):
    out = tmp_path / "out"
    crash_between_the_renames(out / "best", b"epoch 3 weights", 3)
    crash_between_the_renames(out / "top_k" / "epoch-0002", b"epoch 2 weights", 2)
    assert not (out / "best").exists()
    monitor_on(out)
    assert_new_best(out / "best", b"epoch 3 weights", 3)
    assert (out / "top_k" / "epoch-0002" / WEIGHTS).read_bytes() == b"epoch 2 weights"
    assert no_leftovers(out) and sorted(p.name for p in (out / "top_k").iterdir()) == ["epoch-0002"]


def test_loading_a_monitor_state_puts_best_back(tmp_path):
    out = tmp_path / "out"
    monitor, images = monitor_on(out)
    monitor.evaluate(1, images)
    state = monitor.state_dict()
    resumed, _ = monitor_on(out)
    crash_between_the_renames(out / "best", b"epoch 1 weights", 1)  # the layout shows up after the build: load_state_dict sees it
    resumed.load_state_dict(state)
    assert_new_best(out / "best", b"epoch 1 weights", 1)
    assert no_leftovers(out)
