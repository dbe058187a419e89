"""One command that validates and measures the engine on a GPU, in under eight minutes (issue 14).

Here (with a package index and ../shared): `make gpu-carry` puts into .gpu-carry/ (git-ignored, about 25 MB)
what a bare GPU machine with Python 3.12, torch and Triton lacks: wheels of ema-pytorch, webdataset,
braceexpand, diffusers and the versions of their needs diffusers asks for (huggingface-hub, safetensors,
importlib-metadata, lazy-importer), and the CIFAR-10 train set. xformers is too large to carry: the GPU runs
use PyTorch SDPA, the default.

There, from the repository root, with .gpu-carry carried (`make gpu-check OUT=gpu-check` does both lines):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-carry/wheels/*.whl
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_check gpu-check

What comes back: gpu-check/ with RESULTS.md, results.json, bench-*.json, tests.xml, loss.png, samples.png,
profile.json and logs/PART.log.

On a CPU: `python -m benchmarks.gpu_check OUT --smoke` runs every part at tiny sizes in seconds
(tests/test_gpu_check.py, so that it cannot rot).

Each part runs as its own processes under its own time box, so that one that fails or overruns leaves the
others' results (OUT/logs/PART.log holds each one's output):
1. tests: the CUDA-only tests (tests/test_gpu.py: bf16 and fp16 steps, DDP and FSDP2 on one NCCL rank,
   CUDA-graph sampling), every Triton kernel against its reference on the device (tests/test_kernels.py),
   the device-resident data's and the training step's host-sync checks;
2. benchmarks: pytest-benchmark at the `cifar` preset, each group to its own JSON: the kernels (GB/s, % of
   their own roofline), the train step at batch 128 and 256 (eager, model- and step-compiled; NCHW and
   channels_last; images/s, MFU, peak memory) beside diffusers' UNet2DModel, sampling beside diffusers'
   pipelines;
3. training: the `cifar` preset on CIFAR-10 (data.cache=device, compiled, bf16) until its time box, then
   stopped with SIGTERM (the engine checkpoints and exits); its loss curve and a 64-image DDIM grid;
4. profile: one compiled step under torch.profiler: the ten costliest kernels and their share of the step,
   and the convolutions' achieved TFLOP/s;
5. OUT/RESULTS.md and OUT/results.json: the device, driver and versions, each part's status, every figure
   beside its target. Copy the figures into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR = ROOT / ".gpu-carry" / "cifar10-train.tar.gz"


@dataclass
class Part:
    name: str
    seconds: float  # its time box
    commands: list[tuple[list[str], float]]  # (argv, share of the box); run in order
    env: dict = field(default_factory=dict)
    stops_on_time: tuple[int, ...] = ()  # the commands (by index) a box ends on purpose, with SIGTERM: training's


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def run_part(part: Part, out: Path) -> dict:
    """Run a part's commands under its time box; each overrun gets SIGTERM, then SIGKILL 20 s later."""
    log_path = out / "logs" / f"{part.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started, status = time.monotonic(), "passed"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # under pytest-xdist (make
    # test), PYTEST_XDIST_WORKER would make the benchmarks' pytest think it is a worker and disable their timing
    env = {**inherited, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), **part.env}
    with log_path.open("w") as log:
        for index, (argv, share) in enumerate(part.commands):
            left = part.seconds - (time.monotonic() - started)
            if left <= 1:
                status = "timed out"
                break
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            code = _run_boxed(argv, min(left, part.seconds * share), log, env)
            if code is None and index in part.stops_on_time:
                continue  # stopped on time; the next command uses its checkpoint
            if code is None or code != 0:
                status = "timed out" if code is None else f"failed (exit {code})"
                if code is None or part.name != "benchmarks":  # a benchmark group failing spoils only its JSON
                    break
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "log": str(log_path.relative_to(out))}


def _run_boxed(argv: list[str], seconds: float, log, env) -> int | None:
    """The exit code, or None when the box ran out (the process group was stopped)."""
    process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # training checkpoints and exits; pytest stops
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return None


# ----------------------------------------------------------------------------- the parts


PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::UserWarning"]
CUDA_TESTS = ["tests/test_gpu.py", "tests/test_kernels.py",
              "tests/test_device_cache.py::test_on_cuda_batches_never_sync_with_the_host",
              "tests/test_distributed.py::test_the_training_step_never_waits_for_the_gpu"]
