"""Config loading: presets, overrides, and one clear line for every mistake."""

from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from forked_cli import run_module

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_preset_loads_and_validates():
    assert {p.stem for p in PRESETS} >= {"cifar", "tiny", "mnist"}
    for path in PRESETS:
        config = load_config(path)
        assert config.train.run_dir == f"runs/{path.stem}"


def test_cifar_preset_is_the_ddpm_paper_setup():
    c = load_config(ROOT / "configs" / "cifar.yaml")
    assert (c.model.base_channels, c.model.channel_mult, c.model.num_res_blocks) == (128, [1, 2, 2, 2], 2)
    assert (c.model.attention_resolutions, c.model.dropout) == ([16], 0.1)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.beta_start, c.diffusion.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert (c.optim.name, c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip) == ("adam", 2e-4, 5000, 1.0)
    assert (c.train.batch_size, c.train.ema_decay, c.data.random_flip) == (128, 0.9999, True)
    assert (c.sample.sampler, c.sample.variance) == ("ddpm", "fixed_large")


def test_overrides_reach_any_field_with_yaml_types(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml",
                         ["optim.lr=1e-3", "model.channel_mult=[1,2]", "model.attention_resolutions=[16]", "train.compile=true", "train.run_dir=x/y",
                          "sample.steps=10", "sample.sampler=ddim"])
    assert config.optim.lr == 1e-3 and config.model.channel_mult == [1, 2]
    assert config.train.compile is True and config.train.run_dir == "x/y" and config.sample.steps == 10


@pytest.mark.parametrize("text, overrides, expected", [
    ("model:\n  chanel_mult: [1, 2]\n", [], "unknown key 'model.chanel_mult'; did you mean 'model.channel_mult'?"),
    ("modle:\n  base_channels: 32\n", [], "unknown key 'modle'; did you mean 'model'?"),
    ("", ["train.stpes=10"], "unknown key 'train.stpes'; did you mean 'train.steps'?"),
    ("optim:\n  lr: -0.1\n", [], "optim.lr must be positive"),
    ("optim:\n  lr: fast\n", [], "optim.lr must be a number"),
    ("train:\n  steps: 1.5\n", [], "train.steps must be an integer"),
    ("train:\n  compile: 1\n", [], "train.compile must be true or false"),
    ("diffusion:\n  beta_start: 0.02\n  beta_end: 0.01\n", [], "diffusion.beta_end must be greater than diffusion.beta_start"),
    ("diffusion:\n  schedule: cosin\n", [], "did you mean 'cosine'"),
    ("data:\n  image_size: 30\n", [], "data.image_size (30) must be divisible by the UNet's downsampling factor 8"),
    ("model:\n  attention_resolutions: [12]\n", [], "model.attention_resolutions contains 12"),
    ("sample:\n  sampler: ddpm\n  steps: 50\n", [], "sample.steps applies to ddim and the solvers"),
    ("model: [1, 2]\n", [], "'model' must be a mapping"),
    ("model:\n  base_channels: [32\n", [], "malformed YAML"),
    ("", ["kernels.q_sampel=triton"], "unknown key 'kernels.q_sampel'; did you mean 'kernels.q_sample'?"),
    ("kernels:\n  noise_loss: ''\n", [], "kernels.noise_loss must name an implementation"),
    ("", ["train.seed=2147483648"], "train.seed must be in [0, 2**31)"),
])
def test_config_mistakes_name_the_key_and_file(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    message = str(caught.value)
    assert expected in message
    assert str(path) in message or "override" in message
    assert "\n" not in message


def test_bad_override_syntax_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(write(tmp_path, ""), ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps is a single value, not a section"):
        load_config(write(tmp_path, ""), ["train.steps.x=1"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_cli_config_error_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, "optim:\n  lr: -1\n")
    result = run_module("engine.train", [path, "--dry-run"], cwd=ROOT, timeout=600)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lr must be positive" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.stderr


def test_the_kernels_section_has_one_field_per_op():
    import dataclasses

    from engine.config import KernelsConfig
    from kernels import OPS

    assert [f.name for f in dataclasses.fields(KernelsConfig)] == [*OPS, "plugins", "check"]


def test_a_preset_with_a_base_replaces_its_keys_one_by_one(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "parent.yaml").write_text("model:\n  base_channels: 64\n  dropout: 0.2\ntrain:\n  steps: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: presets/parent.yaml\nmodel:\n  dropout: 0.3\n")
    config = load_config(child, ["train.steps=9"])
    assert (config.model.base_channels, config.model.dropout, config.train.steps) == (64, 0.3, 9)
    assert config.train.run_dir == str(Path("runs") / "child")


def test_the_conditional_cifar_preset_is_the_cifar_preset_with_classes_and_label_dropout():
    plain, conditional = load_config(ROOT / "configs" / "cifar.yaml"), load_config(ROOT / "configs" / "cifar-cond.yaml")
    changed = {(section, key) for section, values in plain.to_dict().items() for key, value in values.items()
               if conditional.to_dict()[section][key] != value}
    assert changed == {("model", "num_classes"), ("model", "label_dropout"), ("train", "run_dir")}
    assert (conditional.model.num_classes, conditional.model.label_dropout) == (10, 0.1)


@pytest.mark.parametrize("text,message", [("base: nowhere.yaml\n", "nowhere.yaml: cannot read config file"),
                                          ("base: loop.yaml\n", "base presets form a cycle"),
                                          ("base: [a]\n", "base must name a preset file"),
                                          ("base: ok.yaml\nmodel:\n  dropuot: 0.1\n", "unknown key 'model.dropuot'")])
def test_bad_base_presets_are_one_clear_error(tmp_path, text, message):
    (tmp_path / "ok.yaml").write_text("model:\n  dropout: 0.2\n")
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "loop.yaml")
