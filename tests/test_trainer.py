"""engine.trainer: the one training step that the loop, the benchmarks and the tests share."""

import io
import math
import time

import pytest
import torch

import engine.train
import engine.trainer
from benchmarks import test_bench_train_step
from engine.config import load_config
from engine.distributed import DistributedContext
from engine.trainer import IntervalStats, StepStats, TrainState, add_by_noise_level, build_trainer, noise_level_names, train_step
from test_train_cli import RECIPE_OPTIONS, ROOT, SMALL

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


# ----------------------------------------------------------------------------- the compiled update (compile_scope=step)


def eager_update(model, optimizer, ema, loss, decay):
    """What the compiled update must equal: clip, skip a non-finite step, Adam, the EMA lerp."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    if bool(torch.isfinite(grad_norm) & torch.isfinite(loss)):
        optimizer.step()
    ema.update_moving_average(ema.ema_model, ema.model, current_decay=decay)


def test_the_compiled_update_is_one_inductor_graph_that_matches_the_eager_update():
    """clip + the non-finite mask + Adam + the EMA lerp, compiled whole (fullgraph=True raises on a graph
    break) by Inductor, on a module small enough to compile in seconds; a NaN step leaves everything as it was."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from engine.ema import build_ema

    models, optimizers, emas = [], [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(), torch.nn.Linear(8, 6))
        lr = torch.tensor(1e-2) if compiled else 1e-2
        options = {"foreach": True, "capturable": True} if compiled else {"foreach": True}
        models.append(model), optimizers.append(torch.optim.Adam(model.parameters(), lr=lr, **options))
        emas.append(build_ema(model, 0.9))
    counter = CompileCounterWithBackend("inductor")
    update = engine.trainer.compile_update(optimizers[1], emas[1], 1.0, "default", backend=counter)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for step in range(8):
        for model, optimizer, ema in zip(models, optimizers, emas):
            optimizer.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            if step in (0, 4):  # a NaN gradient: at the first step (Adam's state is being made) and later
                model[0].weight.grad[0, 0] = float("nan")
            if ema is emas[1]:
                before = [p.clone() for p in model.parameters()]
                grad_norm, finite = update(loss.detach(), torch.tensor(0.9))
                assert bool(finite) == (step not in (0, 4))
                if step in (0, 4):
                    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            else:
                eager_update(model, optimizer, ema, loss.detach(), 0.9)
        for a, b in zip([*models[0].parameters(), *emas[0].ema_model.parameters()],
                        [*models[1].parameters(), *emas[1].ema_model.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1, "one graph (Adam's state exists before tracing), no recompiles"
    assert float(optimizers[1].state[models[1][0].weight]["step"]) == 6  # two skipped of eight


COMPILE_UPDATE = engine.trainer.compile_update


def step_scope_trainer(monkeypatch, *overrides):
    """compile_scope=step with the model eager and the update traced by aot_eager: the trainer's wiring
    (tensor LR, EMA decay, counters, resume) in seconds. Inductor's code for the update is checked above;
    compiling all of the UNet's parameters with Inductor takes minutes on this CPU."""
    monkeypatch.setattr(engine.trainer, "compile_model", lambda *args: None)
    monkeypatch.setattr(engine.trainer, "compile_update", lambda *args: COMPILE_UPDATE(*args, backend="aot_eager"))
    return build_trainer(small_config("model.dropout=0.0", "train.compile=true", "train.compile_scope=step",
                                      *overrides), CPU)


def fixed_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(20)]


def run_steps(trainer, batches, steps):
    return [float(train_step(trainer, step, lambda: {"image": batches[step], "skipped": 0}).loss) for step in steps]


def test_the_step_compiled_trainer_follows_the_eager_trajectory_and_resumes_exactly(monkeypatch):
    """With issue 26's recipe options: a warmup, then an inverse-square-root decay of the rate, a device tensor the
    compiled graph reads. The paper's recipe drives the same update and the same tensor (a warmup, then constant),
    and the model, where the recipes differ, runs eagerly here: a second run with it cost 25 s and proved no more."""
    batches = fixed_batches()
    smaller = ("model.channel_mult=[1]", "model.attention_resolutions=[]", "train.post_hoc_ema_sigma_rels=[0.05,0.2]",
               *RECIPE_OPTIONS)
    eager_trainer = build_trainer(small_config("model.dropout=0.0", *smaller), CPU)
    eager = run_steps(eager_trainer, batches, range(20))
    trainer = step_scope_trainer(monkeypatch, *smaller)
    assert trainer.compiled_update is not None and isinstance(trainer.optimizer.param_groups[0]["lr"], torch.Tensor)
    compiled = run_steps(trainer, batches, range(10))
    saved = io.BytesIO()
    torch.save(trainer.state_dict(), saved)  # a checkpoint at step 10, as training writes it
    compiled += run_steps(trainer, batches, range(10, 20))
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)
    for a, b in zip(trainer.post_hoc_emas[0.2].ema_model.parameters(), eager_trainer.post_hoc_emas[0.2].ema_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # updated after the compiled graph, as eagerly
    # a resume at step 10 continues bit for bit
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = step_scope_trainer(monkeypatch, *smaller)
    resumed.load_state_dict(state, state["lr_schedule"], state["scaler"])
    assert run_steps(resumed, batches, range(10, 20)) == compiled[10:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.ema_model.parameters(), trainer.ema.ema_model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(resumed.post_hoc_emas[0.05].ema_model.parameters(),
                                                 trainer.post_hoc_emas[0.05].ema_model.parameters()))


def test_the_step_scope_refuses_what_it_cannot_compile():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="train.compile_scope.*fp16"):
        small_config("train.compile=true", "train.compile_scope=step", "train.precision=fp16")


