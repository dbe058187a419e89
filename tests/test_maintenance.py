"""engine.maintenance: the concerns asked between training steps, each saying when it is due; their order in a
run, the steps at which each is due, the agreed stop, the best checkpoint. In this process."""

import math
from types import SimpleNamespace

import pytest
import torch

from engine.config import load_config
from engine.distributed import DistributedContext
from engine.maintenance import (BestCheckpoint, Checkpoints, Evaluation, LogInterval, PostHocSnapshots, SampleGrids,
                                StopOnRequest, Validation, due_every)
from engine.train import check_data
from engine.training_run import TrainingRun
from test_train_cli import ROOT, SMALL

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
ORDER = ["LogInterval", "PostHocSnapshots", "Checkpoints", "StopOnRequest", "SampleGrids", "Evaluation", "Validation"]


class FakeCheckpoint:
    """What the concerns ask of engine.checkpoint.TrainingCheckpoint, recorded."""

    def __init__(self, saved_step: int = 0, best: dict | None = None):
        self.saved_step, self.best, self.saves, self.best_saves = saved_step, best, [], []
        self.best_path = "run/checkpoints/best.pt"

    def save(self) -> None:
        self.saves.append(self.saved_step)

    def save_best(self, score: dict) -> None:
        self.best_saves.append(score)

    def read_best_score(self) -> dict | None:
        return self.best


def due_steps(concern, steps: int) -> list[int]:
    return [step for step in range(1, steps + 1) if concern.due(step)]


def test_each_concern_is_due_every_its_interval_and_at_the_final_step_but_the_grids_and_the_stop():
    final, checkpoint = 12, FakeCheckpoint()
    config = load_config(ROOT / "configs/tiny.yaml", [*SMALL, "data.path=unused", "train.steps=12", "train.log_every=5"])
    best = BestCheckpoint("none", checkpoint, print)
    schedule = {
        "log": LogInterval(config, CPU, None, None, None, None, None, 0.0, None),
        "post-hoc": PostHocSnapshots("unused", {0.05: None}, 3, final, is_main=True),
        "checkpoints": Checkpoints(checkpoint, 5, final),
        "grids": SampleGrids(print, 4, final),
        "fid": Evaluation(None, 8, final, best),
        "validation": Validation(object(), None, None, None, 6, final, best),
    }
    assert {name: due_steps(concern, final) for name, concern in schedule.items()} == {
        "log": [5, 10, 12], "post-hoc": [3, 6, 9, 12], "checkpoints": [5, 10, 12],
        "grids": [4, 8],  # not 12: the final grid is the run's own, written when it finishes
        "fid": [8, 12], "validation": [6, 12]}
    # off: no profiles, no grids, no FID, no held-out set
    for off in (PostHocSnapshots("unused", {}, 3, final, True), SampleGrids(print, 0, final),
                Evaluation(None, 0, final, best), Validation(None, None, None, None, 6, final, best)):
        assert due_steps(off, final) == [], type(off).__name__
    assert [due_every(step, 0, 12) for step in (6, 12)] == [False, False]


@pytest.fixture
def stop():
    concern = StopOnRequest(FakeCheckpoint(saved_step=10), CPU)
    yield concern
    concern.close()


def test_the_stop_is_checked_every_step_in_one_process_and_checkpoints_the_step_unless_it_just_did(stop):
    assert due_steps(stop, 5) == [1, 2, 3, 4, 5]
    assert stop.run(7) is False and stop.stopped_by is None  # nobody asked
    stop.request.requested = "SIGTERM"
    assert stop.run(10) is True and stop.stopped_by == "SIGTERM"
    assert stop.checkpoint.saves == []  # step 10's checkpoint was just written
    assert stop.run(11) is True and stop.checkpoint.saves == [10]  # (the fake keeps its saved_step)


def test_a_better_score_writes_the_best_checkpoint_and_a_worse_or_missing_one_does_not():
    checkpoint, logged = FakeCheckpoint(best={"metric": "val_loss", "value": 0.5, "step": 4}), []
    best = BestCheckpoint("val_loss", checkpoint, logged.append)
    assert best.best == {"metric": "val_loss", "value": 0.5, "step": 4}  # the resumed run's old best
    for scores in ({"fid": 1.0}, {"val_loss": math.nan}, {"val_loss": 0.5}, {"val_loss": 0.7}):
        best.offer(scores, 8)
    assert checkpoint.best_saves == []
    best.offer({"val_loss": 0.25, "val_loss_ema": 0.1}, 12)
    assert checkpoint.best_saves == [{"metric": "val_loss", "value": 0.25, "step": 12}] == [best.best]
    assert logged == ["step 12: best val_loss 0.25 (was 0.5 at step 4): run/checkpoints/best.pt"]
    never = BestCheckpoint("none", FakeCheckpoint(best={"metric": "val_loss", "value": 0.5, "step": 4}), print)
    never.offer({"val_loss": 0.0}, 1)
    assert never.best is None and never.checkpoint.best_saves == []


class Recorder:
    def __init__(self, name: str, calls: list, due: bool = True, stops: bool = False):
        self.name, self.calls, self.is_due, self.stops = name, calls, due, stops

    def due(self, step: int) -> bool:
        return self.is_due

    def run(self, step: int) -> bool:
        self.calls.append((self.name, step))
        return self.stops


def test_maintenance_runs_the_due_concerns_in_order_and_the_agreed_stop_ends_it():
    calls = []
    run = SimpleNamespace(interval=SimpleNamespace(maintenance_seconds=0.0, started=0.0), concerns=[
        Recorder("log", calls), Recorder("snapshots", calls, due=False), Recorder("checkpoint", calls),
        Recorder("stop", calls, stops=False), Recorder("grids", calls)])
    assert TrainingRun.maintenance(run, 4) is False
    assert calls == [("log", 4), ("checkpoint", 4), ("stop", 4), ("grids", 4)]
    assert run.interval.maintenance_seconds > 0
    calls.clear()
    run.concerns[3].stops = True
    assert TrainingRun.maintenance(run, 5) is True
    assert calls == [("log", 5), ("checkpoint", 5), ("stop", 5)]  # the grids wait for the resumed run


def test_a_run_asks_its_concerns_in_the_documented_order(tmp_path, shapes16):
    config = load_config(ROOT / "configs/tiny.yaml", [
        *SMALL, f"data.path={shapes16}", f"train.run_dir={tmp_path}", "train.steps=12", "train.log_every=4",
        "train.checkpoint_every=6", "train.sample_every=5", "train.post_hoc_ema_sigma_rels=[0.05,0.2]",
        "train.post_hoc_ema_every=4", "eval.val_every=3", "eval.val_shards=1", "eval.val_images=8"])
    run = TrainingRun(config, CPU, check_data(config))
    try:
        assert [type(concern).__name__ for concern in run.concerns] == ORDER
        assert [due_steps(concern, 12) for concern in run.concerns] == [
            [4, 8, 12], [4, 8, 12], [6, 12], list(range(1, 13)), [5, 10], [], [3, 6, 9, 12]]
    finally:
        run.stop.close()
        run.progress.close()
        run.metrics.close()
