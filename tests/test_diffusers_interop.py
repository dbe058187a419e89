"""diffusers interoperability: export a run as a DDPMPipeline folder, read diffusers folders back.

The tests that load or build diffusers models skip without diffusers; the export, the mapping and
every refusal are checked without it.
"""

import inspect
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import export
from engine.checkpoint import save_checkpoint
from engine.config import config_from_dict
from engine.diffusers_format import (DiffusersFormatError, SCHEDULER_DEFAULTS, UNET_DEFAULTS, WEIGHTS_NAME,
                                     diffusers_to_unet, init_state_dict, is_diffusers_folder,
                                     read_diffusers_folder, unet_to_diffusers, write_diffusers_folder)
from engine.ema import build_ema, ema_state, update_ema
from engine.parallel import full_model_state
from engine.run_dir import load_run
from engine.schedule import make_betas
from engine.unet import UNet, build_unet
from forked_cli import run_module
from test_train_cli import ROOT

# The smallest model UNet2DModel can express: widths must be multiples of its 32 norm groups.
# ModelConfig fields that are not the architecture: diffusers' config does not hold them
NOT_IN_DIFFUSERS = ("attention_backend", "label_dropout", "activation_checkpointing")
TINY_MODEL = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
              "num_heads": 1, "dropout": 0.0}


def tiny_config(model=None, diffusion=None, sample=None):
    return config_from_dict({"model": {**TINY_MODEL, **(model or {})}, "data": {"image_size": 16, "channels": 3},
                             "diffusion": diffusion or {}, "sample": sample or {}})


