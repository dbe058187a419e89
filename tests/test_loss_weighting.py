"""Loss weighting (issue 17, item 1): min-SNR-gamma and P2, right for each target, derived in float64 from the SNR."""

import pytest
import torch

from engine import diffusion
from engine.config import ConfigError
from engine.loss_weighting import loss_weights, signal_to_noise
from engine.schedule import NoiseSchedule
from kernels.noise import noise_keys
from kernels.registry import resolve_kernels

T = 1000


def predictions_of_one_x0_estimate(schedule: NoiseSchedule, t: torch.Tensor, generator: torch.Generator):
    """x0, eps and a network's x0 estimate at the same x_t, and each target's (prediction, goal) pair that
    the estimate implies: eps_hat and v_hat follow from x0_hat and x_t as a sampler would derive them."""
    shape = (len(t), 3, 4, 4)
    x0, eps = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1, torch.randn(shape, generator=generator, dtype=torch.float64)
    x0_hat = x0 + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    v, v_hat = a.sqrt() * eps - (1 - a).sqrt() * x0, a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    return {"eps": (eps_hat, eps), "x0": (x0_hat, x0), "v": (v_hat, v)}


def mse(prediction: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    return (prediction - goal).square().flatten(1).mean(dim=1)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_every_target_weighted_gives_the_papers_weighted_reference_error(name):
    """min-SNR: each target's weighted loss is min(SNR, gamma) times the x0 error; P2: 1 / (k + SNR)^gamma
    times the eps error, whichever target the network predicts."""
    schedule = NoiseSchedule.create(name, T).to(dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    pairs = predictions_of_one_x0_estimate(schedule, t, torch.Generator().manual_seed(0))
    snr = signal_to_noise(schedule)[t]
    assert snr[0] > 5 > snr[-1]  # gamma = 5 clips some timesteps and not others
    x0_error, eps_error = mse(*pairs["x0"]), mse(*pairs["eps"])
    torch.testing.assert_close(eps_error, snr * x0_error)  # the identity the weights rest on
    for target, (prediction, goal) in pairs.items():
        min_snr = loss_weights(schedule, target, "min_snr", min_snr_gamma=5.0)[t]
        torch.testing.assert_close(min_snr * mse(prediction, goal), snr.clamp(max=5.0) * x0_error, rtol=1e-10, atol=0)
        p2 = loss_weights(schedule, target, "p2", p2_k=1.0, p2_gamma=0.5)[t]
        torch.testing.assert_close(p2 * mse(prediction, goal), eps_error / (1.0 + snr) ** 0.5, rtol=1e-10, atol=0)
    assert loss_weights(schedule, "eps", "none") is None


def test_the_weights_in_closed_form():
    """Hang et al.'s table: min(SNR, g) / SNR for eps, min(SNR, g) for x0, min(SNR, g) / (SNR + 1) for v (diffusers
    #5654 used the eps weight for v); P2 with gamma 0 weights the eps error by 1."""
    schedule = NoiseSchedule.create("linear", T).to(dtype=torch.float64)
    snr = signal_to_noise(schedule)
    clipped = snr.clamp(max=5.0)
    torch.testing.assert_close(loss_weights(schedule, "eps", "min_snr"), clipped / snr)
    torch.testing.assert_close(loss_weights(schedule, "x0", "min_snr"), clipped)
    torch.testing.assert_close(loss_weights(schedule, "v", "min_snr"), clipped / (snr + 1))
    assert loss_weights(schedule, "eps", "min_snr")[-1] == 1.0  # SNR below gamma: the eps loss as it was
    torch.testing.assert_close(loss_weights(schedule, "eps", "p2", p2_gamma=0.0), torch.ones(T, dtype=torch.float64))


@pytest.mark.parametrize("implementation", ["pytorch", "triton"])
def test_the_weighted_training_loss_and_its_gradient_scale_each_sample_by_its_timesteps_weight(implementation):
    """Through the fused loss op (its own backward, Triton's in the interpreter): the weighted per-sample losses
    and the gradient equal the plain loss's times the weight of each sample's t."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.create("cosine", 50)
    kernels = resolve_kernels({"noise_loss": implementation, "q_sample_uint8": implementation}, "cpu", check=False)
    assert kernels.names["noise_loss"] == implementation
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def model(x, t):  # a stand-in for the UNet
        return conv(x)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    flip, t = torch.tensor([True, False, False, True]), torch.tensor([0, 10, 30, 49])
    keys = noise_keys(0, torch.arange(4))
    weights = loss_weights(schedule, "v", "min_snr", min_snr_gamma=1.0)
    results = []
    for table in (None, weights):
        conv.zero_grad()
        losses = diffusion.training_loss(model, kernels, schedule, images, flip, t, keys, target="v", weights=table)
        (losses * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
        results.append((losses.detach(), conv.weight.grad.clone()))
    (plain, _), (weighted, weighted_grad) = results
    torch.testing.assert_close(weighted, plain * weights[t])
    conv.zero_grad()
    losses = diffusion.training_loss(model, kernels, schedule, images, flip, t, keys, target="v")
    (losses * weights[t] * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    torch.testing.assert_close(weighted_grad, conv.weight.grad)
    assert (weights[t] - 1).abs().max() > 0.1  # the weights are not all 1 here


@pytest.mark.parametrize("key,value,message", [("min_snr_gamma", 0.0, "must be > 0"), ("p2_k", -1.0, "must be > 0"),
                                               ("p2_gamma", -0.5, "must be >= 0"),
                                               ("loss_weighting", "snr", "loss_weighting")])
def test_weighting_settings_are_checked(key, value, message):
    from engine.config import Config, config_from_dict

    raw = Config().to_dict()
    raw["diffusion"][key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, where="test")


def test_the_trainer_weights_its_step_by_the_configs_table():
    from engine.trainer import build_trainer, train_step
    from test_trainer import CPU, small_config

    batch = {"image": torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
             "skipped": 0}
    losses = {}
    for weighting in ("none", "min_snr"):
        trainer = build_trainer(small_config("model.channel_mult=[1]", "model.attention_resolutions=[]",
                                             f"diffusion.loss_weighting={weighting}", "diffusion.min_snr_gamma=1"), CPU)
        losses[weighting] = float(train_step(trainer, 0, lambda: batch).loss)
    torch.testing.assert_close(trainer.loss_weights, loss_weights(trainer.schedule, "v", "min_snr", min_snr_gamma=1.0))
    assert losses["min_snr"] < losses["none"]  # v weights min(SNR, 1) / (SNR + 1) are all below 1
