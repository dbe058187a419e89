"""Several EMAs at once (issue 17, item 3): train.extra_ema_decays, in checkpoints and resumes, chosen by name
with --ema."""

import io

import pytest
import torch

from engine.trainer import build_trainer, train_step
from test_train_cli import run, train
from test_trainer import CPU, small_config

SMALLER = ("model.dropout=0.0", "model.channel_mult=[1]", "model.attention_resolutions=[]", "train.ema_warmup=false")


def batches():
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=generator), "skipped": 0}
            for _ in range(4)]


def test_an_extra_ema_is_the_ema_its_decay_would_give_as_the_main_one_and_resumes():
    data = batches()
    several = build_trainer(small_config(*SMALLER, "train.ema_decay=0.9", "train.extra_ema_decays=[0.5,0.7]"), CPU)
    alone = build_trainer(small_config(*SMALLER, "train.ema_decay=0.5"), CPU)
    assert list(several.extra_emas) == ["ema_0.5", "ema_0.7"]
    for step in range(2):
        for trainer in (several, alone):
            train_step(trainer, step, lambda: data[step])
    for a, b in zip(several.extra_emas["ema_0.5"].ema_model.parameters(), alone.ema.ema_model.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(several.ema.ema_model.parameters(), alone.ema.ema_model.parameters()))
    saved = io.BytesIO()
    torch.save(several.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = build_trainer(small_config(*SMALLER, "train.ema_decay=0.9", "train.extra_ema_decays=[0.5,0.7,0.8]"), CPU)
    with pytest.warns(UserWarning, match="the checkpoint holds no ema_0.8: it starts from the resumed weights"):
        resumed.load_state_dict(state, state["lr_schedule"], state["scaler"])
    for name in ("ema_0.5", "ema_0.7"):
        for a, b in zip(resumed.extra_emas[name].ema_model.parameters(), several.extra_emas[name].ema_model.parameters()):
            assert torch.equal(a, b)
    for a, b in zip(resumed.extra_emas["ema_0.8"].ema_model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_decays_are_checked():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"sample.ema 0.1 is a post-hoc EMA length: it needs train.post_hoc_ema_sigma_rels"):
        small_config("sample.ema=0.1")
    with pytest.raises(ConfigError, match=r"sample.ema must be one of the run's EMAs \(ema_0.995, sigma_rel_0.05, "
                                          r"sigma_rel_0.1\) or a post-hoc sigma_rel, got 'ema_0.7'"):
        small_config("sample.ema=ema_0.7", "train.post_hoc_ema_sigma_rels=[0.05,0.1]")
    small_config("sample.ema=sigma_rel_0.1", "train.post_hoc_ema_sigma_rels=[0.05,0.1]")

    with pytest.raises(ConfigError, match="train.extra_ema_decays must differ"):
        small_config("train.ema_decay=0.9", "train.extra_ema_decays=[0.9]")
    with pytest.raises(ConfigError, match=r"train.extra_ema_decays must be decays in \[0, 1\)"):
        small_config("train.extra_ema_decays=[1.5]")


def test_sample_takes_an_ema_by_name_or_a_post_hoc_length_and_the_default_is_the_main_one(tmp_path, shapes16):
    """Names pick the main, an extra or a post-hoc profile's EMA; a number synthesizes that post-hoc length from
    the snapshots up to the checkpoint (here at steps 2 and 3), so an earlier checkpoint gets an earlier EMA."""
    import numpy as np

    from engine.config import ConfigError
    from engine.run_dir import load_run

    run_dir = tmp_path / "run"
    result = train(run_dir, shapes16, "train.steps=3", "train.ema_decay=0.9", "train.extra_ema_decays=[0.5]",
                   "train.ema_warmup=false", "train.post_hoc_ema_sigma_rels=[0.05,0.2]", "train.checkpoint_every=2")
    assert result.returncode == 0, result.stderr
    sampled = run("engine.sample", run_dir, "--ema", "0.1", "--num", 2, "--npz", tmp_path / "s.npz",
                  "--out", tmp_path / "s.png")
    assert sampled.returncode == 0, sampled.stderr
    assert "post-hoc EMA sigma_rel 0.1 at step 3, synthesized from 4 snapshots of sigma_rel 0.05, 0.2" in sampled.stderr
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 16, 16, 3)
    cpu = torch.device("cpu")
    models = {name: load_run(run_dir, cpu, ema=name)[0].state_dict()
              for name in ("ema_0.5", "ema_0.9", "sigma_rel_0.05", "0.05", "0.1")}
    default = load_run(run_dir, cpu)[0].state_dict()
    assert all(torch.equal(default[key], value) for key, value in models["ema_0.9"].items())  # the main EMA
    assert any(not torch.equal(models["ema_0.5"][key], value) for key, value in models["ema_0.9"].items())
    for key, value in models["sigma_rel_0.05"].items():  # synthesizing a tracked length gives it back
        torch.testing.assert_close(models["0.05"][key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(models["0.1"][key], value) for key, value in models["0.05"].items())
    early, _, step = load_run(run_dir / "checkpoints" / "step-00000002.pt", cpu, ema="0.05")
    assert step == 2 and any(not torch.allclose(early.state_dict()[key], value)
                             for key, value in models["0.05"].items())
    # sample.ema: the run's own default (a post-hoc length, as configs/cifar-fast.yaml sets); --raw still means raw
    state = torch.load(run_dir / "checkpoints" / "step-00000003.pt", weights_only=True)
    state["config"]["sample"]["ema"] = "0.1"
    torch.save(state, run_dir / "checkpoints" / "with-sample-ema.pt")
    chosen = load_run(run_dir / "checkpoints" / "with-sample-ema.pt", cpu)[0].state_dict()
    assert all(torch.equal(chosen[key], value) for key, value in models["0.1"].items())
    raw = load_run(run_dir / "checkpoints" / "with-sample-ema.pt", cpu, use_ema=False)[0].state_dict()
    assert all(torch.equal(raw[key], value) for key, value in state["model"].items())
    (run_dir / "checkpoints" / "with-sample-ema.pt").unlink()
    with pytest.raises(ConfigError, match="has no EMA 'ema_0.7'; it has ema_0.9, ema_0.5, sigma_rel_0.05, sigma_rel_0.2"):
        load_run(run_dir, cpu, ema="ema_0.7")
    with pytest.raises(ConfigError, match=r"--ema 0.9: sigma_rel must be in .* \(an EMA decay goes by its name: "
                                          r"--ema ema_0.9\)"):
        load_run(run_dir, cpu, ema="0.9")
    # killed after step 3's snapshots, before its checkpoint: the resume from step 2 writes them again, the same
    snapshot = run_dir / "post_hoc_ema" / "sigma_rel_0.2" / "step-00000003.pt"
    before = torch.load(snapshot, weights_only=True)
    (run_dir / "checkpoints" / "step-00000003.pt").unlink()
    (run_dir / "checkpoints" / "latest").unlink()
    again = train(run_dir, shapes16, "train.steps=3", "train.ema_decay=0.9", "train.extra_ema_decays=[0.5]",
                  "train.ema_warmup=false", "train.post_hoc_ema_sigma_rels=[0.05,0.2]", "train.checkpoint_every=2")
    assert again.returncode == 0, again.stderr
    assert "removed 2 post-hoc EMA snapshots after step 2" in again.stderr
    after = torch.load(snapshot, weights_only=True)
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_raw_and_ema_exclude_each_other(capsys):
    from engine.sample import parse_args

    assert parse_args(["run", "--ema", "ema_0.999"]).ema == "ema_0.999"
    with pytest.raises(SystemExit):
        parse_args(["run", "--ema", "ema_0.5", "--raw"])
    assert "not allowed with argument" in capsys.readouterr().err
