"""Each list of names is written once; the typed copies that must spell it out are held to it."""

import dataclasses
import typing

from engine import sample, solvers
from engine.config import EvalConfig, KernelsConfig, SampleConfig
from kernels.ops import OPS
from kernels.registry import Kernels


def field_names(cls) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def test_kernels_has_one_field_per_op_in_the_order_of_ops():
    assert field_names(Kernels) == [*OPS, "names"]


def test_the_kernels_config_section_has_one_key_per_op_in_the_order_of_ops():
    assert field_names(KernelsConfig) == [*OPS, "plugins", "check"]


def test_config_sampler_keys_accept_exactly_the_sampler_names():
    for section in (SampleConfig, EvalConfig):
        assert typing.get_args(typing.get_type_hints(section)["sampler"]) == solvers.SAMPLERS, section.__name__


def test_the_sample_cli_takes_every_sampler_name():
    for sampler in solvers.SAMPLERS:
        assert sample.parse_args(["runs/x", "--sampler", sampler]).sampler == sampler
