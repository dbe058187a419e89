"""Activation checkpointing (issue 17, item 5): the same loss and gradients as without, dropout included; fewer
bytes of saved activations; one graph under torch.compile."""

import pytest
import torch

from engine.unet import UNet

SMALL = dict(image_size=16, in_channels=3, out_channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(8,), dropout=0.3, num_classes=2)


def model_and_inputs(mode: str):
    torch.manual_seed(0)
    model = UNet(**SMALL, activation_checkpointing=mode).train()  # train: dropout draws masks
    with torch.no_grad():
        for parameter in model.parameters():  # the residual branches start at zero: give them weights
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    generator = torch.Generator().manual_seed(2)
    return model, (torch.randn(4, 3, 16, 16, generator=generator), torch.tensor([1, 300, 600, 999]), torch.tensor([0, 1, 2, 1]))


def saved_bytes(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The loss, the gradients and the bytes autograd kept for the backward (saved_tensors_hooks sees each)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    torch.manual_seed(3)  # dropout's masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(*inputs).square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, total


def test_checkpointed_blocks_give_the_same_loss_and_gradients_with_less_saved():
    results = {mode: saved_bytes(*model_and_inputs(mode)) for mode in ("none", "resblocks", "all")}
    loss, gradients, kept = results["none"]
    for mode in ("resblocks", "all"):
        other_loss, other_gradients, other_kept = results[mode]
        assert torch.equal(other_loss, loss), mode  # the same dropout masks: the RNG is replayed
        for name, gradient in gradients.items():
            torch.testing.assert_close(other_gradients[name], gradient, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")
    assert results["all"][2] < results["resblocks"][2] < 0.6 * kept, {m: r[2] for m, r in results.items()}


def test_no_checkpointing_without_gradients_and_the_mode_is_checked():
    model, inputs = model_and_inputs("all")
    with torch.no_grad():
        assert model(*inputs).shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="unknown activation checkpointing 'some'"):
        model.set_activation_checkpointing("some")


def test_a_checkpointed_model_compiles_into_one_graph_with_its_backward():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, inputs = model_and_inputs("all")
    counter = CompileCounterWithBackend("aot_eager")  # the checkpoint's recompute traced into the backward
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    torch.manual_seed(3)
    loss = compiled(*inputs).square().mean()
    loss.backward()
    assert counter.frame_count == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