# (name, files, -k selection, BENCH_BATCH_SIZE, share of the part's box); on CUDA the kernels run as Triton
BENCHMARK_GROUPS = [
    ("kernels", ["benchmarks/test_bench_kernels.py"], "", 128, 0.12),
    ("train-128", ["benchmarks/test_bench_train_step.py"],
     "(test_train_step and triton and not blocks) or diffusers or (precision_and_attention and bf16 and sdpa)", 128, 0.5),
    ("train-256", ["benchmarks/test_bench_train_step.py"],
     "(test_train_step and triton and (eager or compiled-model)) or diffusers", 256, 0.2),
    # compiled (CUDA graphs) for DDPM, DDIM and one step count of two solvers: each compile takes a while
    ("sampling", ["benchmarks/test_bench_sampling.py"],
     "(sampling_run and not (compiled and (-10- or dpm++3m or sde))) or guidance_step", 128, 0.18),
]
# one process for the three files (each pytest start imports torch and the engine again): a kernel, a train step
# beside diffusers', a sampling run
SMOKE_BENCHMARK_GROUPS = [
    ("smoke", ["benchmarks/test_bench_kernels.py", "benchmarks/test_bench_train_step.py",
               "benchmarks/test_bench_sampling.py"],
     "(test_bench_kernels and q_sample and not uint8 and (copy or eager)) or (test_bench_train_step and "
     "((test_train_step and eager and pytorch) or diffusers)) or (test_bench_sampling and sampling_run and ddim "
     "and eager and not diffusers)", 2, 1.0),
]
SMOKE_TIMING = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.001", "--benchmark-warmup=off"]


def benchmark_commands(out: Path, smoke: bool) -> list[tuple[list[str], float]]:
    commands = []
    for name, files, select, batch, share in SMOKE_BENCHMARK_GROUPS if smoke else BENCHMARK_GROUPS:
        argv = python(*PYTEST, *files, "--benchmark-only", f"--benchmark-json={out / f'bench-{name}.json'}",
                      *(SMOKE_TIMING if smoke else []), *(["-k", select] if select else []))
        commands.append((["env", f"BENCH_BATCH_SIZE={batch}", *argv], share))
    return commands


def training_commands(out: Path, smoke: bool, cifar: Path) -> list[tuple[list[str], float]]:
    data, run_dir = out / "data", out / "train"
    if smoke:
        prepare = python("-m", "engine.data.prepare", "shapes", data, "--num", 64, "--image-size", 16, "--shard-size", 32)
        train = python("-m", "engine.train", "configs/tiny.yaml", f"data.path={data}", f"train.run_dir={run_dir}",
                       "train.steps=6", "train.batch_size=8", "train.log_every=2", "train.sample_every=0",
                       "model.base_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]",
                       "data.num_workers=0", "data.cache=device")
        sample = ["--num-images", 4, "--steps", 2]
    else:
        prepare = python("-m", "engine.data.prepare", cifar, data, "--format", "array", "--num", 20000)
        train = python("-m", "engine.train", "configs/cifar.yaml", f"data.path={data}", f"train.run_dir={run_dir}",
                       "data.cache=device", "train.compile=true", "train.precision=bf16", "train.steps=1000000",
                       "train.log_every=50", "train.checkpoint_every=1000000", "train.sample_every=0", "eval.every=0")
        sample = ["--num-images", 64, "--steps", 100]
    # training stops at its share; the plot and the samples then get what is left of the box (a fixed 5% was
    # less than a cold `engine.plot` start takes on a loaded 2-core CPU, and the report lacked loss.png)
    return [(prepare, 0.2), (train, 0.55), (python("-m", "engine.plot", "loss", run_dir, "--out", out / "loss.png"), 1.0),
            (python("-m", "engine.sample", run_dir, "--raw", "--sampler", "ddim", *sample, "--out", out / "samples.png"),
             1.0)]


def parts(out: Path, smoke: bool, cifar: Path, minutes: float) -> list[Part]:
    """The parts and their time boxes, shares of `minutes` (the report's few seconds aside)."""
    box = minutes * 60 - 10
    tests = (["tests/test_gpu.py", "tests/test_ahead_of_time.py::test_hot_path_leaves_out_what_a_forward_conditional_"
              "branch_skips"] if smoke else CUDA_TESTS)
    return [Part("tests", 0.17 * box, [(python(*PYTEST, *tests, f"--junitxml={out / 'tests.xml'}"), 1.0)]),
            Part("benchmarks", 0.43 * box, benchmark_commands(out, smoke)),
            Part("training", 0.28 * box, training_commands(out, smoke, cifar), stops_on_time=(1,)),
            Part("profile", 0.12 * box, [(python("-m", "benchmarks.gpu_check", out, "--profile-only",
                                                 *(["--smoke"] if smoke else [])), 1.0)])]


