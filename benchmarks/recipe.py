"""Images to a sample quality, per training recipe (issue 26): train each recipe, score it at several budgets.

    python -m benchmarks.recipe                      # quick scale: 16x16 CIFAR-10, a 1.1M-parameter UNet, every part
    python -m benchmarks.recipe --scale protocol     # 32x32 at issue 12's model size (2.2M parameters): main, ema
    python -m benchmarks.recipe --scale protocol-long  # the same at 4x the images (393k; hours per run)
    python -m benchmarks.recipe --scale protocol-quarter-batch  # protocol's images at a quarter of every batch
    python -m benchmarks.recipe --recipe hot=fast,optim.lr=3e-3 --parts main   # any recipe: a preset and changes

A recipe is a preset's recipe keys (`RECIPE_GROUPS`): `paper` is configs/cifar.yaml (the DDPM paper's recipe),
`fast` configs/cifar-fast.yaml. A CPU scale trains it with its own small UNet, on CIFAR-10 images box-filtered
to its size, for far fewer images than the paper's 102.4 million; so that the run is the same run compressed,
every duration tied to its length shrinks by the scale's share of the paper's images: the warmup, EDM2's t_ref
and the EMA half-life (a fixed decay's; post-hoc EMA lengths are relative already). The batch is the preset's
(divided by the scale's `batch_divisor`), its learning rate set by the preset's own scaling rule, and every
recipe trains for the same images. Each run is `python -m engine.train` from the preset file with these
overrides, so the benchmark trains the engine's own code path.

Each run is checkpointed at budgets spaced by factors of two in images seen, and each checkpoint is scored by
`engine.sample` (the weights of the recipe's `sample.ema`, DDIM 50 steps eta 0, the same images' noise for every
recipe) with the Fréchet distance in the features of `benchmarks/sample_quality.py`'s CIFAR-10 classifier
against 5,000 held-out images. The parts (`--parts`):

- main: paper and fast, every seed of the scale: FD against images, and the images each recipe needs to reach the
  paper's final FD (the mean over seeds), interpolated in log(images) between budgets;
- ema: the last checkpoints of paper and fast (seed 0) with the raw weights, the run's own EMA and, where the run
  tracks post-hoc profiles, a sweep of post-hoc lengths (how fast's `sample.ema` is chosen, as EDM2 does);
- ablation: fast with one group of its recipe keys set back to the paper's at a time (seed 0), up to the scale's
  `ablation_budgets` (a run's first budgets are the same run however long it goes on: every duration is set by
  the scale, not the run's length); a group that only chooses the weights sampled (the EMA) is fast's own run
  scored with the paper's choice;
- samplers: the last checkpoints of paper and fast (seed 0) through DDIM, DPM-Solver++(2M, 3M) and UniPC
  (orders 2, 3) at 10 and 20 steps with linspace and trailing spacing, and at 50 with trailing.

The batch policy is the ablation's batch row against fast: fast at the paper's batch of 128 (B) and its own 512 (4B)
at equal images, the learning rate by fast's rule.
OUT gets recipe.md (the tables), recipe.json, recipe.png (FD against images), the runs and their samples, the
report written again after each part; an interrupted benchmark resumes (training resumes its runs; finished
scores are kept in scores.json). Needs ../shared/data/cifar10-train.tar.gz (or --cifar); `--jobs` runs that many
trainings or samplings at once, one thread each (default 2: one per core of a 2-core machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.sample_quality import (DEFAULT_CACHE, DEFAULT_CIFAR, QualityMeasure, cifar_missing, feature_net,
                                       launch, load_cifar, split, write_engine_data)
from engine.config import Config, load_config
from engine.ema import ema_name

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"paper": ROOT / "configs" / "cifar.yaml", "fast": ROOT / "configs" / "cifar-fast.yaml"}
PAPER_IMAGES = 800_000 * 128  # the DDPM paper's run: what a scale's durations are shrunk from
# The recipe: every key that is not the architecture, the data or the bookkeeping, in groups that the ablation
# sets back to the paper's one at a time
RECIPE_GROUPS = {
    "target": ["diffusion.target", "diffusion.sigma_data"],
    "noise levels": ["diffusion.timestep_sampling", "diffusion.lognormal_mean", "diffusion.lognormal_std"],
    "schedule": ["diffusion.schedule", "diffusion.beta_start", "diffusion.beta_end"],
    "loss weighting": ["diffusion.loss_weighting", "diffusion.min_snr_gamma", "diffusion.p2_k", "diffusion.p2_gamma"],
    "learning rate": ["optim.lr", "optim.lr_scaling", "optim.reference_batch_size"],
    "lr schedule": ["optim.lr_schedule", "optim.lr_ref_steps", "optim.warmup_steps"],
    "adam": ["optim.name", "optim.betas", "optim.eps", "optim.weight_decay", "optim.grad_clip"],
    "ema": ["train.ema_decay", "train.ema_warmup", "train.post_hoc_ema_sigma_rels", "sample.ema", "sample.use_ema"],
    "batch": ["train.batch_size"],
}
POST_HOC_SWEEP = (0.03, 0.05, 0.08, 0.1, 0.13, 0.16, 0.2)  # sigma_rel
PARTS = ["main", "ema", "ablation", "samplers"]
SAMPLERS = [("ddim", {}), ("dpm++2m", {}), ("dpm++3m", {}), ("unipc", {"unipc_order": 2}), ("unipc", {"unipc_order": 3})]
# (steps, spacings): at 50 steps the spacing moves little (the grids nearly agree), so trailing only
SAMPLER_GRID = [(10, ("linspace", "trailing")), (20, ("linspace", "trailing")), (50, ("trailing",))]


@dataclasses.dataclass(frozen=True)
class Scale:
    image_size: int
    model: tuple[str, ...]  # the UNet's overrides
    first_budget: int  # images at the first checkpoint; each next one doubles
    budgets: int
    seeds: tuple[int, ...]
    batch_divisor: int = 1  # the preset's batch / this
    num_images: int = 500  # generated per score
    ddim_steps: int = 50
    ablation_budgets: int | None = None  # the ablation's runs stop here (None: at the last budget)

    @property
    def images(self) -> int:
        return self.first_budget * 2 ** (self.budgets - 1)


SMALL_UNET = ("model.base_channels=32", "model.channel_mult=[1,2,2]", "model.num_res_blocks=1",
              "model.attention_resolutions=[8]", "model.dropout=0.1")
PROTOCOL_UNET = ("model.base_channels=32", "model.channel_mult=[1,2,2,2]", "model.num_res_blocks=2",
                 "model.attention_resolutions=[16]", "model.dropout=0.1")  # issue 12's protocol
SCALES = {
    "quick": Scale(16, SMALL_UNET, first_budget=6144, budgets=6, seeds=(0, 1), ablation_budgets=5),
    "protocol": Scale(32, PROTOCOL_UNET, first_budget=6144, budgets=5, seeds=(0,)),
    # 4x protocol's images: 768 steps at batch 512, the steps fast at batch 128 takes at protocol (hours per run)
    "protocol-long": Scale(32, PROTOCOL_UNET, first_budget=6144, budgets=7, seeds=(0,)),
    # protocol's images, every preset's batch / 4 (paper 32, fast 128): 4x the steps of both at protocol's cost, so
    # that fast's recipe takes 768 steps, not 192; the batch ratio, the learning-rate rules, durations in images kept
    "protocol-quarter-batch": Scale(32, PROTOCOL_UNET, first_budget=6144, budgets=5, seeds=(0,), batch_divisor=4),
    # tests/test_recipe_benchmark.py's: seconds
    "test": Scale(16, ("model.base_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
                       "model.attention_resolutions=[]", "model.dropout=0.0"), first_budget=256, budgets=2,
                  seeds=(0,), batch_divisor=16, num_images=64, ddim_steps=5, ablation_budgets=1),
}


# ----------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    preset: str  # a key of PRESETS
    changes: tuple[str, ...] = ()  # key=value, in the preset's (full-scale) terms

    def config(self) -> Config:
        return load_config(PRESETS[self.preset], list(self.changes))


def parse_recipe(text: str) -> Recipe:
    """NAME=PRESET[,key=value...], e.g. hot=fast,optim.lr=3e-3."""
    name, _, rest = text.partition("=")
    preset, *changes = rest.split(",")
    if not name or preset not in PRESETS:
        raise argparse.ArgumentTypeError(f"expected NAME=PRESET[,key=value...] with PRESET one of {', '.join(PRESETS)}, "
                                         f"got {text!r}")
    return Recipe(name, preset, tuple(changes))


def setting(config: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def formatted(value) -> str:
    return json.dumps(value) if isinstance(value, (list, str)) and not isinstance(value, str) else str(value)


def ablation_recipes() -> list[Recipe]:
    """fast with each group of recipe keys in which it differs from paper set back to paper's (the batch group's is
    the batch policy: the paper's batch and fast's, the learning rate by fast's rule)."""
    fast, paper = Recipe("fast", "fast").config(), Recipe("paper", "paper").config()
    recipes = []
    for group, keys in RECIPE_GROUPS.items():
        differing = [key for key in keys if setting(fast, key) != setting(paper, key)]
        if differing:
            changes = tuple(f"{key}={formatted(setting(paper, key))}" for key in differing)
            recipes.append(Recipe(f"fast, paper's {group}", "fast", changes))
    return recipes


