"""The images-to-quality benchmark (benchmarks/recipe.py, issue 26): recipes are the presets' recipe keys, a CPU scale
shrinks their durations with the run, each run is checkpointed at budgets doubling in images, and the images to a
target FD are interpolated between budgets. The whole path runs here at the `test` scale on procedural shapes."""

import math
import os

import numpy as np
import pytest

import forked_cli
from benchmarks import recipe as bench_recipe
from benchmarks import sample_quality
from engine.config import load_config
from engine.lr_schedule import peak_lr


def test_images_to_reach_interpolates_in_log_images_and_says_when_never():
    points = [(1000, 10.0), (2000, 6.0), (4000, 3.0), (8000, 2.5)]
    assert bench_recipe.images_to_reach(points, 6.0) == pytest.approx(2000)
    assert bench_recipe.images_to_reach(points, 4.5) == pytest.approx(math.exp((math.log(2000) + math.log(4000)) / 2))
    assert bench_recipe.images_to_reach(points, 2.0) is None
    assert bench_recipe.images_to_reach(points, 12.0) == 1000  # reached at the first budget


@pytest.mark.parametrize("name", ["quick", "protocol-quarter-batch"])  # the presets' batches, and a quarter of them
def test_a_scale_shrinks_every_duration_with_the_run_and_keeps_the_presets_recipe(name):
    scale = bench_recipe.SCALES[name]
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
    batch = next(recipe for recipe in recipes if recipe.name == "fast, paper's batch").config()
    assert batch.train.batch_size * 4 == fast.train.batch_size  # the batch policy: B and 4B
    for recipe in recipes:
        config = recipe.config()
        group = recipe.name.removeprefix("fast, paper's ")
        for name, keys in bench_recipe.RECIPE_GROUPS.items():
            for key in keys:
                expected = bench_recipe.setting(paper if name == group else fast, key)
                assert bench_recipe.setting(config, key) == expected, (recipe.name, key)


def test_an_ablation_that_only_chooses_the_weights_is_scored_on_fasts_own_run():
    run_config = load_config(bench_recipe.PRESETS["fast"], ["train.ema_decay=0.95"])
    by_name = {recipe.name: recipe for recipe in bench_recipe.ablation_recipes()}
    assert bench_recipe.sampled_weights(by_name["fast, paper's ema"], run_config) == ("--ema", "ema_0.95")
    raw = bench_recipe.Recipe("raw", "fast", ("sample.use_ema=false",))
    assert bench_recipe.sampled_weights(raw, run_config) == ("--raw",)
    for name, recipe in by_name.items():  # every other group changes the training
        if name != "fast, paper's ema":
            assert bench_recipe.sampled_weights(recipe, run_config) is None, name
    other_decay = bench_recipe.Recipe("decay", "fast", ("train.ema_decay=0.999",))
    assert bench_recipe.sampled_weights(other_decay, run_config) is None  # fast's run does not track it


def test_the_report_gives_the_ablation_against_fast_and_the_batch_table():
    fast_curve = [(6144, 9.0), (12288, 5.0), (24576, 3.0)]
    samplers = {"fast": {f"{name}|{steps}|{spacing}": 4.0 for name in ("ddim", "unipc-3")
                         for steps, spacings in bench_recipe.SAMPLER_GRID for spacing in spacings}}
    results = {"scale": vars(bench_recipe.SCALES["test"]), "floor": 0.1, "samplers": samplers,
               "curves": {"paper": {0: [(6144, 20.0), (12288, 10.0), (24576, 6.0)]}, "fast": {0: fast_curve}},
               "ablation": {"fast, paper's target": {0: [(6144, 10.0), (12288, 6.5)]},
                            "fast, paper's batch": {0: [(6144, 8.0), (12288, 5.5)]}}}
    text = bench_recipe.markdown(results)
    assert "FD at 12k images" in text and "| fast, paper's target | diffusion.target=eps | 6.50 | +1.50 |" in text
    assert "| fast, paper's batch | 8.00 | 5.50 |" in text and "| fast | 9.00 | 5.00 |" in text
    assert "| sampler | 10 linspace | 10 trailing | 20 linspace | 20 trailing | 50 trailing |" in text
    assert "| unipc-3 | 4.00 | 4.00 | 4.00 | 4.00 | 4.00 |" in text