# ----------------------------------------------------------------------------- host syncs


def host_syncs_in_a_step(trainer, next_batch, step: int) -> int:
    """`aten::_local_scalar_dense` calls (what .item(), bool() and int() of a tensor run) inside one step,
    other than the CPU fused Adam's reads of its own step counters: a CUDA one keeps those on the device,
    so they would not wait on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train_step(trainer, step, next_batch)

    def under_fused_adam(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and parent.name != "aten::_fused_adam_":
            parent = parent.cpu_parent
        return parent is not None

    return sum(1 for event in profiler.events() if event.name == "aten::_local_scalar_dense" and not under_fused_adam(event))


def test_a_step_makes_no_host_sync_eager_compiled_streaming_or_from_the_device_cache(monkeypatch, shapes16):
    from engine.data import build_train_loader, load_device_cache

    def streamed(trainer):
        batches = iter(build_train_loader(shapes16, batch_size=trainer.micro_batch, image_size=16, channels=3,
                                          num_workers=0, shuffle_buffer=16, seed=0))
        return lambda: next(batches)

    def cached(trainer):
        batches = load_device_cache(shapes16, image_size=16, channels=3, device="cpu", num_workers=0).batches(
            trainer.micro_batch, seed=0)
        return lambda: next(batches)

    warmup = ("train.ema_warmup=true",)  # ema-pytorch's own update() would read its counters: four syncs
    smaller = ("model.channel_mult=[1]", "model.attention_resolutions=[]")
    conditional = ("model.num_classes=4", "model.label_dropout=0.5")  # labels and their drops on the device too
    # compile_scope=step compiles the update alone, the same with labels or without: one compiled trainer, the
    # conditional one, whose labels are the other's inputs and more; the eager one runs the unconditional model
    trainers = {"eager": lambda: build_trainer(small_config(*warmup), CPU),
                "conditional compiled step": lambda: step_scope_trainer(monkeypatch, *warmup, *smaller, *conditional)}
    counts = {}
    for name, make in trainers.items():
        trainer = make()
        for source, batches in (("streamed", streamed), ("device cache", cached)):
            next_batch = batches(trainer)
            train_step(trainer, 0, next_batch)  # the first step builds state (and compiles)
            counts[name, source] = host_syncs_in_a_step(trainer, next_batch, 1)
    assert counts == dict.fromkeys(counts, 0)