def sampled_weights(recipe: Recipe, run_config: Config) -> tuple[str, ...] | None:
    """`engine.sample`'s options for a recipe that differs from fast only in the weights it samples (the same
    training, the same EMA decay tracked), to score fast's run `run_config` as it; None: the recipe trains."""
    changed = {change.split("=", 1)[0] for change in recipe.changes}
    if recipe.preset != "fast" or not changed or not changed <= set(RECIPE_GROUPS["ema"]) - {"train.ema_decay"}:
        return None
    config = recipe.config()
    if not config.sample.use_ema:
        return ("--raw",)
    return ("--ema", config.sample.ema or ema_name(run_config.train.ema_decay))


def ema_decay_at_scale(decay: float, full_batch: int, batch: int, shrink: float) -> float:
    """The decay whose half-life, in images, is `decay`'s at `full_batch` times `shrink`."""
    if decay == 0:
        return 0.0
    half_life_images = math.log(0.5) / math.log(decay) * full_batch * shrink
    return 0.5 ** (batch / half_life_images)


def scaled_batch(config: Config, scale: Scale) -> int:
    return config.train.batch_size // scale.batch_divisor


def scaled_overrides(recipe: Recipe, scale: Scale) -> list[str]:
    """The overrides that train `recipe` at `scale`: its model and size, its batch, its durations shrunk."""
    config = recipe.config()
    full_batch, batch = config.train.batch_size, scaled_batch(config, scale)
    if scale.first_budget % batch:
        raise ValueError(f"{recipe.name}: batch {batch} does not divide the first budget ({scale.first_budget} images)")
    shrink = scale.images / PAPER_IMAGES

    def steps(full_steps: int) -> int:
        return max(1, round(full_steps * full_batch * shrink / batch))

    optim = config.optim
    return [*recipe.changes, *scale.model, f"data.image_size={scale.image_size}", f"train.batch_size={batch}",
            f"train.steps={scale.images // batch}", f"optim.warmup_steps={steps(optim.warmup_steps) if optim.warmup_steps else 0}",
            f"optim.lr_ref_steps={steps(optim.lr_ref_steps)}",
            f"train.ema_decay={ema_decay_at_scale(config.train.ema_decay, full_batch, batch, shrink):.6g}",
            "train.ema_warmup=false", "train.extra_ema_decays=[]"]