# ----------------------------------------------------------------------------- part 4: one step, profiled


def profile_step(smoke: bool) -> dict:
    """One compiled bf16 step of the cifar preset (on the CPU, --smoke: the tiny preset, eager) under the
    profiler: the ten costliest kernels and their share of the step's device time, the convolutions' TFLOP/s."""
    import torch

    from benchmarks.test_bench_train_step import configured
    from engine.config import load_config
    from engine.distributed import DistributedContext
    from engine.trainer import build_trainer, train_step

    cuda = torch.cuda.is_available() and not smoke
    device = torch.device("cuda" if cuda else "cpu")
    preset, small = ("cifar", []) if cuda else ("tiny", ["model.base_channels=16", "model.channel_mult=[1,2]",
                                                         "model.attention_resolutions=[8]"])
    config = configured(load_config(ROOT / "configs" / f"{preset}.yaml", ["model.dropout=0.0", *small]),
                        128 if cuda else 2, compile=cuda, precision="auto")
    trainer = build_trainer(config, DistributedContext(rank=0, local_rank=0, world_size=1, device=device))
    size, channels = config.data.image_size, config.data.channels
    batch = {"image": torch.randint(0, 256, (trainer.micro_batch, channels, size, size), dtype=torch.uint8).to(device),
             "skipped": 0}
    for step in range(3):  # compile and warm up
        train_step(trainer, step, lambda: batch)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    steps = 3
    with torch.profiler.profile(activities=activities, with_flops=True) as profiler:
        for step in range(3, 3 + steps):
            train_step(trainer, step, lambda: batch)
        if cuda:
            torch.cuda.synchronize()
    return _profile_table(profiler.key_averages(), steps, cuda)


def _profile_table(events, steps: int, cuda: bool) -> dict:
    def self_time(event):  # microseconds
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0)) if cuda \
            else event.self_cpu_time_total

    timed = [event for event in events if self_time(event) > 0 and (not cuda or not event.key.startswith("aten::"))]
    total = sum(self_time(event) for event in timed)
    top = sorted(timed, key=self_time, reverse=True)[:10]
    convolutions = [event for event in events if event.key == "aten::convolution" and getattr(event, "flops", 0)]
    conv_seconds = sum((getattr(e, "device_time_total", 0) if cuda else e.cpu_time_total) for e in convolutions) / 1e6
    return {"step_ms": round(total / steps / 1e3, 3), "device": "cuda" if cuda else "cpu",
            "top_kernels": [{"name": event.key[:120], "ms_per_step": round(self_time(event) / steps / 1e3, 3),
                             "share": round(self_time(event) / total, 4)} for event in top],
            "conv_forward_tflop_per_s": round(sum(e.flops for e in convolutions) / conv_seconds / 1e12, 2)
            if conv_seconds else None}


# ----------------------------------------------------------------------------- part 5: the report


def environment() -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def benchmark_rows(out: Path) -> list[dict]:
    """Every benchmark of every group's JSON, with the ratios against its group's baselines."""
    rows = []
    for path in sorted(out.glob("bench-*.json")):
        for bench in json.loads(path.read_text()).get("benchmarks", []):
            rows.append({"file": path.name, "name": bench["name"], "group": bench["group"],
                         "median_ms": bench["stats"]["median"] * 1e3, **bench.get("extra_info", {})})
    by_group: dict[tuple, list[dict]] = {}
    for row in rows:
        by_group.setdefault((row["file"], row["group"]), []).append(row)
    for row in rows:
        group = by_group[(row["file"], row["group"])]
        eager = next((r for r in group if "[eager-" in r["name"] and "kernel_op" in r["name"]), None)
        if eager and "[triton-" in row["name"]:
            row["times_faster_than_eager"] = round(eager["median_ms"] / row["median_ms"], 2)
        baseline = next((r for r in group if r.get("baseline") and r["baseline"] == row.get("compare")), None)
        if baseline:
            row["vs_diffusers"] = round(baseline["median_ms"] / row["median_ms"], 2)
    return rows


