"""Several processes: previews split across ranks, gathered, one decision; a failing rank ends the run.

The multi-process tests launch tests/distributed_run.py on 2 CPU processes over gloo
(`accelerate launch --multi_gpu` with Accelerator(cpu=True) in the script; `--cpu` would run a
single process) and compare with the same run in one process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_run  # tests/ is on sys.path, as for conftest
import pytest
import torch

from lora_monitor.distributed import RankFailedError, all_gather_checked, assemble, broadcast_checked, gather_images, shard_indices
from lora_monitor.monitor import LoraMonitor
from lora_monitor.spec import PreviewPrompt, PreviewSpec

Brightness = distributed_run.Brightness

TESTS = Path(__file__).parent
SCRIPT = TESTS / "distributed_run.py"
LAUNCH_TIMEOUT_S = 240  # a guard: a hang fails the test instead of the suite


# ----------------------------------------------------------------- sharding and assembly (no processes)
def spec_of(sizes: list[int]) -> PreviewSpec:
    return PreviewSpec([PreviewPrompt(f"prompt {i}", seed=i, width=size, height=size) for i, size in enumerate(sizes)])


@pytest.mark.parametrize("sizes", [[64] * 4, [64] * 5, [64, 64, 32, 32, 32, 64, 32], [64], [64] * 8])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_preview_once_and_balance(sizes, world_size):
    spec = spec_of(sizes)
    shards = [shard_indices(spec, rank, world_size) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(len(spec)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for shard in shards:  # within a group of same-size prompts a rank's share is one contiguous run
        for group in spec.batches(len(spec)):
            positions = [group.index(i) for i in shard if i in group]
            assert positions == list(range(positions[0], positions[0] + len(positions))) if positions else True


def test_shards_keep_batches_full():
    spec = spec_of([64] * 8)
    assert shard_indices(spec, 0, 2) == [0, 1, 2, 3] and shard_indices(spec, 1, 2) == [4, 5, 6, 7]
    assert shard_indices(spec_of([64]), 1, 2) == []  # more ranks than prompts: some render nothing


def test_shard_indices_rejects_bad_ranks():
    with pytest.raises(ValueError, match="rank must be in 0..1, got 2"):
        shard_indices(spec_of([64] * 2), 2, 2)
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        shard_indices(spec_of([64] * 2), 0, 0)


def test_assemble_puts_kohya_round_robin_shares_back_in_order_and_names_gaps():
    assert assemble([([0, 2, 4], ["a", "c", "e"]), ([1, 3], ["b", "d"])], 5) == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match=r"missing \[3\], sent more than once \[2\]"):
        assemble([([0, 2], ["a", "c"]), ([1, 2], ["b", "c"])], 4)
    with pytest.raises(ValueError, match="rank 1 sent preview index 7"):
        assemble([([0], ["a"]), ([7], ["b"])], 2)


def test_one_process_needs_no_torch_distributed_and_keeps_its_errors():
    def fail():
        raise ValueError("boom")

    assert all_gather_checked(lambda: 5, what="x") == [5]
    with pytest.raises(ValueError, match="boom"):  # nobody to tell: the error is the caller's own, unwrapped
        all_gather_checked(fail, what="epoch 3's previews")
    with pytest.raises(ValueError, match="boom"):
        broadcast_checked(fail, what="deciding")
    several = RankFailedError("writing", {1: "OSError: disk full", 0: "OSError: disk full"}, 4)
    assert str(several).startswith("writing failed on ranks 0, 1 of 4 (rank 0: OSError: disk full; rank 1: OSError: disk full)")
    images = [torch.full((3, 8, 8), float(i)) for i in range(3)]
    gathered = gather_images([2, 0, 1], [images[2], images[0], images[1]], 3)
    assert all(torch.equal(a, b) for a, b in zip(gathered, images))


def test_evaluate_shard_in_one_process_is_evaluate(tmp_path):
    spec = spec_of([16] * 3)
    generator = torch.Generator().manual_seed(0)
    epochs = {epoch: [torch.rand(3, 16, 16, generator=generator) for _ in range(3)] for epoch in (1, 2)}
    whole = LoraMonitor(spec=spec, output_dir=tmp_path / "whole", metrics=None, scorers=[Brightness()], metric="brightness", export=False)
    shards = LoraMonitor(spec=spec, output_dir=tmp_path / "shards", metrics=None, scorers=[Brightness()], metric="brightness", export=False)
    for epoch, images in epochs.items():
        expected = whole.evaluate(epoch, images, step=epoch)
        got = shards.evaluate_shard(epoch, [2, 0, 1], [images[2], images[0], images[1]], step=epoch)
        assert got.scores == expected.scores and got.decision == expected.decision
    assert shards.policy.state_dict() == whole.policy.state_dict()
    assert (tmp_path / "shards" / "scores.jsonl").read_text() == (tmp_path / "whole" / "scores.jsonl").read_text()
    with pytest.raises(ValueError, match=r"missing \[2\]"):
        shards.evaluate_shard(3, [0, 1], epochs[1][:2])


# ----------------------------------------------------------------- real runs on 2 processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def launch(launcher: str, model: str, output_dir: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the script on 2 processes; returns the finished process and its wall time."""
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    command += [str(SCRIPT), "--model", model, "--output-dir", str(output_dir), *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=child_env(**env), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the 2-process run did not finish within {LAUNCH_TIMEOUT_S} s (a hang?); output:\n{expired.output}\n{expired.stderr}")
    return done, time.perf_counter() - start


def results(output_dir: Path) -> list[dict]:
    return [torch.load(output_dir / f"rank{rank}" / "result.pt", weights_only=False) for rank in (0, 1)]


@pytest.fixture(scope="module")
def single_run(tiny_model, tmp_path_factory):
    """The reference: the same run in this one process, without an Accelerator, on one thread as each
    child runs (CPU kernels on 1 and 2 threads differ in the last bits; batching does not change them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return distributed_run.run(tiny_model, tmp_path_factory.mktemp("single"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_process_run(tiny_model, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("two")
    done, seconds = launch("accelerate", tiny_model, output_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    print(f"2-process run: {seconds:.1f} s")
    return output_dir


def assert_same_as_single(ranks: list[dict], single: dict) -> None:
    for seen in ranks:
        assert seen["world_size"] == 2
        assert seen["epochs"] == single["epochs"]
        assert seen["best_epoch"] == single["best_epoch"] and seen["stopped_epoch"] == single["stopped_epoch"]
        assert seen["decisions"] == single["decisions"]
        # base references are kept rounded to 8 bits: float noise between batchings may flip a rare pixel by one level
        torch.testing.assert_close(seen["base"], single["base"], atol=1 / 255 + 1e-6, rtol=0)
        assert (seen["base"] != single["base"]).float().mean() < 1e-3
        for epoch in single["epochs"]:
            torch.testing.assert_close(seen["images"][epoch], single["images"][epoch], atol=1e-5, rtol=0)
            for metric, values in single["scores"][epoch].items():
                assert seen["scores"][epoch][metric] == pytest.approx(values, abs=1e-4)
    assert ranks[0]["policy_state"] == ranks[1]["policy_state"]  # rank 1 holds rank 0's decision


def test_two_processes_split_the_previews_and_choose_as_one_process(two_process_run, single_run):
    ranks = results(two_process_run)
    assert_same_as_single(ranks, single_run)
    # the run is not trivial: it decides over several epochs and stops early (which epoch wins depends on
    # the random tiny model's renders, so on the diffusers version: 4 and 5 on 0.42, 1 and 2 on 0.32.1)
    assert single_run["best_epoch"] is not None and len(single_run["epochs"]) >= 2
    assert single_run["stopped_epoch"] == single_run["epochs"][-1] < 6
    # each rank rendered only its share (base + every epoch), and the shares cover the spec once
    assert set(map(tuple, ranks[0]["renders"])) == {(0, 1)} and set(map(tuple, ranks[1]["renders"])) == {(2, 3)}
    assert len(ranks[0]["renders"]) == 1 + len(single_run["epochs"])


def test_only_rank_0_writes_the_record_and_exports(two_process_run, single_run):
    ranks = results(two_process_run)
    assert ranks[0]["is_main_process"] and not ranks[1]["is_main_process"]
    assert not (two_process_run / "rank1" / "monitor").exists()
    main = two_process_run / "rank0" / "monitor"
    lines = [json.loads(line) for line in (main / "scores.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == single_run["epochs"]
    assert json.loads((main / "best" / "lora_monitor.json").read_text())["epoch"] == single_run["best_epoch"]
    assert len(list((main / "previews" / "base").glob("*.png"))) == 4


def test_signals_on_two_processes_match_one_process(tiny_model, tmp_path, tiny_embedders):
    """Per-image signals are scored on each rank's share, diversity (every seed of a prompt at once) and the
    validation loss on the main process; every rank ends with all of them, as one process has them."""
    signals = (tiny_embedders["clip"], tiny_embedders["dino"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = distributed_run.run(tiny_model, tmp_path / "single", prompts=2, epochs=2, signals=signals)
    finally:
        torch.set_num_threads(threads)
    done, _ = launch("accelerate", tiny_model, tmp_path / "two", "--prompts", "2", "--epochs", "2", "--signals", *signals)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = results(tmp_path / "two")
    assert set(single["scores"][1]) == {"brightness", "ssim", "likeness", "adherence", "diversity", "val_loss"}
    assert_same_as_single(ranks, single)


def test_a_rank_that_fails_while_rendering_stops_every_rank_with_its_name(tiny_model, tmp_path):
    done, seconds = launch("accelerate", tiny_model, tmp_path, LORA_MONITOR_TEST_FAIL_RANK="1", LORA_MONITOR_TEST_FAIL_EPOCH="2")
    assert done.returncode != 0
    for rank in (0, 1):  # both ranks raised the same clear error; neither waited for the other
        message = (tmp_path / f"rank{rank}" / "error.txt").read_text()
        assert message.startswith("epoch 2's previews failed on rank 1 of 2: ValueError: injected preview failure on rank 1 at epoch 2")
        assert not (tmp_path / f"rank{rank}" / "result.pt").exists()
    assert "failed on rank 1 of 2" in done.stdout + done.stderr
    # epoch 1 was recorded before the failure, by rank 0 only
    assert len((tmp_path / "rank0" / "monitor" / "scores.jsonl").read_text().splitlines()) == 1
    print(f"failing 2-process run ended in {seconds:.1f} s")


@pytest.mark.slow
def test_kohya_style_shards_gathered_with_evaluate_shard_choose_as_one_process(tiny_model, tmp_path, single_run):
    done, _ = launch("accelerate", tiny_model, tmp_path, "--external")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = results(tmp_path)
    assert_same_as_single(ranks, single_run)
    assert set(map(tuple, ranks[0]["renders"])) == {(0, 2)} and set(map(tuple, ranks[1]["renders"])) == {(1, 3)}
    assert not (tmp_path / "rank1" / "monitor").exists()
    assert json.loads((tmp_path / "rank0" / "monitor" / "best" / "lora_monitor.json").read_text())["epoch"] == single_run["best_epoch"]


@pytest.mark.slow
def test_torchrun_launch_chooses_as_one_process(tiny_model, tmp_path, single_run):
    done, _ = launch("torchrun", tiny_model, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert_same_as_single(results(tmp_path), single_run)
    assert not (tmp_path / "rank1" / "monitor").exists()