# ----------------------------------------------------------------------------- training and scoring


@dataclasses.dataclass
class Bench:
    scale: Scale
    out: Path
    data: Path
    measure: QualityMeasure
    jobs: int
    scores: dict  # "run|checkpoint|sampler" -> FD, saved as it grows
    floor: float = 0.0  # real training images against the held-out ones
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    launch: Callable[..., subprocess.CompletedProcess] = launch  # how engine.train and engine.sample are run

    def environment(self) -> dict:
        threads = "1" if self.jobs > 1 else os.environ.get("OMP_NUM_THREADS", "")
        return {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}

    def save_scores(self) -> None:
        with self.lock:
            (self.out / "scores.json").write_text(json.dumps(self.scores, indent=1, sort_keys=True))


def run_name(recipe: Recipe, seed: int) -> str:
    return f"{recipe.name.replace(' ', '_').replace(',', '').replace(chr(39), '')}-seed{seed}"


def run_path(bench: Bench, recipe: Recipe, seed: int = 0) -> Path:
    return bench.out / "runs" / run_name(recipe, seed)


def last_checkpoint(bench: Bench, recipe: Recipe) -> Path:
    """The last budget's checkpoint of the recipe's seed-0 run."""
    return budget_checkpoints(run_path(bench, recipe))[-1][1]