def test_a_benchmark_stopped_after_its_main_part_has_written_that_parts_report(tmp_path, monkeypatch):
    """The report is written after each part: an EMA part that fails (a run of hours killed there) leaves the
    main table and the plot of the part before it."""
    scale = bench_recipe.SCALES["test"]
    monkeypatch.setattr(bench_recipe, "prepare_bench", lambda *args: bench_recipe.Bench(
        scale, tmp_path, tmp_path, None, jobs=1, scores={}))
    monkeypatch.setattr(bench_recipe, "curves", lambda bench, recipes, seeds: {
        "paper": {0: [(256, 20.0), (512, 9.0)]}, "fast": {0: [(256, 12.0), (512, 6.0)]}})

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_recipe, "ema_table", killed)
    with pytest.raises(KeyboardInterrupt):
        bench_recipe.run(scale, tmp_path, tmp_path, tmp_path, ["main", "ema"], [],
                         report=lambda so_far: bench_recipe.write_report(so_far, tmp_path))
    text = (tmp_path / "recipe.md").read_text()
    assert "| paper | 0 | 20.00 | 9.00 |" in text and "| fast | 0 | 12.00 | 6.00 |" in text
    assert (tmp_path / "recipe.png").stat().st_size > 0 and "EMA of" not in text


def test_the_budgets_are_the_runs_checkpoint_grid_and_a_stopped_runs_checkpoint_is_not_one(tmp_path):
    """A run stopped by SIGTERM at step 13 and resumed keeps step-13's checkpoint; the budgets stay 48, 96, 192."""
    config = load_config(bench_recipe.PRESETS["fast"], ["train.batch_size=128", "train.checkpoint_every=48"])
    (tmp_path / "config.yaml").write_text(config.to_yaml())
    (tmp_path / "checkpoints").mkdir()
    for step in (13, 48, 96, 144, 192):
        (tmp_path / "checkpoints" / f"step-{step:08d}.pt").touch()
    assert [(images, path.name) for images, path in bench_recipe.budget_checkpoints(tmp_path)] == [
        (6144, "step-00000048.pt"), (12288, "step-00000096.pt"), (24576, "step-00000192.pt")]


def test_a_run_cut_at_fewer_budgets_is_extended_but_not_one_with_other_settings():
    """train.steps only says where a run stops, so a run trained to 4 budgets goes on to 5; any other key, or the
    length of a cosine schedule, makes it another run."""
    def resolved(*overrides):
        return load_config(bench_recipe.PRESETS["fast"], list(overrides)).to_dict()
    assert bench_recipe.same_run(resolved("train.steps=384"), resolved("train.steps=768"))
    assert not bench_recipe.same_run(resolved("train.steps=384"), resolved("train.steps=768", "optim.lr=2e-3"))
    cosine = "optim.lr_schedule=cosine,optim.warmup_steps=10".split(",")
    assert not bench_recipe.same_run(resolved("train.steps=384", *cosine), resolved("train.steps=768", *cosine))
    assert bench_recipe.same_run(resolved("train.steps=768", *cosine), resolved("train.steps=768", *cosine))


def test_a_missing_cifar_archive_is_one_line_and_status_2(tmp_path, capsys):
    missing = tmp_path / "cifar.tar.gz"
    assert bench_recipe.main(["--cifar", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing} not found (pass --cifar PATH to the CIFAR-10 image-folder tar.gz)"
    assert not (tmp_path / "out").exists()


class PixelMeans:
    """A stand-in for the classifier's FD: the distance of the images' channel means from a grey target."""

    def __call__(self, images: np.ndarray) -> dict:
        return {"fd": float(np.abs(images.mean((0, 1, 2)) / 255 - 0.5).sum())}


def test_the_benchmark_launches_a_cli_in_a_fresh_interpreter_appending_to_its_log(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("before\n")
    result = sample_quality.launch("engine.train", ["--help"], dict(os.environ), log)
    assert result.returncode == 0 and result.stdout is None  # it went to the log
    assert log.read_text().startswith("before\nusage: ")


@pytest.mark.slow
def test_the_benchmark_trains_presets_at_budgets_and_scores_each(tmp_path, shapes16):
    """Both presets trained at the test scale from their files (post-hoc EMA synthesized at each budget for fast),
    scored at every budget; the scores are kept, so a second pass samples nothing. One job at a time: the CLIs are
    forked from the benchmark's worker thread, with no other thread of the benchmark's running."""
    scale = bench_recipe.SCALES["test"]
    bench = bench_recipe.Bench(scale, tmp_path, shapes16, PixelMeans(), jobs=1, scores={}, launch=forked_cli.launch)
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
