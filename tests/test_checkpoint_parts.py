"""The training state's checkpoint parts (the counters, the generators, the data stream's position, the trainer),
each with its state_dict / load_state_dict, and engine.checkpoint.TrainingCheckpoint, which gathers them under
fixed names: round trips, the file format main writes, and resumes from checkpoints of other layouts and of older
versions. In this process, on the CPU."""

import io
import random
import warnings

import numpy as np
import pytest
import torch

from engine.checkpoint import HEADER, TrainingCheckpoint, mean_counters
from engine.data.stream_position import StreamPosition, data_position, rank_position, stream_layout
from engine.rng import Generators, step_seed
from engine.trainer import TrainState, build_trainer
from test_trainer import CPU, small_config

# What a checkpoint written by main holds, in this order; a checkpoint of this format must keep resuming.
CHECKPOINT_KEYS = ["step", "model", "ema", "extra_emas", "post_hoc_emas", "optimizer", "lr_schedule", "scaler",
                   "kernels", "counters", "rng", "data_position", "config", "engine_version"]
DATA_POSITION_KEYS = ["world_size", "num_workers", "batch_size", "seed", "positions", "next_workers", "seeds"]


def draws() -> tuple:
    """One number from each global generator."""
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def as_in_a_file(checkpoint: dict) -> dict:
    """The checkpoint as torch.save writes it and a weights-only load reads it back."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_generators_come_back_exactly_and_reseed_by_rank_and_step():
    generators = Generators(torch.device("cpu"), seed=3, rank=0)
    saved = as_in_a_file({"rng": generators.state_dict()})["rng"]
    expected = draws()
    generators.load_state_dict(saved)
    assert draws() == expected
    generators.reseed(step=5)
    reseeded = draws()
    generators.reseed(step=5)
    assert draws() == reseeded
    Generators(torch.device("cpu"), seed=3, rank=1).reseed(step=5)
    assert draws() != reseeded  # rank r of a resized run was nobody's rank r: a seed of its own


def test_the_stream_position_follows_the_batches_and_round_trips():
    stream = StreamPosition.fresh(seed=7, num_workers=2)
    assert stream == StreamPosition(seed=7, positions=[0, 0], next_worker=0)
    for worker, position in ((0, 8), (1, 8), (0, 16)):
        stream.advance({"worker": worker, "position": position, "skipped": 0})
    stream.advance({"skipped": 0})  # the device cache's batches name no position: nothing moves
    assert stream.state_dict() == {"seed": 7, "positions": [16, 8], "next_worker": 1}
    again = StreamPosition.fresh(seed=7, num_workers=2)
    again.load_state_dict(stream.state_dict())
    assert again == stream
    again.restart(seed=99)
    assert again == StreamPosition(seed=99, positions=[0, 0], next_worker=0)
    resumed = StreamPosition.fresh(seed=7, num_workers=2)
    resumed.load_state_dict(again.state_dict())
    assert resumed.seed == 99, "a restarted stream resumes with its own seed"
    older = {"positions": [16, 8], "next_worker": 1}  # before the seed was saved: the configured seed's stream
    resumed.load_state_dict(older)
    assert resumed == StreamPosition(seed=99, positions=[16, 8], next_worker=1)
    assert StreamPosition.fresh(seed=0, num_workers=0).positions == [0]  # no workers: the main process's stream


def test_the_data_position_holds_the_layout_and_each_ranks_position_and_only_that_layout_reads_it():
    layout = stream_layout(world_size=2, num_workers=2, batch_size=4, seed=0)
    states = [{"seed": 0, "positions": [8, 4], "next_worker": 1}, {"seed": 5, "positions": [4, 4], "next_worker": 0}]
    entry = data_position(layout, states)
    assert list(entry) == DATA_POSITION_KEYS
    assert entry == {"world_size": 2, "num_workers": 2, "batch_size": 4, "seed": 0, "positions": [[8, 4], [4, 4]],
                     "next_workers": [1, 0], "seeds": [0, 5]}
    assert [rank_position(entry, layout, rank) for rank in (0, 1)] == states
    for other in ({"world_size": 1}, {"num_workers": 1}, {"batch_size": 8}, {"seed": 1}):
        assert rank_position(entry, {**layout, **other}, 0) is None, other
    assert rank_position(None, layout, 0) is None
    older = {key: value for key, value in entry.items() if key not in ("next_workers", "seeds")}  # saved since
    assert rank_position(older, layout, 0) == {"positions": [8, 4], "next_worker": 0}


def the_parts(tmp_path, *overrides) -> tuple[TrainingCheckpoint, list[str]]:
    """A TrainingCheckpoint over fresh parts of a small trainer, and the lines it logs."""
    config = small_config(f"train.run_dir={tmp_path}", "data.num_workers=2", *overrides)
    logged = []
    checkpoint = TrainingCheckpoint(config, CPU, build_trainer(config, CPU), counters=TrainState(),
                                    generators=Generators(CPU.device, config.train.seed, CPU.rank),
                                    stream=StreamPosition.fresh(config.train.seed, config.data.num_workers),
                                    log=logged.append)
    return checkpoint, logged


@pytest.fixture
def trained(tmp_path) -> TrainingCheckpoint:
    """Parts as a run has them after 5 steps: weights and schedule moved, counters counted, streams advanced."""
    checkpoint, _ = the_parts(tmp_path)
    with torch.no_grad():
        for parameter in checkpoint.trainer.model.parameters():
            parameter.add_(1.0)
    with warnings.catch_warnings():  # the schedule steps without an optimizer step here
        warnings.simplefilter("ignore")
        for _ in range(5):
            checkpoint.trainer.lr_schedule.step()
    checkpoint.counters.load_state_dict({"step": 5, "skipped_samples": 2, "delivered_samples": 40,
                                         "nonfinite_steps": 1})
    checkpoint.stream.load_state_dict({"positions": [24, 16], "next_worker": 1})
    return checkpoint


def assert_same_trainer(restored, saved) -> None:
    for a, b in zip(restored.model.parameters(), saved.model.parameters()):
        assert torch.equal(a, b)
    assert restored.lr_schedule.state_dict() == saved.lr_schedule.state_dict()


def test_a_checkpoint_holds_what_main_writes_under_the_same_keys_and_restores_every_part(tmp_path, trained):
    saved = trained.state_dict()
    expected = draws()  # what the generators give after the checkpoint
    saved = as_in_a_file(saved)
    assert list(saved) == CHECKPOINT_KEYS and list(saved["data_position"]) == DATA_POSITION_KEYS
    assert saved["step"] == 5 and saved["counters"] == [trained.counters.state_dict()]
    assert saved["data_position"]["positions"] == [[24, 16]] and saved["data_position"]["next_workers"] == [1]
    restored, logged = the_parts(tmp_path / "resumed")
    restored.load_state_dict(saved)
    restored.load_generators(saved)
    assert draws() == expected
    assert restored.counters == trained.counters and restored.stream == trained.stream
    assert restored.saved_step == 5 and logged == []
    assert_same_trainer(restored.trainer, trained.trainer)


def test_a_saved_checkpoint_resumes_from_the_run_directory_and_returns_its_header(tmp_path, trained):
    trained.save()
    assert trained.saved_step == 5 and (tmp_path / "checkpoints" / "step-00000005.pt").is_file()
    restored, logged = the_parts(tmp_path)
    header = restored.resume()
    assert list(header) == [*HEADER, "path"] and header["path"].endswith("step-00000005.pt")
    assert logged == [f"resumed from {header['path']} at step 5"]
    assert restored.counters == trained.counters and restored.stream == trained.stream
    assert_same_trainer(restored.trainer, trained.trainer)
    assert the_parts(tmp_path / "fresh")[0].resume() is None  # a fresh run: nothing to resume


def test_the_best_checkpoint_keeps_its_score_and_is_never_resumed_from(tmp_path, trained):
    trained.save_best({"metric": "val_loss", "value": 0.5, "step": 5})
    assert trained.read_best_score() == {"metric": "val_loss", "value": 0.5, "step": 5}
    assert trained.best_path.is_file() and the_parts(tmp_path)[0].resume() is None


def test_another_world_size_resumes_from_the_step_mean_counters_reseeded_generators_a_fresh_stream(tmp_path,
                                                                                                    trained):
    saved = trained.state_dict()
    two_ranks = [{"step": 5, "skipped_samples": 2, "delivered_samples": 20, "nonfinite_steps": 1},
                 {"step": 5, "skipped_samples": 4, "delivered_samples": 20, "nonfinite_steps": 1}]
    saved.update(counters=two_ranks, rng=saved["rng"] * 2,
                 data_position={**saved["data_position"], "world_size": 2, "positions": [[24, 16]] * 2,
                                "next_workers": [1, 1]})
    restored, logged = the_parts(tmp_path / "resumed")
    restored.load_state_dict(saved)
    restored.load_generators(saved)
    resumed_draws = draws()
    assert restored.counters == TrainState(step=5, skipped_samples=3, delivered_samples=20, nonfinite_steps=1)
    assert restored.stream == StreamPosition(seed=step_seed(restored.config.train.seed, 5), positions=[0, 0])
    Generators(CPU.device, restored.config.train.seed, CPU.rank).reseed(5)
    assert draws() == resumed_draws
    assert [line.split(":")[0] for line in logged] == [
        "the data stream starts afresh (seeded by the step)", "the checkpoint holds no generator states for this "
                                                              "world size"]
    again, _ = the_parts(tmp_path / "resumed-again")  # killed again under the new layout: the same stream goes on
    again.load_state_dict(restored.state_dict())
    assert again.stream == restored.stream


def test_checkpoints_from_before_the_counters_and_generators_were_saved_still_resume(tmp_path, trained):
    saved = {key: value for key, value in trained.state_dict().items() if key not in ("counters", "rng")}
    restored, _ = the_parts(tmp_path / "resumed")
    restored.load_state_dict(saved)
    restored.load_generators(saved)
    batch_size = restored.config.train.batch_size
    assert restored.counters == TrainState(step=5, delivered_samples=5 * batch_size)
    assert restored.stream == trained.stream


def test_mean_counters_of_ranks_keep_the_step_and_rank_0s_non_finite_steps():
    saved = [{"step": 9, "skipped_samples": 1, "delivered_samples": 10, "nonfinite_steps": 2},
             {"step": 9, "skipped_samples": 4, "delivered_samples": 11, "nonfinite_steps": 2}]
    assert mean_counters(saved, 9, world_size=1, batch_size=8) == {"step": 9, "skipped_samples": 2,
                                                                    "delivered_samples": 10, "nonfinite_steps": 2}
    assert mean_counters(None, 9, world_size=2, batch_size=8) == {"step": 9, "skipped_samples": 0,
                                                                   "delivered_samples": 36, "nonfinite_steps": 0}