def random_unet(config, seed=0, std=0.1):
    """Our UNet with every parameter drawn at random (the reference init zeroes some layers, which would
    hide a mapping mistake there)."""
    model = build_unet(config, "cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def inputs(num_timesteps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 16, 16, generator=generator)
    return x, torch.tensor([0, 1, num_timesteps // 3, num_timesteps - 1])


def one_line(message):
    return len(str(message).strip().splitlines()) == 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as engine.train leaves it: a checkpoint whose EMA weights differ from the trained ones."""
    config = tiny_config(diffusion={"schedule": "cosine", "target": "v", "num_timesteps": 100},
                         sample={"variance": "fixed_small", "clip_denoised": False})
    model = random_unet(config)
    ema = build_ema(model, decay=0.5)
    with torch.no_grad():  # one "step": the EMA ends up halfway between the old and the new weights
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    update_ema(ema, 0)
    path = tmp_path_factory.mktemp("runs") / "tiny"
    save_checkpoint(path, 7, {"step": 7, "model": full_model_state(model), "ema": ema_state(ema),
                              "config": config.to_dict()})
    return path


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The CLI as a user runs it: python -m engine.export RUN_DIR --format diffusers OUT_DIR."""
    out = tmp_path_factory.mktemp("exports") / "tiny-diffusers"
    result = run_module("engine.export", [run_dir, "--format", "diffusers", out], cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "EMA weights" in result.stdout and "step 7" in result.stdout
    return out


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A folder written by write_diffusers_folder, for the tests that read or mutate one."""
    out = tmp_path_factory.mktemp("folders") / "pipeline"
    config = tiny_config()
    write_diffusers_folder(out, config, random_unet(config).state_dict())
    return out


# ----------------------------------------------------------------------------- export, loaded by diffusers


@pytest.mark.parametrize("num_heads, diffusion, sample", [
    (1, {"schedule": "linear", "target": "eps", "beta_start": 2e-4, "beta_end": 0.03},
     {"variance": "fixed_large", "clip_denoised": True}),
    (2, {"schedule": "cosine", "target": "v"}, {"variance": "fixed_small", "clip_denoised": False}),
])
def test_an_exported_folder_loads_as_a_ddpm_pipeline_that_computes_what_ours_does(tmp_path, num_heads, diffusion,
                                                                                   sample):
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    config = tiny_config({"num_heads": num_heads}, diffusion, sample)
    model = random_unet(config)
    write_diffusers_folder(tmp_path / "pipe", config, model.state_dict())
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    unet = pipeline.unet.eval()
    assert unet.dtype == torch.float32
    # the file holds exactly the keys and shapes diffusers' model has
    expected = {k: v.shape for k, v in UNet2DModel.from_config(unet.config).state_dict().items()}
    assert {k: v.shape for k, v in load_file(tmp_path / "pipe" / "unet" / WEIGHTS_NAME).items()} == expected

    x, t = inputs(config.diffusion.num_timesteps)
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
        assert ours.abs().max() > 0.05  # not a trivially zero output
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unet(x, 5).sample, model(x, torch.full((4,), 5)), atol=1e-5, rtol=1e-5)

    scheduler = pipeline.scheduler
    assert isinstance(scheduler, DDPMScheduler)
    betas = make_betas(config.diffusion.schedule, config.diffusion.num_timesteps, config.diffusion.beta_start,
                       config.diffusion.beta_end)
    torch.testing.assert_close(scheduler.betas.double(), betas, atol=1e-7, rtol=1e-5)
    assert scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[config.diffusion.target]
    assert scheduler.config.variance_type == sample["variance"]
    assert scheduler.config.clip_sample == sample["clip_denoised"]


def test_the_defaults_tables_match_the_installed_diffusers():
    """A key missing from a config.json means diffusers' default: ours must know the same defaults."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler, UNet2DModel

    def defaults(cls):
        return {name: list(p.default) if isinstance(p.default, tuple) else p.default
                for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}

    assert defaults(UNet2DModel) == UNET_DEFAULTS
    scheduler = defaults(DDPMScheduler)
    assert {key: scheduler[key] for key in SCHEDULER_DEFAULTS} == SCHEDULER_DEFAULTS


# ----------------------------------------------------------------------------- diffusers folders, read back


@pytest.mark.parametrize("attention_head_dim, num_heads", [(None, 1), (32, 2)])
def test_folders_saved_by_diffusers_read_back_as_our_unet(tmp_path, attention_head_dim, num_heads):
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    # the DDPM architecture as diffusers spells it (google/ddpm-cifar10-32's settings, smaller)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=attention_head_dim,
                       norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.1)
    unet.save_pretrained(tmp_path / "bare")
    unet.save_pretrained(tmp_path / "bare-bin", safe_serialization=False)
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", variance_type="fixed_large", clip_sample=False)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")

    x, t = inputs(100)
    with torch.no_grad():
        expected = unet(x, t).sample
    model_fields = {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
                    "num_heads": num_heads, "dropout": 0.0, "num_classes": 0}
    for name in ("bare", "bare-bin", "pipe"):
        assert is_diffusers_folder(tmp_path / name)
        found = read_diffusers_folder(tmp_path / name)
        assert found.model == model_fields and found.data == {"image_size": 16, "channels": 3}
        ours = UNet(image_size=16, in_channels=3, out_channels=3, **found.model).eval()
        ours.load_state_dict(found.state_dict)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, t), expected, atol=1e-5, rtol=1e-5)
    assert read_diffusers_folder(tmp_path / "bare").diffusion is None
    found = read_diffusers_folder(tmp_path / "pipe")
    assert found.diffusion == {"num_timesteps": 100, "schedule": "squaredcos_cap_v2", "beta_start": 1e-4,
                               "beta_end": 0.02, "target": "v"}
    # diffusers saves its default timestep_spacing ("leading"): our DDIM then takes the same timesteps
    assert found.sample == {"variance": "fixed_large", "clip_denoised": False, "timestep_spacing": "leading"}

    # what the sampler would call: the model on a device and a checked config
    model, config, step = load_run(tmp_path / "pipe", torch.device("cpu"))
    assert step == 0
    assert (config.diffusion.schedule, config.diffusion.target, config.diffusion.num_timesteps) == (
        "squaredcos_cap_v2", "v", 100)
    assert (config.sample.variance, config.sample.clip_denoised, config.model.num_heads) == (
        "fixed_large", False, num_heads)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, t), expected, atol=1e-5, rtol=1e-5)


def test_a_sparse_config_as_early_diffusers_wrote_it_reads_as_the_cifar_preset():
    """Configs written before a setting existed leave it out (diffusers' default applies): the DDPM CIFAR-10
    model as google/ddpm-cifar10-32 describes it, with only the settings that differ from the defaults."""
    from engine.config import load_config
    from engine.diffusers_format import model_fields_from_unet_config

    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
              "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "downsample_padding": 0,
              "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
              "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 32, "sample_size": 32,
              "time_embedding_type": "positional"}
    model, data = model_fields_from_unet_config(config)
    cifar = load_config(ROOT / "configs" / "cifar.yaml").to_dict()
    excluded = (*NOT_IN_DIFFUSERS, "dropout")
    assert model == {k: v for k, v in cifar["model"].items() if k not in excluded} | {"dropout": 0.0}
    assert data == {"image_size": 32, "channels": 3}


