"""What only a CUDA device can show (issue 14): skipped on the CPU, run by `python -m benchmarks.gpu_check` on a GPU.

Beside these, the gpu_check runs tests/test_kernels.py (every Triton kernel against its reference, on the
device), the device-resident data's and the training step's host-sync checks.
"""

import pytest
import torch

from forked_cli import torchrun
from test_distributed import STEPS, repeated_image  # noqa: F401 (a fixture)
from test_train_cli import losses, run, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ONE_RANK = [*torchrun(1), "-m"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_16_bit_training_step_on_cuda(tmp_path, repeated_image, precision):  # noqa: F811
    result = train(tmp_path / "run", repeated_image, *STEPS, "train.device=cuda", f"train.precision={precision}")
    assert result.returncode == 0, result.stderr
    assert all(loss == loss and loss < 2.0 for loss in losses(tmp_path / "run").values())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_one_rank_with_nccl(tmp_path, repeated_image, parallel):  # noqa: F811
    """torchrun with one rank: the process group is NCCL's on CUDA, and DDP or FSDP2 wraps the model."""
    result = train(tmp_path / parallel, repeated_image, *STEPS, "train.device=cuda", f"train.parallel={parallel}",
                   launcher=ONE_RANK)
    assert result.returncode == 0, result.stderr
    assert sorted(losses(tmp_path / parallel)) == [1, 2, 3, 4]


def test_cuda_graph_sampling_equals_eager_sampling(tmp_path, repeated_image):  # noqa: F811
    """engine.sample compiles the denoising step in reduce-overhead mode (CUDA graphs) on CUDA by default; the
    solvers' steps carry their history through the graph's outputs (cloned, as the next replay overwrites them).
    The model is class-conditional and guided: one forward of the doubled batch inside the graph."""
    import numpy as np

    run_dir = tmp_path / "run"
    assert train(run_dir, repeated_image, *STEPS, "train.device=cuda", "model.num_classes=1",
                 "model.label_dropout=0.5").returncode == 0
    for sampler in ("ddim", "unipc", "dpm++2m-sde"):
        images = {}
        for mode in ("--compile", "--no-compile"):
            out = tmp_path / f"{sampler}{mode}.npz"
            result = run("engine.sample", run_dir, "--num-images", 8, "--sampler", sampler, "--steps", 10, "--guidance", 2,
                         "--device", "cuda", "--precision", "fp32", mode, "--npz", out, "--out", tmp_path / f"{mode}.png")
            assert result.returncode == 0, result.stderr
            images[mode] = np.load(out)["arr_0"].astype(np.int16)
        # fp32 both ways; Inductor's fused arithmetic may round a few pixels one level apart
        assert np.abs(images["--compile"] - images["--no-compile"]).max() <= 2, sampler
