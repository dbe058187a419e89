"""The images-to-quality benchmark (benchmarks/recipe.py, issue 26): recipes are the presets' recipe keys, a CPU scale
shrinks their durations with the run, each run is checkpointed at budgets doubling in images, and the images to a
target FD are interpolated between budgets. The whole path runs here at the `test` scale on procedural shapes."""

import math

import numpy as np
import pytest

from benchmarks import recipe as bench_recipe
from engine.config import load_config
from engine.lr_schedule import peak_lr


def test_images_to_reach_interpolates_in_log_images_and_says_when_never():
    points = [(1000, 10.0), (2000, 6.0), (4000, 3.0), (8000, 2.5)]
    assert bench_recipe.images_to_reach(points, 6.0) == pytest.approx(2000)
    assert bench_recipe.images_to_reach(points, 4.5) == pytest.approx(math.exp((math.log(2000) + math.log(4000)) / 2))
    assert bench_recipe.images_to_reach(points, 2.0) is None
    assert bench_recipe.images_to_reach(points, 12.0) == 1000  # reached at the first budget


def test_a_scale_shrinks_every_duration_with_the_run_and_keeps_the_presets_recipe():
    scale = bench_recipe.SCALES["quick"]
    shrink = scale.images / bench_recipe.PAPER_IMAGES
    paper = dict(o.split("=", 1) for o in bench_recipe.scaled_overrides(bench_recipe.Recipe("paper", "paper"), scale))
    batch = int(paper["train.batch_size"])
    assert batch == 128 // scale.batch_divisor and int(paper["train.steps"]) * batch == scale.images
    assert int(paper["optim.warmup_steps"]) == round(5000 * 128 * shrink / batch)
    # EMA 0.9999 at batch 128: a half-life of 6,931 steps, 887k images, shrunk
    half_life = math.log(0.5) / math.log(float(paper["train.ema_decay"])) * batch
    assert half_life == pytest.approx(math.log(0.5) / math.log(0.9999) * 128 * shrink, rel=1e-3)
    fast_recipe = bench_recipe.Recipe("fast", "fast")
    fast = dict(o.split("=", 1) for o in bench_recipe.scaled_overrides(fast_recipe, scale))
    full = fast_recipe.config()
    assert int(fast["optim.lr_ref_steps"]) == round(full.optim.lr_ref_steps * full.train.batch_size * shrink
                                                    / int(fast["train.batch_size"]))
    at_scale = load_config(bench_recipe.PRESETS["fast"], [f"{k}={v}" for k, v in fast.items()])
    assert peak_lr(at_scale) == pytest.approx(peak_lr(full) * (scale.batch_divisor ** -0.5 if full.optim.lr_scaling == "sqrt"
                                                              else 1.0))


def test_the_ablation_sets_back_one_group_of_keys_at_a_time():
    fast, paper = bench_recipe.Recipe("fast", "fast").config(), bench_recipe.Recipe("paper", "paper").config()
    recipes = bench_recipe.ablation_recipes()
    assert len(recipes) > 1, "the fast preset differs from the paper's"
    *set_back, larger = recipes
    assert larger.name == f"fast at batch {4 * fast.train.batch_size}"
    assert larger.config().train.batch_size == 4 * fast.train.batch_size  # the batch policy's 4x
    for recipe in set_back:
        config = recipe.config()
        group = recipe.name.removeprefix("fast, paper's ")
        for name, keys in bench_recipe.RECIPE_GROUPS.items():
            for key in keys:
                expected = bench_recipe.setting(paper if name == group else fast, key)
                assert bench_recipe.setting(config, key) == expected, (recipe.name, key)


class PixelMeans:
    """A stand-in for the classifier's FD: the distance of the images' channel means from a grey target."""

    def __call__(self, images: np.ndarray) -> dict:
        return {"fd": float(np.abs(images.mean((0, 1, 2)) / 255 - 0.5).sum())}


@pytest.mark.slow
def test_the_benchmark_trains_presets_at_budgets_and_scores_each(tmp_path, shapes16):
    """Both presets trained at the test scale from their files (post-hoc EMA synthesized at each budget for fast),
    scored at every budget; the scores are kept, so a second pass samples nothing."""
    scale = bench_recipe.SCALES["test"]
    bench = bench_recipe.Bench(scale, tmp_path, shapes16, PixelMeans(), jobs=2, scores={})
    recipes = [bench_recipe.Recipe("paper", "paper"), bench_recipe.Recipe("fast", "fast")]
    curves = bench_recipe.curves(bench, recipes, (0,))
    for name in ("paper", "fast"):
        points = curves[name][0]
        assert [images for images, _ in points] == [256, 512]
        assert all(np.isfinite(fd) for _, fd in points)
    assert len(bench.scores) == 4 and (tmp_path / "scores.json").is_file()
    results = {"scale": vars(scale), "floor": 0.0, "curves": curves, "ablation": {}, "samplers": {}}
    found = bench_recipe.summary(results)
    assert found["target"] == pytest.approx(curves["paper"][0][-1][1])
    assert found["reach"]["paper"]["per_seed"][0] is not None
    text = bench_recipe.markdown(results)
    assert "| paper | 0 |" in text and "| fast | 0 |" in text
    bench_recipe.plot(results, tmp_path / "recipe.png")
    assert (tmp_path / "recipe.png").stat().st_size > 0
    bench.measure = None  # a score asked for again would fail: they come from scores.json
    assert bench_recipe.curves(bench, recipes, (0,)) == curves
