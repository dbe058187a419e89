"""Fuzzing the config loader: whatever the YAML or the override, a clear one-line ConfigError or a valid config.

Seeded random mutations of the presets: wrong types, out-of-range numbers, unknown keys, sections
replaced by scalars, malformed YAML. Never a traceback from deep inside the engine.
"""

import dataclasses
import math
import random
import typing
from pathlib import Path

import pytest
import yaml

from engine.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
ODD_VALUES = [None, "", "text", "1e400", -1, 0, 2**70, -2**70, 1.5, -0.5, float("nan"), float("inf"), True, [], [1, "a"],
              {}, {"nested": 1}, "[1, 2", "{a: 1"]
GARBAGE_YAML = ["model: [1, 2\n", "model:\n\tbase_channels: 1\n", "- a\n- b\n", "just a string", "model: {base: }}\n",
                ":\n", "model:\n  base_channels: !!python/object:os.system 1\n", "\x00\x01", "a: b: c\n"]


def _fields() -> list[str]:
    """Every section.key of the config."""
    hints = typing.get_type_hints(Config)
    return [f"{section.name}.{field.name}" for section in dataclasses.fields(Config)
            for field in dataclasses.fields(hints[section.name])]


def _check(path: Path, overrides: list[str]) -> None:
    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        message = str(error)
        assert message and "\n" not in message, message
        assert str(path) in message or "override" in message, message
        return
    # any other exception fails the test with its traceback; what loads holds no NaN or infinity
    numbers = [value for section in config.to_dict().values() for value in section.values()
               if isinstance(value, float)]
    assert all(math.isfinite(value) for value in numbers), overrides


@pytest.mark.parametrize("seed", range(6))
def test_random_overrides_give_a_valid_config_or_a_one_line_error(tmp_path, seed):
    rng = random.Random(seed)
    fields = _fields()
    preset = ROOT / "configs" / rng.choice(["cifar.yaml", "tiny.yaml", "mnist.yaml"])
    for _ in range(120):
        overrides = []
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(fields + ["model.nonsense", "nonsense.key", "train", "kernels.q_sample.deeper"])
            overrides.append(f"{key}={yaml.safe_dump(rng.choice(ODD_VALUES), default_flow_style=True).strip()}"
                             if rng.random() < 0.8 else f"{key}={rng.choice(['[1, 2', '{a: 1', ':', '&x', '*x'])}")
        _check(preset, overrides)


@pytest.mark.parametrize("seed", range(4))
def test_random_config_files_give_a_valid_config_or_a_one_line_error(tmp_path, seed):
    rng = random.Random(seed)
    base = yaml.safe_load((ROOT / "configs" / "cifar.yaml").read_text())
    path = tmp_path / "fuzzed.yaml"
    for _ in range(80):
        raw = yaml.safe_load(yaml.safe_dump(base))
        for _ in range(rng.randint(1, 3)):
            section = rng.choice(list(raw) + ["kernels", "extra_section"])
            if rng.random() < 0.15:
                raw[section] = rng.choice(ODD_VALUES)  # a section replaced by a scalar or list
                continue
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            key = rng.choice(list(raw[section]) + ["unknown_key"]) if raw[section] else "unknown_key"
            raw[section][key] = rng.choice(ODD_VALUES)
        path.write_text(yaml.safe_dump(raw) if rng.random() < 0.9 else rng.choice(GARBAGE_YAML))
        _check(path, [])
