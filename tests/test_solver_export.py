"""A run whose sample.sampler is a fast solver exports the diffusers scheduler that steps as ours does
(DPMSolverMultistepScheduler or UniPCMultistepScheduler): its fields, the settings read back, and diffusers'
own sampling loop on the exported folder reproducing engine.diffusion.sample."""

import inspect
import json
import math

import pytest
import torch

from engine import diffusion, solvers
from engine.diffusers_format import (DiffusersFormatError, SOLVER_SCHEDULER_DEFAULTS, UNCAPPED,
                                     diffusion_fields_from_scheduler_config, read_diffusers_folder,
                                     write_diffusers_folder)
from engine.run_dir import load_run
from engine.sampling import sampling_plan, step_options
from engine.schedule import schedule_from_config
from kernels.noise import noise_keys, randn
from kernels.registry import resolve_kernels
from test_diffusers_interop import random_unet, tiny_config

PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BATCH, SEED = 2, 11
# sampler, steps, spacing, karras, target, unipc order, schedule, clipping (None: off, or sample.thresholding)
CASES = [
    ("dpm++2m", 10, "linspace", False, "eps", 2, "linear", None),
    ("dpm++3m", 12, "trailing", False, "v", 2, "cosine", None),
    ("dpm++2m-sde", 10, "leading", True, "eps", 2, "linear", None),
    ("unipc", 10, "trailing", False, "v", 3, "linear", None),
    ("unipc", 8, "linspace", True, "x0", 2, "linear", None),
    # x0 clipping as diffusers' thresholding: sample_max_value 1.0 clips, the largest float32 does not cap s
    ("dpm++2m", 8, "trailing", False, "eps", 2, "linear", "static"),
    ("unipc", 8, "trailing", False, "eps", 2, "linear", "dynamic"),
]
IDS = ["-".join(str(field) for field in case if field is not None) for case in CASES]


def solver_config(sampler, steps, spacing, karras, target, unipc_order, schedule, clipping, lower_order_final=True):
    clip = {"clip_denoised": False} if clipping is None else {
        "clip_denoised": True, "thresholding": clipping, "dynamic_thresholding_ratio": 0.9}
    return tiny_config(diffusion={"schedule": schedule, "target": target,
                                  "num_timesteps": 100 if schedule == "cosine" else 1000},
                       sample={"sampler": sampler, "steps": steps, "timestep_spacing": spacing, "karras_sigmas": karras,
                               "unipc_order": unipc_order, "lower_order_final": lower_order_final, **clip})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every case's config, our model and its exported folder, written once."""
    made = {}
    for name, case in zip(IDS, CASES):
        config = solver_config(*case)
        model = random_unet(config, seed=len(made))
        folder = tmp_path_factory.mktemp("solver-exports") / name
        write_diffusers_folder(folder, config, model.state_dict())
        made[name] = config, model, folder
    return made


@pytest.mark.parametrize("name", IDS)
def test_the_exported_scheduler_is_the_solvers_diffusers_scheduler(exports, name):
    config, _, folder = exports[name]
    sample, schedule = config.sample, config.diffusion
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((folder / "model_index.json").read_text())
    expected_class = "UniPCMultistepScheduler" if sample.sampler == "unipc" else "DPMSolverMultistepScheduler"
    assert written["_class_name"] == expected_class and index["scheduler"] == ["diffusers", expected_class]
    assert index["_class_name"] == "DDPMPipeline"
    assert {key: written[key] for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                                          "prediction_type", "timestep_spacing", "use_karras_sigmas",
                                          "lower_order_final", "final_sigmas_type", "steps_offset")} == {
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(schedule.schedule, schedule.schedule),
        "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
        "prediction_type": PREDICTION_TYPES[schedule.target], "timestep_spacing": sample.timestep_spacing,
        "use_karras_sigmas": sample.karras_sigmas, "lower_order_final": True, "final_sigmas_type": "zero",
        "steps_offset": 0}
    if sample.sampler == "unipc":
        assert (written["solver_order"], written["solver_type"], written["predict_x0"]) == (
            sample.unipc_order, "bh2", True)
        assert "algorithm_type" not in written
    else:
        assert (written["solver_order"], written["solver_type"], written["algorithm_type"]) == (
            solvers.solver_order(sample.sampler), "midpoint",
            "sde-dpmsolver++" if sample.sampler == "dpm++2m-sde" else "dpmsolver++")
    assert written["thresholding"] == sample.clip_denoised
    if sample.clip_denoised:
        assert written["sample_max_value"] == (UNCAPPED if sample.thresholding == "dynamic" else 1.0)
        assert written["dynamic_thresholding_ratio"] == sample.dynamic_thresholding_ratio

    # diffusers loads it as that class, and every key written is one of the class's settings
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline

    scheduler = DDPMPipeline.from_pretrained(folder).scheduler
    assert type(scheduler).__name__ == expected_class
    settings = set(inspect.signature(type(scheduler).__init__).parameters) - {"self"}
    assert set(written) - {"_class_name", "_diffusers_version"} <= settings
    assert all(scheduler.config[key] == value for key, value in written.items() if not key.startswith("_"))


