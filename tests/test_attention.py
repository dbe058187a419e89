"""The attention backends agree with the explicit reference, and unavailable ones fall back loudly."""

import warnings

import pytest
import torch

from engine import attention as attention_module
from engine.attention import ATTENTION_BACKENDS, attention, resolve_attention_backend


@pytest.mark.parametrize("batch, heads, length, head_dim", [(2, 1, 256, 256), (2, 4, 64, 32), (3, 8, 49, 16)])
def test_sdpa_matches_math(batch, heads, length, head_dim):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g) for _ in range(3))
    reference = attention(q, k, v, "math")
    assert reference.shape == (batch, heads, length, head_dim)
    torch.testing.assert_close(attention(q, k, v, "sdpa"), reference, rtol=1e-5, atol=1e-5)


def test_math_is_softmax_of_scaled_scores():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v
    torch.testing.assert_close(attention(q, k, v, "math"), expected)


def test_math_keeps_the_input_dtype():
    q = k = v = torch.randn(1, 1, 4, 8).bfloat16()
    assert attention(q, k, v, "math").dtype == torch.bfloat16


def test_xformers_on_cpu_falls_back_to_sdpa_with_one_warning():
    attention_module._warn_once.cache_clear()  # another test may already have warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_attention_backend("xformers", "cpu") == "sdpa"
        assert resolve_attention_backend("xformers", torch.device("cpu")) == "sdpa"
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1
    assert "'xformers'" in messages[0] and "'sdpa'" in messages[0]


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_always_available_backends_resolve_to_themselves_silently(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_attention_backend(backend, "cpu") == backend


def test_unknown_backend_raises_naming_the_valid_ones():
    with pytest.raises(ValueError, match="flash") as error:
        resolve_attention_backend("flash", "cpu")
    assert all(name in str(error.value) for name in ATTENTION_BACKENDS)
