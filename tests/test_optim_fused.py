"""`optim.fused_backward`: per-parameter steps inside backward give the plain optimizer's weights."""

from __future__ import annotations

import copy

import pytest
import torch

from loratk.core.optim import FusedBackwardOptimizer, build_lr_scheduler, build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _train(model, optimizer, scheduler, steps=4):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(5, 8, generator=gen), torch.randn(5, 4, generator=gen)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_fused_backward_equals_the_plain_step(name):
    plain, fused = _model(), _model()
    fused.load_state_dict(plain.state_dict())
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    opt_plain = build_optimizer([{"name": "m", "params": list(plain.parameters())}], name, **kwargs)
    opt_fused = build_optimizer(
        [{"name": "m", "params": list(fused.parameters())}], name, fused_backward=True, **kwargs
    )
    assert isinstance(opt_fused, FusedBackwardOptimizer)
    sched = dict(warmup_steps=2, total_steps=4)
    _train(plain, opt_plain, build_lr_scheduler(opt_plain, "linear", **sched))
    _train(fused, opt_fused, build_lr_scheduler(opt_fused, "linear", **sched))
    for (key, a), b in zip(plain.state_dict().items(), fused.state_dict().values(), strict=True):
        assert not torch.equal(a, _model().state_dict()[key])  # it trained
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in fused.parameters())  # gradients are freed as soon as used


def test_fused_state_dict_round_trips_and_resumes_identically():
    model = _model()
    opt = build_optimizer([{"params": list(model.parameters())}], "adamw", lr=1e-2, fused_backward=True)
    _train(model, opt, build_lr_scheduler(opt, "constant", warmup_steps=0, total_steps=4), steps=2)
    clone = copy.deepcopy(model)
    clone_opt = build_optimizer([{"params": list(clone.parameters())}], "adamw", lr=1e-2, fused_backward=True)
    clone_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (clone, clone_opt)):
        _train(m, o, build_lr_scheduler(o, "constant", warmup_steps=0, total_steps=4), steps=2)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_skips_a_non_finite_gradient_and_clips_per_parameter():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    opt = build_optimizer([{"params": list(model.parameters())}], "adamw", lr=1.0, fused_backward=True)
    (model(torch.tensor([[float("nan"), 1.0]])).sum()).backward()
    assert torch.equal(model.weight, before) and opt.skipped >= 1


def test_adamw8bit_builds_and_steps():
    model = torch.nn.Linear(64, 64)
    opt = build_optimizer([{"params": list(model.parameters())}], "adamw8bit", lr=1e-2)
    before = model.weight.detach().clone()
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(model.weight, before)


def test_a_closed_step_gate_skips_every_update_of_the_step():
    """The loop's gate (the step's loss was finite on every rank) decides for all parameters at once."""
    model = _model()
    opt = build_optimizer([{"params": list(model.parameters())}], "adafactor", lr=1e-2, fused_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(3, 8)
    opt.step_gate = lambda: False
    model(x).pow(2).mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert opt.skipped == len(before) and all(p.grad is None for p in model.parameters())
    opt.step_gate = lambda: True
    model(x).pow(2).mean().backward()
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