@pytest.mark.parametrize("name", IDS)
def test_the_sample_settings_round_trip(exports, name):
    config, model, folder = exports[name]
    found = read_diffusers_folder(folder)
    sample = config.sample
    assert found.diffusion == {key: getattr(config.diffusion, key)
                               for key in ("num_timesteps", "schedule", "beta_start", "beta_end", "target")} | {
        "schedule": {"cosine": "squaredcos_cap_v2"}.get(config.diffusion.schedule, config.diffusion.schedule)}
    expected = {"sampler": sample.sampler, "timestep_spacing": sample.timestep_spacing,
                "karras_sigmas": sample.karras_sigmas, "lower_order_final": sample.lower_order_final,
                "clip_denoised": sample.clip_denoised}
    if sample.sampler == "unipc":
        expected["unipc_order"] = sample.unipc_order
    if sample.clip_denoised:
        expected["thresholding"] = sample.thresholding
        if sample.thresholding == "dynamic":
            expected["dynamic_thresholding_ratio"] = sample.dynamic_thresholding_ratio
    assert found.sample == expected

    # what engine.sample runs from the folder: the same sampler settings (steps are not a scheduler setting)
    loaded, loaded_config, _ = load_run(folder, torch.device("cpu"))
    fields = ("sampler", "timestep_spacing", "karras_sigmas", "lower_order_final", "clip_denoised")
    assert [getattr(loaded_config.sample, key) for key in fields] == [getattr(sample, key) for key in fields]
    assert loaded_config.diffusion.target == config.diffusion.target
    assert loaded_config.sample.steps is None  # left as the defaults have it: the solver's 20
    if sample.sampler == "unipc":
        assert loaded_config.sample.unipc_order == sample.unipc_order
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def engine_sample(config, model):
    """engine.diffusion.sample with the run's settings, as engine.sample calls it."""
    schedule = schedule_from_config(config.diffusion)
    shape = (BATCH, config.data.channels, config.data.image_size, config.data.image_size)
    return diffusion.sample(model, schedule, resolve_kernels({}, "cpu"), shape, seed=SEED, plan=sampling_plan(config),
                            **step_options(config))


def diffusers_sample(config, folder, scheduler_from=None, **step_options):
    """diffusers' sampling loop on the exported folder, from our x_T (the noise of counter t = T) and, for the SDE,
    with our noise of each step (counter t) as variance_noise; the folder's scheduler, or `scheduler_from(it)`."""
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(folder)
    unet, scheduler = pipeline.unet.eval(), (scheduler_from or (lambda saved: saved))(pipeline.scheduler)
    shape = (BATCH, config.data.channels, config.data.image_size, config.data.image_size)
    numel = math.prod(shape[1:])
    keys = noise_keys(SEED, torch.arange(BATCH))
    x = randn(keys, torch.full((BATCH,), config.diffusion.num_timesteps), numel).view(shape)
    scheduler.set_timesteps(config.sample.steps)
    for t in scheduler.timesteps:
        extra = {}
        if config.sample.sampler == "dpm++2m-sde":
            extra["variance_noise"] = randn(keys, t.expand(BATCH), numel).view(shape)
        x = scheduler.step(unet(x, t).sample, t, x, **extra, **step_options).prev_sample
    return x, scheduler.timesteps