def test_the_mapping_round_trips_and_uses_diffusers_names():
    config = tiny_config({"num_heads": 2})
    model = random_unet(config)
    unet_config, weights = unet_to_diffusers(model.state_dict(), config)
    assert len(weights) == len(model.state_dict())
    assert weights["mid_block.attentions.0.to_out.0.weight"].shape == (64, 64)  # a 1x1 conv here, a Linear there
    assert weights["up_blocks.0.resnets.0.conv_shortcut.weight"].shape == (64, 128, 1, 1)
    for key in ("time_embedding.linear_1.weight", "down_blocks.0.downsamplers.0.conv.weight",
                "down_blocks.1.attentions.0.group_norm.weight", "up_blocks.0.upsamplers.0.conv.bias",
                "mid_block.resnets.1.time_emb_proj.weight", "conv_norm_out.weight"):
        assert key in weights, key
    assert unet_config["attention_head_dim"] == 32 and unet_config["down_block_types"] == ["DownBlock2D",
                                                                                           "AttnDownBlock2D"]
    fields, data, state = diffusers_to_unet(unet_config, weights)
    assert fields == {k: v for k, v in config.to_dict()["model"].items() if k not in NOT_IN_DIFFUSERS}
    assert data == {"image_size": 16, "channels": 3}
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_the_mapping_is_total_and_names_what_is_missing_or_unexpected():
    config = tiny_config()
    state = random_unet(config).state_dict()
    broken = {**state, "extra.weight": torch.zeros(1)}
    del broken["conv_in.weight"]
    with pytest.raises(DiffusersFormatError, match=r"missing 1 keys \(conv_in.weight\).*unexpected 1 keys "
                                                   r"\(extra.weight\)"):
        unet_to_diffusers(broken, config)
    unet_config, weights = unet_to_diffusers(state, config)
    del weights["mid_block.attentions.0.to_q.bias"]
    with pytest.raises(DiffusersFormatError, match=r"missing 1 keys \(mid_block.attentions.0.to_q.bias\)"):
        diffusers_to_unet(unet_config, weights)
    weights["mid_block.attentions.0.to_q.bias"] = torch.zeros(3)
    with pytest.raises(DiffusersFormatError, match=r"to_q.bias has shape \(3,\), the architecture needs \(64,\)"):
        diffusers_to_unet(unet_config, weights)


