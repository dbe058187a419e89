"""engine.trainer: the one training step that the loop, the benchmarks and the tests share."""

import math
import time

import torch

import engine.train
import engine.trainer
from benchmarks import test_bench_train_step
from engine.config import load_config
from engine.distributed import DistributedContext
from engine.trainer import IntervalStats, StepStats, TrainState, add_by_noise_level, build_trainer, noise_level_names, train_step
from test_train_cli import ROOT, SMALL

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def small_config(*overrides):
    return load_config(ROOT / "configs/tiny.yaml", SMALL + ["data.path=unused", *overrides])


def test_the_benchmark_times_the_step_that_training_runs(monkeypatch):
    # the same functions by identity ...
    assert engine.train.train_step is engine.trainer.train_step is test_bench_train_step.train_step
    assert engine.train.build_trainer is engine.trainer.build_trainer is test_bench_train_step.build_trainer
    # ... and the benchmark's timed function is a call of it
    calls = []

    def spy(trainer, step, next_batch):
        calls.append(step)
        return engine.trainer.train_step(trainer, step, next_batch)

    monkeypatch.setattr(test_bench_train_step, "train_step", spy)

    class OneCall:
        group, extra_info, stats = None, {}, None

        def __call__(self, fn):
            return fn()

    test_bench_train_step.time_train_step(OneCall(), test_bench_train_step.configured(small_config(), 4), 1.0, "g")
    assert calls == [0, 1, 2], "two warm-up steps, then the timed one, at consecutive steps"


def test_a_step_returns_device_statistics_and_skips_a_nonfinite_update():
    trainer = build_trainer(small_config("model.dropout=0.0"), CPU)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stats = train_step(trainer, 0, lambda: {"image": images, "skipped": 0})
    assert isinstance(stats, StepStats) and bool(stats.finite) and stats.loss.ndim == 0
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():  # a NaN weight: a NaN loss and gradient; the update must not be applied
        next(trainer.model.parameters())[0].view(-1)[0] = float("nan")
    poisoned = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = train_step(trainer, 1, lambda: {"image": images, "skipped": 0})
    assert not bool(stats.finite)
    after = trainer.model.state_dict()
    assert all(torch.allclose(after[k], poisoned[k], rtol=0, atol=0, equal_nan=True) for k in after)
    assert any(not torch.equal(before[k], poisoned[k]) for k in before)


def test_interval_statistics_count_finite_steps_and_leave_maintenance_out():
    interval = IntervalStats(torch.device("cpu"))
    for loss, finite in [(1.0, True), (float("nan"), False), (3.0, True)]:
        by_level = torch.tensor([loss, 2 * loss, 0.0, 0.0])  # one sample in each of the first two levels
        interval.add(StepStats(torch.tensor(loss), torch.tensor(2 * loss), torch.tensor(finite), by_level,
                               torch.tensor([1.0, 1.0, 0.0, 0.0])))
    reduced = interval.reduce(CPU)
    levels = reduced.pop("loss_by_level")
    assert reduced == {"loss": 2.0, "grad_norm": 4.0, "nonfinite_steps": 1, "nonfinite_streak": 0}
    assert levels[:2] == [2.0, 4.0] and all(math.isnan(level) for level in levels[2:])  # no samples: NaN
    interval.maintenance_seconds = 5.0
    time.sleep(0.01)
    assert interval.training_seconds() < 0  # 5 s of maintenance are not training time
    interval.restart()
    assert interval.steps == 0 and interval.maintenance_seconds == 0.0 and float(interval.loss_sum) == 0.0


def test_train_state_round_trips():
    state = TrainState(step=7, skipped_samples=3, delivered_samples=56, nonfinite_steps=1)
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state


def test_the_loss_by_noise_level_sums_each_quarter_of_the_timestep_range():
    assert noise_level_names(1000) == ["loss_t0_249", "loss_t250_499", "loss_t500_749", "loss_t750_999"]
    sums, counts = torch.zeros(4), torch.zeros(4)
    t = torch.tensor([0, 249, 250, 999, 998, 600])
    add_by_noise_level(sums, counts, torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 7.0]), t, 1000)
    assert sums.tolist() == [3.0, 3.0, 7.0, 10.0] and counts.tolist() == [2.0, 1.0, 1.0, 2.0]


def test_a_step_reports_the_loss_by_noise_level_of_its_samples():
    trainer = build_trainer(small_config("model.dropout=0.0"), CPU)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stats = train_step(trainer, 0, lambda: {"image": images, "skipped": 0})
    assert stats.samples_by_level.sum() == trainer.micro_batch
    # the per-sample losses, summed by level, average to the step's loss (one micro-batch)
    assert torch.allclose(stats.loss_by_level.sum() / trainer.micro_batch, stats.loss)