# float32 agreement, relative to the sample's magnitude. diffusers rounds its sigmas to float32 and steps in
# float32 (ours: weights from float64 sigmas, rounded once, then one fused float32 op), and its UNet2DModel differs
# from ours by float32 rounding (~1e-6 relative per call); the steps carry those differences forward. Measured
# 0.5-1.5e-6, and 8e-6 with static clipping: an x0 that survives the clip is the small difference of x_t / alpha
# and sigma eps / alpha, each ~100 at the first steps, so it keeps their absolute rounding. Hence 3e-5.
TOLERANCE = 3e-5
# With Karras sigmas diffusers takes sigma_min and sigma_max from its float32 alphas_cumprod: sigma_min =
# sqrt((1 - abar_0) / abar_0) comes out 0.01000133 instead of 0.0100005 (8e-5 relative; 1 - abar_0 = 1e-4 has
# few float32 digits), which moves every Karras level by up to ~5e-5 relative. Measured: 3e-5 (unipc, x0 target;
# 2.4e-6 once diffusers is given float64 alphas_cumprod), hence 1e-4.
KARRAS_TOLERANCE = 1e-4


@pytest.mark.parametrize("name", IDS)
def test_diffusers_sampling_loop_on_the_export_reproduces_our_samples(exports, name):
    pytest.importorskip("diffusers")
    config, model, folder = exports[name]
    with torch.no_grad():
        ours = engine_sample(config, model)
        theirs, timesteps = diffusers_sample(config, folder)
    plan = solvers.solver_plan(schedule_from_config(config.diffusion), config.sample.sampler, config.sample.steps,
                               spacing=config.sample.timestep_spacing, karras=config.sample.karras_sigmas,
                               target=config.diffusion.target, unipc_order=config.sample.unipc_order)
    assert timesteps.tolist() == plan.timesteps.tolist()
    assert theirs.abs().max() > 0.1  # not a trivially small sample
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    tolerance = KARRAS_TOLERANCE if config.sample.karras_sigmas else TOLERANCE
    assert error < tolerance, f"relative difference {error:.1e}"
    if config.sample.clip_denoised:  # the clipping was active, so the thresholding mapping was tested
        unclipped = engine_sample(solver_config(*CASES[IDS.index(name)][:-1], None), model)
        assert (unclipped - ours).abs().max() > 0.1


