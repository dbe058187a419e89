"""Post-hoc EMA (issue 17, item 3; EDM2): power-function profiles averaged during training, snapshotted, and
any other length synthesized afterwards. The maths in float64 on a toy model; then the trainer and a resume."""

import io

import pytest
import torch

from engine.ema import build_ema
from engine.post_hoc_ema import (list_snapshots, power_decay, power_gamma, remove_snapshots_after, save_snapshots,
                                 synthesize, update_post_hoc_emas)
from engine.trainer import build_trainer, train_step
from test_ema_choices import SMALLER, batches
from test_trainer import CPU, small_config

STEPS, EVERY = 200, 20


def test_the_decay_gives_edm2s_power_profile_exactly():
    """After n updates the EMA weighs step k's weights by the profile (gamma + 1) t^gamma / n^(gamma + 1)
    integrated over (k - 1, k]: one-hot weights (one coordinate per step) read the weights off."""
    n, sigma_rel = 50, 0.1
    gamma = power_gamma(sigma_rel)
    ema = torch.zeros(n, dtype=torch.float64)
    for step in range(n):
        decay = power_decay(sigma_rel, step)
        ema = decay * ema + (1 - decay) * torch.eye(n, dtype=torch.float64)[step]
    k = torch.arange(1, n + 1, dtype=torch.float64)
    torch.testing.assert_close(ema, (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / n ** (gamma + 1), rtol=1e-12,
                               atol=1e-15)
    # gamma is EDM2's for the profile's relative standard deviation: sqrt((g+1) / ((g+2)^2 (g+3))) = sigma_rel
    assert ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5 == pytest.approx(sigma_rel, rel=1e-10)
    assert power_decay(sigma_rel, 0) == 0.0  # the first update copies the weights


def _train_toy(folder, sigma_rels, steps=STEPS, every=EVERY):
    """A float64 'model' whose weights take a random walk; its power EMAs, snapshotted every `every` steps."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)  # every run the same walk
    emas = {sigma_rel: build_ema(model, 0.0) for sigma_rel in sigma_rels}
    for step in range(steps):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
        update_post_hoc_emas(emas, step)
        if (step + 1) % every == 0:
            save_snapshots(folder, emas, step + 1, is_main=True)
    return {sigma_rel: ema.ema_model.state_dict() for sigma_rel, ema in emas.items()}


def _distance(a, b):
    return sum((a[name] - b[name]).square().sum() for name in a).sqrt().item()


def test_a_synthesized_length_is_close_to_the_ema_tracked_at_that_length(tmp_path):
    tracked = _train_toy(tmp_path / "tracked", [0.05, 0.1, 0.2])  # 0.1: the truth, kept out of the synthesis
    _train_toy(tmp_path / "two", [0.05, 0.2])
    assert len(list_snapshots(tmp_path / "two")) == 2 * STEPS // EVERY
    weights, at, used = synthesize(tmp_path / "two", 0.1, STEPS)
    assert at == STEPS and {s.sigma_rel for s in used} == {0.05, 0.2} and weights["weight"].dtype == torch.float64
    nearest = min(_distance(tracked[0.1], tracked[other]) for other in (0.05, 0.2))
    assert _distance(weights, tracked[0.1]) < nearest / 30  # about 1/170 here
    # a tracked length at a snapshot's step is that snapshot
    same, _, _ = synthesize(tmp_path / "two", 0.05, STEPS)
    assert _distance(same, tracked[0.05]) < 1e-9 * _distance(tracked[0.05], {k: 0 * v for k, v in same.items()})


def test_synthesis_takes_only_the_snapshots_up_to_its_step(tmp_path):
    """An earlier checkpoint's EMA comes from the snapshots up to it, at the latest of them; later ones (the run
    went on) do not change it. A resume removes the snapshots a killed run wrote after its checkpoint."""
    _train_toy(tmp_path / "long", [0.05, 0.2])
    _train_toy(tmp_path / "short", [0.05, 0.2], steps=100)
    early, at, used = synthesize(tmp_path / "long", 0.1, 110)  # between snapshots: the one at 100
    alone, _, _ = synthesize(tmp_path / "short", 0.1, 100)
    assert at == 100 and max(s.step for s in used) == 100
    assert all(torch.equal(early[name], alone[name]) for name in alone)
    assert remove_snapshots_after(tmp_path / "long", 100) == 10
    assert [s.step for s in list_snapshots(tmp_path / "long")] == [s.step for s in list_snapshots(tmp_path / "short")]
    with pytest.raises(ValueError, match="holds no post-hoc EMA snapshots up to step 10"):
        synthesize(tmp_path / "long", 0.1, 10)
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\)"):
        synthesize(tmp_path / "long", 0.3, 100)


def test_the_trainer_keeps_the_profiles_resumes_them_exactly_and_cannot_add_one_later():
    data = batches()
    config = small_config(*SMALLER, "train.post_hoc_ema_sigma_rels=[0.05,0.2]")
    trainer, resumed = build_trainer(config, CPU), build_trainer(config, CPU)
    assert list(trainer.post_hoc_emas) == [0.05, 0.2]
    expected = [p.detach().clone() for p in trainer.model.parameters()]  # the profile's EMA, kept by hand
    for step in range(2):
        train_step(trainer, step, lambda: data[step])
        decay = power_decay(0.2, step)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, trainer.model.parameters())]
    for got, want in zip(trainer.post_hoc_emas[0.2].ema_model.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    saved = io.BytesIO()
    torch.save(trainer.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    assert sorted(state["post_hoc_emas"]) == ["sigma_rel_0.05", "sigma_rel_0.2"]
    resumed.load_state_dict(state, state["lr_schedule"], state["scaler"])
    for one in (trainer, resumed):
        train_step(one, 2, lambda: data[2])
    for sigma_rel in (0.05, 0.2):
        for a, b in zip(resumed.post_hoc_emas[sigma_rel].ema_model.parameters(),
                        trainer.post_hoc_emas[sigma_rel].ema_model.parameters()):
            assert torch.equal(a, b)
    from engine.config import ConfigError

    more = build_trainer(small_config(*SMALLER, "train.post_hoc_ema_sigma_rels=[0.05,0.1,0.2]"), CPU)
    with pytest.raises(ConfigError, match=r"the checkpoint holds no profile for \[0.1\].*cannot be added on resume"):
        more.load_state_dict(state, state["lr_schedule"], state["scaler"])


def test_the_profiles_are_checked():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="train.post_hoc_ema_sigma_rels must be empty or at least two"):
        small_config("train.post_hoc_ema_sigma_rels=[0.05]")
    with pytest.raises(ConfigError, match=r"train.post_hoc_ema_sigma_rels must be in \(0, 0.288\)"):
        small_config("train.post_hoc_ema_sigma_rels=[0.05,0.3]")