def _cell(value) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def _tests_summary(out: Path) -> str:
    import xml.etree.ElementTree as ElementTree

    try:
        suite = ElementTree.parse(out / "tests.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return "no junit report"
    suite = suite if suite.tag == "testsuite" else suite[0]
    return ", ".join(f"{suite.get(key)} {key}" for key in ("tests", "failures", "errors", "skipped"))


def _training_summary(out: Path) -> dict:
    path = out / "train" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    logged = [r for r in records if "loss" in r]
    if not logged:
        return {}
    last = logged[-1]
    return {"steps": last["step"], "last_loss": last["loss"], "images_per_sec": last.get("images_per_sec"), "mfu": last.get("mfu")}


def report(out: Path, statuses: dict, started: float) -> dict:
    profile_path = out / "profile.json"
    results = {"environment": environment(), "parts": statuses, "total_seconds": round(time.monotonic() - started, 1),
               "tests": _tests_summary(out), "benchmarks": benchmark_rows(out), "training": _training_summary(out),
               "profile": json.loads(profile_path.read_text()) if profile_path.exists() else None}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "RESULTS.md").write_text(markdown(results))
    return results


BENCH_COLUMNS = ["median_ms", "gb_per_s", "percent_of_roofline", "times_faster_than_eager", "images_per_sec", "mfu",
                 "peak_memory_gb", "warmup_seconds", "vs_diffusers"]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# gpu_check on {env['device']}", "",
             f"{env['date']}; driver {env['driver']}, torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, "
             f"Python {env['python']}; {results['total_seconds']} s in all.", "",
             "Targets: every Triton kernel at >= 85% of its own roofline and >= 3x eager; the train step and sampling "
             "at >= 1x diffusers' (vs_diffusers); time to 50,000 samples = 50,000 / images_per_sec.", "",
             "| part | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {part['status']} | {part['seconds']} |" for name, part in results["parts"].items()]
    lines += ["", f"Tests: {results['tests']}.", "", "| benchmark | " + " | ".join(BENCH_COLUMNS) + " |",
              "| --- |" + " --- |" * len(BENCH_COLUMNS)]
    for row in results["benchmarks"]:
        if row.get("images_per_sec") and row["group"].startswith("sampling_run"):
            row["seconds_to_50k"] = round(50_000 / row["images_per_sec"], 1)
        lines.append(f"| {row['name']} ({row['file']}) | " + " | ".join(_cell(row.get(c)) for c in BENCH_COLUMNS) + " |")
    samplers = [r for r in results["benchmarks"] if "seconds_to_50k" in r]
    lines += ["", *(f"- {r['name']}: {r['seconds_to_50k']} s to 50,000 samples" for r in samplers)]
    if results["training"]:
        lines += ["", f"Training (loss.png, samples.png): {results['training']}"]
    profile = results["profile"]
    if profile:
        lines += ["", f"Profile of one step ({profile['device']}): {profile['step_ms']} ms; convolutions (forward) at "
                  f"{profile['conv_forward_tflop_per_s']} TFLOP/s.", "", "| kernel | ms per step | share |",
                  "| --- | --- | --- |"]
        lines += [f"| `{k['name']}` | {k['ms_per_step']} | {k['share']:.1%} |" for k in profile["top_kernels"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds (make test runs it)")
    parser.add_argument("--minutes", type=float, default=None, help="the whole run's time box (default 7.5; smoke 6)")
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR, help=f"CIFAR-10 train tar (default {DEFAULT_CIFAR})")
    parser.add_argument("--parts", nargs="*", default=None, help="only these parts (tests benchmarks training profile)")
    parser.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)  # part 4, in its own process
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile_only:
        (args.out / "profile.json").write_text(json.dumps(profile_step(args.smoke), indent=1))
        return 0
    started, statuses = time.monotonic(), {}
    for part in parts(args.out.resolve(), args.smoke, args.cifar.resolve(), args.minutes or (6 if args.smoke else 7.5)):
        if args.parts is None or part.name in args.parts:
            print(f"gpu_check: {part.name} (at most {part.seconds:.0f} s)", file=sys.stderr, flush=True)
            statuses[part.name] = run_part(part, args.out.resolve())
            print(f"gpu_check: {part.name} {statuses[part.name]['status']} in {statuses[part.name]['seconds']} s",
                  file=sys.stderr, flush=True)
    report(args.out, statuses, started)
    print(f"gpu_check: {args.out / 'RESULTS.md'}", file=sys.stderr)
    return 0 if all(s["status"] == "passed" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
