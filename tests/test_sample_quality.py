"""The sample-quality guard (issue 12): at equal architecture, data and budget, our samples are not worse
than diffusers', both trained in this test from the same seed and scored by benchmarks/sample_quality.py's
measure (the Fréchet distance in a small CIFAR-10 classifier's features, against held-out images)."""

import pytest

from benchmarks import sample_quality

pytestmark = pytest.mark.slow
THEIRS = "diffusers model, diffusers DDIM"
OURS = "ours model, engine.sample now (network's eps)"
# The FD spread between training seeds at this size (benchmarks/RESULTS.md: seeds 0-2 of both models).
RUN_TO_RUN_SPREAD = 1.0


@pytest.mark.skipif(not sample_quality.DEFAULT_CIFAR.exists(), reason="needs ../shared/data/cifar10-train.tar.gz")
def test_our_samples_are_at_least_as_good_as_diffusers_at_equal_budget(tmp_path):
    pytest.importorskip("diffusers")
    preset = sample_quality.PRESETS["test"]
    results = sample_quality.run(preset, sample_quality.DEFAULT_CIFAR, tmp_path / "out", tmp_path / "cache",
                                 seed=0, rows=[THEIRS, OURS], compare=False)
    assert results["classifier_accuracy"] > 0.4, "the feature network must tell CIFAR-10 classes apart"
    assert results["real_floor"]["fd"] < 0.25 * results["rows"][THEIRS]["fd"], "the measure must separate real images"
    ours, theirs = results["rows"][OURS]["fd"], results["rows"][THEIRS]["fd"]
    assert ours <= theirs + RUN_TO_RUN_SPREAD, f"ours {ours} vs diffusers {theirs}: {results['rows']}"
