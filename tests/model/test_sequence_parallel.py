"""Sequence parallelism (mixins/sequence_parallel.py): the split model equals the whole one, and what cannot run
split is refused when configured."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from sat_video.common.errors import CheckpointError, ConfigError, HookConflictError
from sat_video.model.build import build_dit
from sat_video.model.context import SequenceShard
from sat_video.model.hooks import Mixin
from sat_video.training.sequence_parallel import ParallelLayout
from tests.conftest import ROOT, VARIANTS, tiny_config


def test_a_shard_takes_its_rows_and_pads_the_last_one():
    rows = torch.arange(5.0)[:, None]
    shards = [SequenceShard(rank, 3, 5) for rank in range(3)]
    assert [s.size for s in shards] == [2, 2, 2]
    assert [s.take(rows).flatten().tolist() for s in shards] == [[0, 1], [2, 3], [4, 0]]
    assert SequenceShard(1, 4, 2).take(rows[:2]).flatten().tolist() == [1]  # fewer tokens than ranks: padding only after
    assert SequenceShard(3, 4, 2).take(rows[:2]).flatten().tolist() == [0]


def test_the_layout_is_data_groups_of_neighbouring_sequence_ranks():
    assert [ParallelLayout.of(rank, 4, 2) for rank in (0, 1, 3)] == [
        ParallelLayout(0, 2, 0, 2), ParallelLayout(0, 2, 1, 2), ParallelLayout(1, 2, 1, 2)]
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=3 must divide the number of processes \(4\).*\[1, 2, 4\]"):
        ParallelLayout.of(0, 4, 3)


def test_resuming_needs_the_layout_the_checkpoint_was_written_with(tmp_path):
    import torch

    from sat_video.training.elastic_resume import check_resume_layout
    from sat_video.training.run_folder import trainer_state_file

    def written_by(layout, ranks=1):
        folder = tmp_path / f"{layout}-{ranks}"
        folder.mkdir()
        for rank in range(ranks):
            torch.save({"loop": {"layout": layout}}, trainer_state_file(folder, rank))
        return folder

    here = ParallelLayout.of(0, 2, 2)
    assert check_resume_layout("strict", written_by([1, 2]), here, 2) is None
    legacy = written_by(None, ranks=2)  # written before layouts were recorded: every process data-parallel
    with pytest.raises(CheckpointError, match=r"was written by 2 data-parallel x 1 sequence-parallel processes, this run has 1 "
                                              r"data-parallel x 2 sequence-parallel.*train.resume_layout=elastic.*"
                                              r"train.init_checkpoint="):
        check_resume_layout("strict", legacy, here, 2)
    assert check_resume_layout("strict", legacy, ParallelLayout.of(1, 2, 1), 2) is None


def test_sizes_and_mixins_that_cannot_run_split_are_refused_at_load():
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=3 must divide model.dit.num_attention_heads=2.*\[1, 2\]"):
        tiny_config("cogvideox_5b", "parallel.sequence_parallel_size=3")
    with pytest.raises(ConfigError, match=r"mixins.spatiotemporal \(type factorized_attention\) cannot run on a part"):
        latte_config("parallel.sequence_parallel_size=2")
    assert tiny_config("cogvideox1.5_5b_i2v", "parallel.sequence_parallel_size=2").parallel.sequence_parallel_size == 2


def latte_config(*overrides):
    from sat_video import load_config

    latte = {"model": {"dit": {"mixins": {"spatiotemporal": {"type": "factorized_attention"}}}}}
    return load_config([ROOT / "configs" / "cogvideox_2b.yaml", ROOT / "configs" / "tiny.yaml", latte], overrides)


class _Splitter(Mixin):
    runs_sharded = True

    def split_sequence(self, hidden, ctx):
        return hidden, ctx


def test_adding_a_splitter_to_a_model_with_a_whole_grid_mixin_names_both_and_changes_nothing():
    dit = build_dit(latte_config())
    before = dit.hook_origins
    with pytest.raises(HookConflictError, match="'sequence_parallel' splits .* mixin 'spatiotemporal'"):
        dit.add_mixin("sequence_parallel", _Splitter(dit.dit_config))
    assert dit.hook_origins == before and "sequence_parallel" not in dit.mixins


@pytest.mark.slow
def test_split_over_two_ranks_every_variant_matches_one_process_forward_backward_and_sampling():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    worker = [sys.executable, "-m", "tests.model.sequence_parallel_worker", "2"]
    procs = [subprocess.Popen(worker, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]
    results = {r["variant"]: r for r in (json.loads(line) for line in outputs[0][0].splitlines() if line.startswith("{"))}
    assert sorted(results) == sorted(VARIANTS)
    for r in results.values():
        assert r["video_tokens"] % 2 == 1 and r["tokens_per_rank"] == (r["video_tokens"] + 1) // 2, r  # padded split
        assert max(r["output"], r["gradient"], r["gradient_checkpointed"], r["latents"]) <= 1e-5, r