def test_lower_order_final_false_exports_what_diffusers_can_run(tmp_path):
    """DPM keeps it; diffusers' UniPC without it fails at the last step (to sigma = 0), where ours steps first
    order: at unipc order 2 that is all lower_order_final changes, so the export writes true; order 3 is refused."""
    pytest.importorskip("diffusers")
    for sampler, written in (("dpm++3m", False), ("unipc", True)):
        config = solver_config(sampler, 8, "trailing", False, "eps", 2, "linear", None, lower_order_final=False)
        model = random_unet(config, seed=9)
        write_diffusers_folder(tmp_path / sampler, config, model.state_dict())
        scheduler = json.loads((tmp_path / sampler / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["lower_order_final"] is written
        assert read_diffusers_folder(tmp_path / sampler).sample["lower_order_final"] is written
        with torch.no_grad():
            ours, (theirs, _) = engine_sample(config, model), diffusers_sample(config, tmp_path / sampler)
        error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        assert error < TOLERANCE, f"{sampler}: relative difference {error:.1e}"
    config = solver_config("unipc", 8, "trailing", False, "eps", 3, "linear", None, lower_order_final=False)
    with pytest.raises(DiffusersFormatError) as error:
        write_diffusers_folder(tmp_path / "refused", config, random_unet(config).state_dict())
    assert "sample.lower_order_final=false with sample.unipc_order=3" in str(error.value)
    assert len(str(error.value).splitlines()) == 1 and not (tmp_path / "refused").exists()


# ----------------------------------------------------------------------------- reading diffusers' own configs


def test_the_solver_defaults_tables_match_the_installed_diffusers():
    """A key missing from a scheduler_config.json means diffusers' default: ours must know the same."""
    diffusers = pytest.importorskip("diffusers")
    for class_name, table in SOLVER_SCHEDULER_DEFAULTS.items():
        signature = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        assert {key: signature[key].default for key in table} == table, class_name


def test_schedulers_saved_by_diffusers_read_back_as_the_solver(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cases = [
        (diffusers.DPMSolverMultistepScheduler(solver_order=3, timestep_spacing="trailing", use_karras_sigmas=True),
         {"sampler": "dpm++3m", "timestep_spacing": "trailing", "karras_sigmas": True}),
        (diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", lower_order_final=False,
                                               prediction_type="v_prediction"),
         {"sampler": "dpm++2m-sde", "lower_order_final": False}),
        (diffusers.UniPCMultistepScheduler(solver_order=3, thresholding=True),  # sample_max_value 1.0: clipping
         {"sampler": "unipc", "unipc_order": 3, "clip_denoised": True, "thresholding": "static"}),
    ]
    for scheduler, expected in cases:
        scheduler.save_pretrained(tmp_path / "s")
        config = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
        fields, sample = diffusion_fields_from_scheduler_config(config)
        defaults = {"timestep_spacing": "linspace", "karras_sigmas": False, "lower_order_final": True,
                    "clip_denoised": False}
        assert sample == {**defaults, **expected}, type(scheduler).__name__
        assert fields["target"] == {"epsilon": "eps", "v_prediction": "v"}[scheduler.config.prediction_type]


REFUSALS = [  # class, key, value, text the refusal must contain
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver", "data prediction"),
    ("DPMSolverMultistepScheduler", "solver_order", 1, "order 2 and 3"),
    ("DPMSolverMultistepScheduler", "solver_type", "heun", "midpoint"),
    ("DPMSolverMultistepScheduler", "final_sigmas_type", "sigma_min", "sigma = 0"),
    ("DPMSolverMultistepScheduler", "euler_at_final", True, "first-order"),
    ("UniPCMultistepScheduler", "solver_type", "bh1", "bh2"),
    ("UniPCMultistepScheduler", "disable_corrector", [0], "every step"),
    ("UniPCMultistepScheduler", "steps_offset", 1, "offset"),
    ("UniPCMultistepScheduler", "sample_max_value", 1.5, "no upper bound"),
]


@pytest.mark.parametrize("class_name, key, value, expect", REFUSALS, ids=[f"{c[:4]}-{k}" for c, k, _, _ in REFUSALS])
def test_solver_settings_ours_cannot_express_are_refused_naming_the_key(class_name, key, value, expect):
    config = {"_class_name": class_name, "thresholding": key == "sample_max_value", key: value}
    with pytest.raises(DiffusersFormatError) as error:
        diffusion_fields_from_scheduler_config(config, "here.json")
    message = str(error.value)
    assert message.startswith(f"here.json: {key}=") and expect in message and len(message.splitlines()) == 1


def test_other_schedulers_read_as_before():
    """A class that is not a solver's keeps the DDPMScheduler reading (its clip_sample and spacing)."""
    _, sample = diffusion_fields_from_scheduler_config({"_class_name": "DDIMScheduler", "clip_sample": False,
                                                        "timestep_spacing": "trailing"})
    assert sample == {"clip_denoised": False, "timestep_spacing": "trailing"}
    with pytest.raises(DiffusersFormatError, match="thresholding"):
        diffusion_fields_from_scheduler_config({"_class_name": "DDIMScheduler", "thresholding": True})


@pytest.mark.parametrize("spacing, clip, clipped_eps", [("leading", True, False), ("leading", True, True),
                                                        ("trailing", False, False)])
def test_diffusers_ddim_loop_on_the_export_reproduces_our_ddim_samples(tmp_path, spacing, clip, clipped_eps):
    """What DDIMPipeline runs on an exported run (a DDIMScheduler made from the folder's DDPMScheduler config, eta 0,
    leading spacing by default) gives, from our x_T, the samples of our ddim sampler at the same spacing: the
    timesteps, the last step to abar = 1, the x0 clipping and which eps the update uses (the network's, or the
    clipped x0's: issue 12's bug). tests/test_sample_quality.py scores the trained models' samples."""
    diffusers = pytest.importorskip("diffusers")
    config = tiny_config(sample={"sampler": "ddim", "steps": 10, "timestep_spacing": spacing, "eta": 0.0,
                                 "clip_denoised": clip, "use_clipped_model_output": clipped_eps})
    model = random_unet(config, seed=5)
    write_diffusers_folder(tmp_path, config, model.state_dict())
    with torch.no_grad():
        theirs, timesteps = diffusers_sample(
            config, tmp_path, lambda saved: diffusers.DDIMScheduler.from_config(saved.config, timestep_spacing=spacing),
            eta=0.0, use_clipped_model_output=clipped_eps)
        ours = engine_sample(config, model)
    assert sorted(timesteps.tolist()) == diffusion.ddim_timesteps(1000, 10, spacing)
    assert theirs.abs().max() > 0.1  # not a trivially small sample
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert error < TOLERANCE, f"relative difference {error:.1e}"
