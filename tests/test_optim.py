"""Adam as PyTorch 0.3 computed it (utils/optim.py): the update against the closed formula,
and how far it is from today's torch.optim.Adam at step 1."""
import math

import pytest
import torch

from utils.optim import LegacyAdam, make_adam


def _closed_form(theta, grads, lr, betas, eps, wd):
    """PyTorch 0.3's Adam written out: ε added to sqrt(v) before bias correction."""
    b1, b2 = betas
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t, g in enumerate(grads, 1):
        g = g + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
    return theta


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_legacy_adam_follows_the_0_3_formula(wd):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(7, generator=gen, dtype=torch.float64)
    # gradients of all sizes, some well below eps, so that where eps enters matters
    grads = [torch.randn(7, generator=gen, dtype=torch.float64) * s
             for s in (1e-9, 1.0, 1e-7, 3e-8, 0.5)]
    lr, betas, eps = 0.01, (0.9, 0.999), 1e-8
    p = torch.nn.Parameter(theta0.clone())
    opt = LegacyAdam([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = _closed_form(theta0, grads, lr, betas, eps, wd)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
    assert opt.state[p]["step"] == len(grads)


def test_step_one_with_small_gradients_is_sqrt_one_minus_beta2_of_todays():
    """With |g| << ε, step 1 moves by lr·g·sqrt(1-β2)/ε (0.3) against lr·g/ε (today)."""
    g = torch.tensor([1e-12, -2e-12, 5e-13], dtype=torch.float64)
    moved = {}
    for legacy in (True, False):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = make_adam([p], lr=1e-3, weight_decay=0.0, legacy_eps=legacy)
        assert isinstance(opt, LegacyAdam) == legacy
        p.grad = g.clone()
        opt.step()
        moved[legacy] = -p.detach()
    ratio = moved[True] / moved[False]
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.sqrt(1 - 0.999)), rtol=1e-3,
                               atol=0)
    # exactly: 0.3 moves lr·sqrt(1-β2)·g/(sqrt(1-β2)|g| + ε), today lr·g/(|g| + ε)
    s = math.sqrt(1 - 0.999)
    torch.testing.assert_close(moved[True], 1e-3 * s * g / (s * g.abs() + 1e-8))
    torch.testing.assert_close(moved[False], 1e-3 * g / (g.abs() + 1e-8))


def test_large_gradients_give_the_same_update():
    g = torch.tensor([0.3, -1.0, 2.0])
    out = []
    for legacy in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        opt = make_adam([p], lr=0.1, weight_decay=1e-4, legacy_eps=legacy)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
    torch.testing.assert_close(out[0], out[1])


def test_legacy_adam_resumes_from_a_torch_adam_state():
    """A state saved by either optimizer loads into the other (``step`` int or tensor)."""
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([0.1, -0.2])
    today = torch.optim.Adam([p], lr=0.1)
    today.step()
    legacy = LegacyAdam([p], lr=0.1)
    legacy.load_state_dict(today.state_dict())
    legacy.step()
    assert legacy.state[p]["step"] == 2
    back = torch.optim.Adam([p], lr=0.1)
    back.load_state_dict(legacy.state_dict())
    back.step()
    assert int(back.state[p]["step"]) == 3


def test_agent_lr_scale_gives_the_agent_its_own_rate(tiny_data, tiny_args, tmp_path,
                                                      monkeypatch):
    import finetune

    built = []
    original = finetune.make_adam

    def spy(params, lr, wd, legacy):
        built.append(original(params, lr, wd, legacy))
        return built[-1]
    monkeypatch.setattr(finetune, "make_adam", spy)
    finetune.main(tiny_args(tmp_path / "ft", "--base_ckpt", tiny_data["base"], "--agent",
                            "skipnet", "--max_epochs", "1", "--epoch_step", "1", "--lr", "1e-3",
                            "--agent_lr_scale", "20", "--test_every", "5"))
    groups = built[0].param_groups
    assert len(groups) == 2
    resnet, agent = groups
    assert math.isclose(resnet["lr"], 1e-4) and math.isclose(agent["lr"], 2e-3)  # decayed at 1
    from policies.skipnet import build_skip_gates
    from models import get_spec
    gates = build_skip_gates(get_spec("R32_C10"))
    assert [p.shape for p in agent["params"]] == [p.shape for p in gates.parameters()]


def test_one_rate_keeps_the_authors_single_group(tiny_data, tiny_args, tmp_path, monkeypatch):
    import finetune

    built = []
    original = finetune.make_adam
    monkeypatch.setattr(finetune, "make_adam",
                        lambda *a: built.append(original(*a)) or built[-1])
    finetune.main(tiny_args(tmp_path / "ft", "--base_ckpt", tiny_data["base"],
                            "--max_epochs", "0", "--test_every", "5"))
    assert len(built[0].param_groups) == 1


@pytest.mark.parametrize("extra,expected", [
    (["--agent_lr_scale", "0"], "--agent_lr_scale must be a finite number > 0, got 0.0"),
    (["--agent_lr_scale", "nan"], "--agent_lr_scale must be a finite number > 0, got nan"),
    (["--agent_lr_scale", "10", "--policy", "firstk", "--k", "5"],
     "--agent_lr_scale applies to a learned --agent"),
])
def test_bad_agent_lr_scale(extra, expected, tiny_data, tiny_args, tmp_path, capsys):
    import finetune
    from helpers import error_line

    line = error_line(finetune.main, tiny_args(tmp_path / "ft", "--base_ckpt",
                                               tiny_data["base"], *extra), capsys)
    assert expected in line


def test_a_resume_keeps_the_agents_rate(tiny_data, tiny_args, tmp_path, capsys):
    """The optimizer's groups are part of the run: --resume refuses another
    --agent_lr_scale in one line, and continues with the same one."""
    import finetune
    from helpers import error_line

    argv = tiny_args(tmp_path / "ft", "--base_ckpt", tiny_data["base"], "--agent", "skipnet",
                     "--max_epochs", "0", "--test_every", "5", "--agent_lr_scale", "20")
    finetune.main(argv)
    changed = [a if a != "20" else "1" for a in argv]
    line = error_line(finetune.main, [*changed, "--resume", "--max_epochs", "1"], capsys)
    assert "--resume continues the run" in line and "--agent_lr_scale 20" in line
    finetune.main([*argv, "--resume", "--max_epochs", "1"])
