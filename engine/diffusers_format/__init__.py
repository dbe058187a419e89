"""The diffusers format: our UNet and schedule as a `DDPMPipeline` folder, and such folders read back.

engine.unet.UNet is the DDPM reference layer for layer, and diffusers' `UNet2DModel` can be configured to
be the same network (`AttnDownBlock2D` where ours attends, `DownBlock2D` elsewhere, 32-group norms with
eps 1e-6, [sin | cos] timestep features with freq_shift 1, right/bottom padding before the stride-2 conv).
This package translates the configuration both ways, refusing with one line (naming the setting and why)
whatever the other side cannot express, and renames the weights by walking our module tree, so that
every key on each side is mapped exactly once.

Writing needs only `safetensors` (not diffusers). Reading accepts a pipeline folder (`model_index.json`,
`unet/`, `scheduler/`), as `DDPMPipeline.save_pretrained` writes it, or a bare UNet folder (`config.json`
with `diffusion_pytorch_model.safetensors`, a sharded safetensors index, or a `.bin`), as
`UNet2DModel.save_pretrained` writes it; old checkpoints' attention names (query/key/value/proj_attn)
are accepted as well.

The scheduler is a `DDPMScheduler` (the training schedule, with the ddpm/ddim settings), or, for a run whose
`sample.sampler` is a fast solver (engine/solvers.py), the `DPMSolverMultistepScheduler` or
`UniPCMultistepScheduler` that steps as ours does, so that the pipeline reproduces our samples; reading such
a scheduler back gives the solver's sample settings.

One concept per module: `keys` (the state-dict key mapping, the weights renamed by it), `unet_config` and
`scheduler_config` (each config both ways), `folders` (reading and writing folders), `json_settings` (the
version, the error and the value checks they share). The public names are re-exported here.
"""

from engine.diffusers_format.folders import (LEGACY_WEIGHTS_NAME, MODEL_INDEX, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                                             DiffusersModel, check_destination, config_with_diffusers,
                                             init_state_dict, is_diffusers_folder, read_diffusers_folder,
                                             write_diffusers_folder)
from engine.diffusers_format.json_settings import DIFFUSERS_VERSION, DiffusersFormatError
from engine.diffusers_format.keys import KeyPair, diffusers_to_unet, key_pairs, unet_to_diffusers
from engine.diffusers_format.scheduler_config import (DPM_SOLVER, PREDICTION_TO_TARGET, SCHEDULE_TO_BETA_SCHEDULE,
                                                      SCHEDULER_DEFAULTS, SOLVER_SCHEDULER_DEFAULTS,
                                                      SOLVER_SCHEDULERS, TARGET_TO_PREDICTION, UNCAPPED, UNIPC,
                                                      VARIANCE_TYPES, diffusers_scheduler_config,
                                                      diffusion_fields_from_scheduler_config, run_scheduler_config,
                                                      solver_sample_fields, solver_scheduler_config)
from engine.diffusers_format.unet_config import (NORM_EPS, NORM_GROUPS, UNET_DEFAULTS, diffusers_unet_config,
                                                 model_fields_from_unet_config)

__all__ = [
    "DIFFUSERS_VERSION", "DPM_SOLVER", "LEGACY_WEIGHTS_NAME", "MODEL_INDEX", "NORM_EPS", "NORM_GROUPS",
    "PREDICTION_TO_TARGET", "SCHEDULER_DEFAULTS", "SCHEDULE_TO_BETA_SCHEDULE", "SOLVER_SCHEDULERS",
    "SOLVER_SCHEDULER_DEFAULTS", "TARGET_TO_PREDICTION", "UNCAPPED", "UNET_DEFAULTS", "UNIPC", "VARIANCE_TYPES",
    "WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "DiffusersFormatError", "DiffusersModel", "KeyPair",
    "check_destination", "config_with_diffusers", "diffusers_scheduler_config", "diffusers_to_unet",
    "diffusers_unet_config", "diffusion_fields_from_scheduler_config", "init_state_dict", "is_diffusers_folder",
    "key_pairs", "model_fields_from_unet_config", "read_diffusers_folder", "run_scheduler_config",
    "solver_sample_fields", "solver_scheduler_config", "unet_to_diffusers", "write_diffusers_folder",
]