def test_legacy_attention_names_in_a_bin_file_are_read(pipeline_folder, tmp_path):
    """Checkpoints older than diffusers' Attention class name the projections query/key/value/proj_attn."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    weights = load_file(pipeline_folder / "unet" / WEIGHTS_NAME)
    legacy = {}
    for key, value in weights.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert "mid_block.attentions.0.proj_attn.weight" in legacy
    (tmp_path / "old").mkdir()
    shutil.copy(pipeline_folder / "unet" / "config.json", tmp_path / "old" / "config.json")
    torch.save(legacy, tmp_path / "old" / "diffusion_pytorch_model.bin")
    found, reference = read_diffusers_folder(tmp_path / "old"), read_diffusers_folder(pipeline_folder)
    assert all(torch.equal(found.state_dict[k], v) for k, v in reference.state_dict.items())


def test_is_diffusers_folder_tells_folders_apart(pipeline_folder, run_dir, tmp_path):
    assert is_diffusers_folder(pipeline_folder) and is_diffusers_folder(pipeline_folder / "unet")
    assert not is_diffusers_folder(run_dir)
    assert not is_diffusers_folder(tmp_path / "nowhere")
    assert not is_diffusers_folder(pipeline_folder / "model_index.json")


def test_init_state_dict_checks_the_architecture(pipeline_folder):
    state = init_state_dict(pipeline_folder, tiny_config({"dropout": 0.1}))  # dropout is not in the weights
    assert set(state) == set(build_unet(tiny_config(), "cpu").state_dict())
    with pytest.raises(DiffusersFormatError, match=r"model.num_res_blocks=1, the config 2; set model.num_res_blocks=1"):
        init_state_dict(pipeline_folder, tiny_config({"num_res_blocks": 2}))


# ----------------------------------------------------------------------------- the CLI


def test_the_export_cli_writes_the_ema_or_the_raw_weights(run_dir, exported, tmp_path, capsys):
    assert sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*")) == [
        "model_index.json", "scheduler", "scheduler/scheduler_config.json", "unet", "unet/config.json",
        f"unet/{WEIGHTS_NAME}"]
    assert sorted(p.name for p in exported.parent.iterdir()) == ["tiny-diffusers"]  # no temporary folder left
    index = json.loads((exported / "model_index.json").read_text())
    assert (index["_class_name"], index["unet"], index["scheduler"]) == (
        "DDPMPipeline", ["diffusers", "UNet2DModel"], ["diffusers", "DDPMScheduler"])
    scheduler = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["prediction_type"], scheduler["variance_type"],
            scheduler["clip_sample"], scheduler["num_train_timesteps"]) == (
        "squaredcos_cap_v2", "v_prediction", "fixed_small", False, 100)

    assert export.main([str(run_dir), "--format", "diffusers", str(tmp_path / "raw"), "--raw"]) == 0
    assert "raw weights" in capsys.readouterr().out
    ema_model, config, _ = load_run(run_dir, torch.device("cpu"), use_ema=True)
    raw_model, _, _ = load_run(run_dir, torch.device("cpu"), use_ema=False)
    for folder, model in ((exported, ema_model), (tmp_path / "raw", raw_model)):
        found = read_diffusers_folder(folder)
        assert found.model == {k: v for k, v in config.to_dict()["model"].items()
                               if k not in NOT_IN_DIFFUSERS}
        assert found.diffusion["schedule"] == "squaredcos_cap_v2" and found.diffusion["target"] == "v"
        assert all(torch.equal(found.state_dict[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(ema_model.conv_out.weight, raw_model.conv_out.weight)


def test_an_exported_run_runs_in_diffusers_as_its_ema_model_does(run_dir, exported):
    pytest.importorskip("diffusers")
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(exported)
    model, config, _ = load_run(run_dir, torch.device("cpu"), use_ema=True)
    raw, _, _ = load_run(run_dir, torch.device("cpu"), use_ema=False)
    x, t = inputs(config.diffusion.num_timesteps)
    with torch.no_grad():
        ours, theirs = model.eval()(x, t), pipeline.unet.eval()(x, t).sample
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert (raw.eval()(x, t) - ours).abs().max() > 1e-2  # the comparison tells EMA and raw weights apart
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="np").images
    assert images.shape == (2, 16, 16, 3) and bool((images >= 0).all() and (images <= 1).all())


def test_export_cli_errors_are_one_line_with_exit_status_2(run_dir, tmp_path, capsys):
    def fails(*argv, expect):
        assert export.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and expect in err and "Traceback" not in err, err

    fails(tmp_path / "nowhere", tmp_path / "out", expect="does not exist")
    (tmp_path / "empty-run").mkdir()
    fails(tmp_path / "empty-run", tmp_path / "out", expect="no checkpoint")
    assert not (tmp_path / "out").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    fails(run_dir, taken, expect="--overwrite")
    assert (taken / "keep.txt").read_text() == "mine"
    assert export.main([str(run_dir), str(taken), "--overwrite"]) == 0
    assert not (taken / "keep.txt").exists() and is_diffusers_folder(taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-run", "taken"]  # nothing set aside is left

    narrow = tiny_config({"base_channels": 16})  # our group norm falls back to 16 groups; diffusers' cannot
    model = build_unet(narrow, "cpu")
    save_checkpoint(tmp_path / "narrow", 1, {"step": 1, "model": model.state_dict(), "config": narrow.to_dict(),
                                             "ema": {f"ema_model.{k}": v for k, v in model.state_dict().items()}})
    fails(tmp_path / "narrow", tmp_path / "narrow-out", expect="multiple of 32")
    assert not (tmp_path / "narrow-out").exists()

    result = run_module("engine.export", [tmp_path / "narrow", tmp_path / "x"], cwd=ROOT, timeout=600)
    assert result.returncode == 2 and one_line(result.stderr) and "model.base_channels=16" in result.stderr


@pytest.mark.parametrize("model, expect", [
    ({"base_channels": 16}, "every width must be a multiple of 32"),
    ({"base_channels": 32, "channel_mult": [2, 2]}, "model.channel_mult starts with 2"),
    ({"num_heads": 2, "attention_resolutions": [16, 8]}, "model.num_heads=2 with attention blocks [32, 64]"),
])
def test_models_diffusers_cannot_express_are_refused_naming_the_setting(tmp_path, model, expect):
    config = tiny_config(model)
    with pytest.raises(DiffusersFormatError) as error:
        write_diffusers_folder(tmp_path / "out", config, build_unet(config, "cpu").state_dict())
    assert expect in str(error.value) and one_line(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    import safetensors.torch

    config = tiny_config()
    state = build_unet(config, "cpu").state_dict()
    write_diffusers_folder(tmp_path / "out", config, state)
    before = (tmp_path / "out" / "unet" / WEIGHTS_NAME).read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    for target, overwrite in ((tmp_path / "new", False), (tmp_path / "out", True)):
        with pytest.raises(DiffusersFormatError, match="No space left on device"):
            write_diffusers_folder(target, config, state, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "unet" / WEIGHTS_NAME).read_bytes() == before


# (key, value or DELETE, text the refusal must contain); DELETE means diffusers' default applies
DELETE = object()
UNET_REFUSALS = [
    ("flip_sin_to_cos", True, "[sin | cos]"),
    ("flip_sin_to_cos", DELETE, "flip_sin_to_cos=true"),  # diffusers' default is true
    ("freq_shift", 0, "freq_shift 1"),
    ("norm_num_groups", 16, "32 GroupNorm groups"),
    ("norm_eps", 1e-5, "eps 1e-06"),
    ("downsample_padding", 1, "right/bottom"),
    ("resnet_time_scale_shift", "scale_shift", "no scale-shift"),
    ("time_embedding_type", "fourier", "sinusoidal"),
    ("class_embed_type", "timestep", "learned class embedding"),
    ("num_class_embeds", 1, "no class"),
    ("add_attention", False, "middle block"),
    ("mid_block_type", None, "middle block"),
    ("center_input_sample", True, "[-1, 1]"),
    ("act_fn", "gelu", "SiLU"),
    ("up_block_types", ["UpBlock2D", "UpBlock2D"], "up_block_types[0]=\"UpBlock2D\""),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"], "down_block_types[1]=\"CrossAttnDownBlock2D\""),
    ("down_block_types", ["AttnDownBlock2D", "AttnDownBlock2D"], "up_block_types[1]=\"UpBlock2D\""),
    ("attention_head_dim", 48, "does not divide the 64-channel"),
    ("block_out_channels", [32, 48], "multiple of the first"),
    ("out_channels", 6, "shaped like its input"),
    ("sample_size", None, "image size"),
    ("mid_block_scale_factor", 2.0, "rescale"),
    ("time_embedding_dim", 256, "time embedding"),
    ("upsample_type", "resnet", "nearest"),
    ("attn_norm_num_groups", 8, "attention"),
    ("cross_attention_dim", 768, "not a UNet2DModel setting"),
]


@pytest.mark.parametrize("key, value, expect", UNET_REFUSALS, ids=[f"{k}={'(deleted)' if v is DELETE else v}" for k, v, _ in UNET_REFUSALS])
def test_diffusers_settings_ours_cannot_express_are_refused_naming_the_key(pipeline_folder, tmp_path, key, value,
                                                                           expect):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    if value is DELETE:
        del config[key]
    else:
        config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(DiffusersFormatError) as error:
        read_diffusers_folder(folder)
    message = str(error.value)
    assert str(config_path) in message and key in message and expect in message and one_line(message), message


SCHEDULER_REFUSALS = [
    ("trained_betas", [0.1, 0.2], "named schedule"),
    ("beta_schedule", "sigmoid", "beta_schedule=\"sigmoid\""),
    ("variance_type", "learned_range", "no learned variance"),
    ("prediction_type", "flow", "prediction_type=\"flow\""),
    ("rescale_betas_zero_snr", True, "zero terminal SNR"),
    ("thresholding", True, "clip"),
]


@pytest.mark.parametrize("key, value, expect", SCHEDULER_REFUSALS, ids=[k for k, _, _ in SCHEDULER_REFUSALS])
def test_schedules_ours_cannot_express_are_refused_naming_the_key(pipeline_folder, tmp_path, key, value, expect):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(DiffusersFormatError) as error:
        read_diffusers_folder(folder)
    assert f"{path}: {key}=" in str(error.value) and expect in str(error.value) and one_line(error.value)


def test_unreadable_folders_are_one_line(pipeline_folder, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(DiffusersFormatError, match="malformed JSON"):
        read_diffusers_folder(folder)
    shutil.copy(pipeline_folder / "unet" / "config.json", folder / "unet" / "config.json")
    (folder / "unet" / WEIGHTS_NAME).unlink()
    with pytest.raises(DiffusersFormatError, match="no weights"):
        read_diffusers_folder(folder)
    save_file({"x": torch.zeros(1)}, folder / "unet" / WEIGHTS_NAME)
    with pytest.raises(DiffusersFormatError, match=r"missing \d+ keys .*unexpected 1 keys \(x\)") as error:
        read_diffusers_folder(folder)
    assert one_line(error.value)
    with pytest.raises(DiffusersFormatError, match="not a diffusers folder"):
        read_diffusers_folder(tmp_path)