def train_run(bench: Bench, recipe: Recipe, seed: int, budgets: int | None = None) -> Path:
    """`python -m engine.train PRESET` at the scale, a checkpoint at every multiple of the first budget (resumes);
    with `budgets`, it stops at that many (the same run as the whole one up to there)."""
    scale, run_dir = bench.scale, run_path(bench, recipe, seed)
    overrides = scaled_overrides(recipe, scale)
    every = scale.first_budget // scaled_batch(recipe.config(), scale)
    if budgets:
        overrides = [o for o in overrides if not o.startswith("train.steps=")]
        overrides.append(f"train.steps={every * 2 ** (budgets - 1)}")
    # the same sample settings for every recipe, whatever its preset says
    args = [str(PRESETS[recipe.preset]), *overrides, f"data.path={bench.data}", f"train.run_dir={run_dir}",
            f"train.seed={seed}", "train.device=cpu", "data.cache=device", f"train.checkpoint_every={every}",
            "train.keep_checkpoints=100000", f"train.post_hoc_ema_every={every}", f"train.log_every={every}",
            "train.sample_every=0", "eval.every=0", "eval.val_every=0", "sample.num_images=16", "sample.batch_size=16",
            "sample.sampler=ddim", "sample.steps=10", "sample.timestep_spacing=linspace"]
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded, resolved = run_dir / "benchmark-config.json", load_config(args[0], args[1:]).to_dict()
    if recorded.exists() and not same_run(json.loads(recorded.read_text()), resolved):  # a preset changed since
        raise RuntimeError(f"{run_dir} was trained with other settings ({recorded}); delete it, or pass another --out")
    recorded.write_text(json.dumps(resolved))
    log = run_dir.parent / f"{run_dir.name}.log"
    result = bench.launch("engine.train", args, bench.environment(), log)
    if result.returncode != 0:
        raise RuntimeError(f"training {run_dir.name} failed ({result.returncode}); see {log}")
    return run_dir


def same_run(recorded: dict, resolved: dict) -> bool:
    """Whether a run trained with the `recorded` settings goes on as `resolved`: train.steps only says where it
    stops (a run cut at fewer budgets is extended), unless a cosine schedule decays to it."""
    if resolved["optim"]["lr_schedule"] != "cosine":
        recorded, resolved = ({**c, "train": {**c["train"], "steps": 0}} for c in (recorded, resolved))
    return recorded == resolved


def budget_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(images seen, checkpoint) at each budget: the first budget's step (the run's checkpoint_every) times 1, 2,
    4, ...; a checkpoint off that grid (a stopped run's, e.g. after SIGTERM) is not a budget."""
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    steps = [int(path.stem.removeprefix("step-")) for path in checkpoints]
    config = load_config(run_dir / "config.yaml")
    first = config.train.checkpoint_every
    return [(step * config.train.batch_size, path) for step, path in zip(steps, checkpoints)
            if step > 0 and step % first == 0 and (step // first) & (step // first - 1) == 0]


def score(bench: Bench, checkpoint: Path, sampler: str = "ddim", steps: int | None = None,
          options: tuple[str, ...] = ()) -> float:
    """FD of `scale.num_images` images of the checkpoint's `sample.ema` weights through `engine.sample`."""
    steps = steps or bench.scale.ddim_steps
    key = f"{checkpoint.relative_to(bench.out)}|{sampler}|{steps}|{','.join(options)}"
    if key in bench.scores:
        return bench.scores[key]
    npz = bench.out / "samples" / f"{key.replace('/', '_').replace('|', '_').replace(',', '_')}.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    args = [str(checkpoint), *options, "--sampler", sampler, "--steps", str(steps), "--eta", "0", "--num-images",
            str(bench.scale.num_images), "--batch-size", "250", "--seed", "0", "--device", "cpu", "--precision", "fp32",
            "--no-compile", "--grid-size", "64", "--out", str(npz.with_suffix(".png")), "--npz", str(npz)]
    result = bench.launch("engine.sample", args, bench.environment())
    if result.returncode != 0:
        raise RuntimeError(f"engine.sample {checkpoint} failed:\n{result.stderr[-2000:]}")
    with np.load(npz) as saved:
        fd = bench.measure(saved["arr_0"])["fd"]
    with bench.lock:
        bench.scores[key] = fd
    bench.save_scores()
    return fd


def curve(bench: Bench, run_dir: Path, options: tuple[str, ...] = (), budgets: int | None = None) -> list[tuple[int, float]]:
    """(images seen, FD) at every budget of a run (the first `budgets`), `options` to `engine.sample`."""
    checkpoints = budget_checkpoints(run_dir)[:budgets]
    fds = score_all(bench, [(checkpoint, {"options": options}) for _, checkpoint in checkpoints])
    return [(images, fd) for (images, _), fd in zip(checkpoints, fds)]


def score_all(bench: Bench, tasks: list[tuple[Path, dict]]) -> list[float]:
    """`score` of each (checkpoint, `score`'s keyword arguments), `bench.jobs` at a time, in order."""
    with ThreadPoolExecutor(bench.jobs) as pool:
        return list(pool.map(lambda task: score(bench, task[0], **task[1]), tasks))


def images_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """The images at which FD first falls to `target`, interpolated in log(images); None if it never does."""
    for (images_a, fd_a), (images_b, fd_b) in zip(points, points[1:]):
        if fd_b <= target < fd_a:
            share = (fd_a - target) / (fd_a - fd_b)
            return math.exp(math.log(images_a) + share * (math.log(images_b) - math.log(images_a)))
    return points[0][0] if points and points[0][1] <= target else None


# ----------------------------------------------------------------------------- the parts


def train_all(bench: Bench, runs: list[tuple[Recipe, int]], budgets: int | None = None) -> dict[tuple[str, int], Path]:
    """Every (recipe, seed) trained (to `budgets`), `bench.jobs` at a time."""
    with ThreadPoolExecutor(bench.jobs) as pool:
        run_dirs = list(pool.map(lambda run: train_run(bench, *run, budgets=budgets), runs))
    return {(recipe.name, seed): run_dir for (recipe, seed), run_dir in zip(runs, run_dirs)}


def curves(bench: Bench, recipes: list[Recipe], seeds: tuple[int, ...],
           budgets: int | None = None) -> dict[str, dict[int, list]]:
    """recipe -> seed -> [(images, FD)] at every budget (the first `budgets`). The scores of all the runs share the
    `bench.jobs` workers: one run's unscored checkpoints may be fewer than the workers."""
    run_dirs = train_all(bench, [(recipe, seed) for recipe in recipes for seed in seeds], budgets)
    tasks = [(name, seed, images, checkpoint) for (name, seed), run_dir in run_dirs.items()
             for images, checkpoint in budget_checkpoints(run_dir)[:budgets]]
    fds = score_all(bench, [(checkpoint, {}) for *_, checkpoint in tasks])
    found: dict[str, dict[int, list]] = {}
    for (name, seed, images, _), fd in zip(tasks, fds):
        found.setdefault(name, {}).setdefault(seed, []).append((images, fd))
    for name, seeds in found.items():
        for seed, points in seeds.items():
            print(f"{name}, seed {seed}: {points}", flush=True)
    return found


def ablation(bench: Bench) -> dict[str, dict[int, list]]:
    """fast, one group set back at a time (seed 0, to the scale's ablation budgets): the groups that change only
    the weights sampled are fast's run scored as they say, the others trained."""
    budgets, fast_run = bench.scale.ablation_budgets, run_path(bench, Recipe("fast", "fast"))
    if not (fast_run / "config.yaml").exists():
        train_run(bench, Recipe("fast", "fast"), 0)
    run_config = load_config(fast_run / "config.yaml")
    recipes = ablation_recipes()
    sampled = {recipe.name: sampled_weights(recipe, run_config) for recipe in recipes}
    found = curves(bench, [recipe for recipe in recipes if sampled[recipe.name] is None], (0,), budgets)
    found.update({name: {0: curve(bench, fast_run, options, budgets)}
                  for name, options in sampled.items() if options is not None})
    return {recipe.name: found[recipe.name] for recipe in recipes}


def scored_table(bench: Bench, tasks: list[tuple[str, str, Path, dict]]) -> dict[str, dict[str, float]]:
    """(recipe, label, checkpoint, `score`'s keyword arguments) -> recipe -> label -> FD, `bench.jobs` at a time."""
    fds = score_all(bench, [(checkpoint, options) for _, _, checkpoint, options in tasks])
    table: dict[str, dict[str, float]] = {}
    for (name, label, *_), fd in zip(tasks, fds):
        table.setdefault(name, {})[label] = fd
    return table


def sampler_table(bench: Bench, recipes: list[Recipe]) -> dict[str, dict[str, float]]:
    """recipe -> "sampler|steps|spacing" -> FD, on each recipe's last checkpoint of seed 0."""
    tasks = []
    for recipe in recipes:
        last = last_checkpoint(bench, recipe)
        for sampler, extra in SAMPLERS:
            label = sampler + (f"-{extra['unipc_order']}" if extra else "")
            for steps, spacings in SAMPLER_GRID:
                for spacing in spacings:
                    options = (f"sample.timestep_spacing={spacing}", *(f"sample.{k}={v}" for k, v in extra.items()))
                    tasks.append((recipe.name, f"{label}|{steps}|{spacing}", last,
                                  {"sampler": sampler, "steps": steps, "options": options}))
    return scored_table(bench, tasks)


def ema_table(bench: Bench, recipes: list[Recipe]) -> dict[str, dict[str, float]]:
    """recipe -> EMA -> FD on each recipe's last checkpoint of seed 0: the raw weights, the run's default EMA and,
    where the run tracks post-hoc profiles, a sweep of lengths (EDM2's choice of the EMA after training)."""
    tasks = []
    for recipe in recipes:
        last = last_checkpoint(bench, recipe)
        choices = {"raw": ("--raw",), "default (sample.ema)": ()}
        if recipe.config().train.post_hoc_ema_sigma_rels:
            choices.update({f"sigma_rel {s:g}": ("--ema", f"{s:g}") for s in POST_HOC_SWEEP})
        tasks += [(recipe.name, label, last, {"options": options}) for label, options in choices.items()]
    return scored_table(bench, tasks)


def prepare_bench(scale: Scale, out: Path, cifar: Path, cache: Path, jobs: int) -> Bench:
    """The data (CIFAR-10 at the scale's size; 5,000 images held out) and the quality measure."""
    images, labels = load_cifar(cifar, scale.image_size, cache)
    train, held = split(images, labels, 5000)
    data = write_engine_data(*train, cache / f"engine-data-{scale.image_size}px-{len(train[0])}")
    net, accuracy = feature_net(train, held, cache)
    print(f"classifier: {accuracy:.1%} on the held-out images", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    scores_path = out / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    measure = QualityMeasure(net, held[0])
    return Bench(scale, out, data, measure, jobs, scores, floor=measure(train[0][:scale.num_images])["fd"])


def run(scale: Scale, out: Path, cifar: Path, cache: Path, parts: list[str], extra: list[Recipe],
        jobs: int = 2, report: Callable[[dict], None] = lambda results: None) -> dict:
    """The parts asked for, in order; `report` gets the results after each (a run of hours shows its main table
    as soon as it is scored, and an interrupted one keeps the report of what it finished)."""
    bench = prepare_bench(scale, out, cifar, cache, jobs)
    main_recipes = [Recipe("paper", "paper"), Recipe("fast", "fast")]
    results = {"scale": dataclasses.asdict(scale), "floor": bench.floor, "curves": {}, "ablation": {}, "samplers": {},
               "ema": {},
               "overrides": {r.name: scaled_overrides(r, scale) for r in main_recipes + ablation_recipes() + extra}}
    if "main" in parts:
        results["curves"] = curves(bench, main_recipes, scale.seeds)
    if extra:
        results["curves"].update(curves(bench, extra, scale.seeds[:1]))
    report(results)
    if "ema" in parts:
        results["ema"] = ema_table(bench, main_recipes + extra)
        report(results)
    if "ablation" in parts:
        results["ablation"] = ablation(bench)
        report(results)
    if "samplers" in parts:
        results["samplers"] = sampler_table(bench, main_recipes)
        report(results)
    return results


# ----------------------------------------------------------------------------- the report


def mean_curve(seeds: dict) -> list[tuple[int, float]]:
    """The mean FD over seeds at each budget (the budgets of the first seed)."""
    per_seed = [dict(points) for points in seeds.values()]
    return [(images, float(np.mean([points[images] for points in per_seed if images in points])))
            for images, _ in next(iter(seeds.values()))]


def reach(results: dict, name: str, target: float) -> dict:
    """Images to `target` per seed (None: not within the scale's images), their mean and spread (min, max)."""
    per_seed = {seed: images_to_reach(points, target) for seed, points in results[name].items()}
    reached = [value for value in per_seed.values() if value is not None]
    complete = len(reached) == len(per_seed)
    return {"per_seed": per_seed, "mean": float(np.mean(reached)) if complete else None,
            "spread": (min(reached), max(reached)) if complete else None}


def summary(results: dict) -> dict:
    """The paper's final FD (mean over seeds: the target) and every recipe's images to reach it."""
    everything = {**results["curves"], **results["ablation"]}
    paper = results["curves"]["paper"]
    target = float(np.mean([points[-1][1] for points in paper.values()]))
    paper_images = next(iter(paper.values()))[-1][0]
    return {"target": target, "paper_images": paper_images,
            "reach": {name: reach(everything, name, target) for name in everything}}


def _images(value: float | None) -> str:
    return "not reached" if value is None else f"{value / 1000:,.0f}k"


def markdown(results: dict) -> str:
    scale, found = results["scale"], summary(results)
    lines = [f"Scale: {scale['image_size']}x{scale['image_size']} CIFAR-10, UNet {' '.join(scale['model'])}; DDIM "
             f"{scale['ddim_steps']} steps eta 0, {scale['num_images']} images per score; real images score "
             f"{results['floor']:.3f} (the floor).", "", "## FD against images seen", ""]
    budgets = [images for images, _ in next(iter(results["curves"]["paper"].values()))]
    lines += ["| recipe | seed | " + " | ".join(_images(b) for b in budgets) + " |",
              "|---|---|" + "---|" * len(budgets)]
    for name, seeds in {**results["curves"], **results["ablation"]}.items():
        for seed, points in seeds.items():
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{fd:.2f}" for _, fd in points) + " |")
    lines += ["", f"## Images to the paper recipe's final FD ({found['target']:.2f}, mean over seeds at "
                  f"{_images(found['paper_images'])} images)", "",
              "| recipe | per seed | mean | spread (min-max) | share of the paper's images |", "|---|---|---|---|---|"]
    for name, got in found["reach"].items():
        per_seed = ", ".join(_images(value) for value in got["per_seed"].values())
        spread = "-" if got["spread"] is None else f"{_images(got['spread'][0])}-{_images(got['spread'][1])}"
        share = "-" if got["mean"] is None else f"{got['mean'] / found['paper_images']:.2f}"
        if name == "paper":  # the target is its own final FD: the seeds that end above the mean never reach it
            share = "1 (its final FD, by definition)"
        lines.append(f"| {name} | {per_seed} | {_images(got['mean'])} | {spread} | {share} |")
    lines += ablation_markdown(results) + ema_markdown(results.get("ema", {})) + sampler_markdown(results["samplers"])
    return "\n".join(lines) + "\n"


def ablation_markdown(results: dict) -> list[str]:
    """Each group set back against fast (seed 0) at the ablation's last budget; the batch row at every budget."""
    if not results["ablation"] or "fast" not in results["curves"]:
        return []
    fast = dict(results["curves"]["fast"][0])
    at = min(points[-1][0] for seeds in results["ablation"].values() for points in seeds.values())
    changes = {recipe.name: ", ".join(recipe.changes) for recipe in ablation_recipes()}
    lines = ["", f"## Ablation: fast with one group set back to the paper's (seed 0), FD at {_images(at)} images", "",
             f"| recipe | set back | FD | FD - fast's ({fast[at]:.2f}) |", "|---|---|---|---|"]
    for name, seeds in results["ablation"].items():
        fd = dict(seeds[0])[at]
        lines.append(f"| {name} | {changes.get(name, '')} | {fd:.2f} | {fd - fast[at]:+.2f} |")
    batch_row = next((name for name in results["ablation"] if name.endswith("paper's batch")), None)
    if batch_row is not None:
        small = dict(results["ablation"][batch_row][0])
        lines += ["", "## Batch policy: fast at the paper's batch and its own, equal images (seed 0): FD", "",
                  "| images | " + " | ".join(_images(images) for images in small) + " |",
                  "|---|" + "---|" * len(small),
                  f"| {batch_row} | " + " | ".join(f"{fd:.2f}" for fd in small.values()) + " |",
                  "| fast | " + " | ".join(f"{fast[images]:.2f}" for images in small) + " |"]
    return lines


def ema_markdown(emas: dict) -> list[str]:
    lines = []
    for name, table in emas.items():
        lines += ["", f"## EMA of {name}'s last checkpoint (seed 0): FD", "", "| weights | FD |", "|---|---|"]
        lines += [f"| {label} | {fd:.2f} |" for label, fd in table.items()]
    return lines


def sampler_markdown(samplers: dict) -> list[str]:
    lines = []
    for name, table in samplers.items():
        lines += ["", f"## Samplers on {name}'s last checkpoint (seed 0): FD", "",
                  "| sampler | " + " | ".join(f"{steps} {spacing}" for steps, spacings in SAMPLER_GRID
                                              for spacing in spacings) + " |",
                  "|---|" + "---|" * sum(len(spacings) for _, spacings in SAMPLER_GRID)]
        for label in dict.fromkeys(key.split("|")[0] for key in table):
            cells = [f"{table[f'{label}|{steps}|{spacing}']:.2f}" for steps, spacings in SAMPLER_GRID
                     for spacing in spacings]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, path: Path) -> None:
    """FD against images seen (log scale), one line per recipe (its mean over seeds), each seed's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = summary(results)["target"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, seeds in {**results["curves"], **results["ablation"]}.items():
        main = name in results["curves"]
        images, fds = zip(*mean_curve(seeds))
        line, = axes.plot(images, fds, marker="o" if main else None, linewidth=2 if main else 1,
                          linestyle="-" if main else "--", label=name)
        for points in seeds.values() if len(seeds) > 1 else []:
            axes.scatter(*zip(*points), color=line.get_color(), s=10, alpha=0.5)
    axes.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"paper's final FD ({target:.2f})")
    axes.set(xscale="log", yscale="log", xlabel="images seen", ylabel="FD (classifier features)",
             title=f"{results['scale']['image_size']}x{results['scale']['image_size']} CIFAR-10: FD against images")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(results: dict, out: Path) -> None:
    """OUT/recipe.json, and once the paper's curve is in, recipe.md (the tables) and recipe.png."""
    if "paper" in results["curves"]:
        results["summary"] = summary(results)
        (out / "recipe.md").write_text(markdown(results))
        plot(results, out / "recipe.png")
    (out / "recipe.json").write_text(json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="quick")
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=PARTS, help="none: only the --recipe ones")
    parser.add_argument("--recipe", type=parse_recipe, action="append", default=[], metavar="NAME=PRESET[,key=value]",
                        help="another recipe to train and score (seed 0), e.g. hot=fast,optim.lr=3e-3")
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR, help="the CIFAR-10 image-folder tar(.gz)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/recipe-SCALE")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downsampled data, the classifier")
    parser.add_argument("--jobs", type=int, default=2, help="trainings or samplings at once (one thread each)")
    args = parser.parse_args(argv)
    if cifar_missing(args.cifar):
        return 2
    out = args.out or ROOT / "runs" / f"recipe-{args.scale}"
    scale = SCALES[args.scale]
    protocol_default = args.scale.startswith("protocol") and args.parts == PARTS
    parts = ["main", "ema"] if protocol_default else args.parts
    results = run(scale, out, args.cifar, args.cache, parts, args.recipe, args.jobs,
                  report=lambda so_far: write_report(so_far, out))
    if "paper" in results["curves"]:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
