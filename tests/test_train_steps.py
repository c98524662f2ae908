"""The training steps on a real batch: curriculum forcing, what each stage updates."""
import torch

from models import get_model, get_spec
from utils.data import get_dataset
from policies.blockdrop import curriculum_train_step, finetune_train_step
from policies.rewards import bounded_probs, greedy_policy, sample_policy
from utils.engine import lr_at, multistep_lr, train_epoch


def _batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def _models():
    torch.manual_seed(0)
    rnet, agent = get_model("R32_C10")
    return rnet.eval(), agent.train()


def _flip_noise(agent, inputs):
    """Noise that makes every sampled decision the opposite of the greedy one."""
    with torch.no_grad():
        agent.eval()
        greedy = greedy_policy(agent(inputs)[0])
        agent.train()
    return greedy * 0.99


def test_curriculum_forcing_masks_the_first_blocks(tiny_data):
    rnet, agent = _models()
    trainset = get_dataset(get_spec("R32_C10"), tiny_data["data_dir"], train=True)
    inputs = torch.stack([trainset[i][0] for i in range(4)])  # a real, augmented batch
    with torch.no_grad():  # labels the base network gets right with every block: rewards differ
        targets = rnet.forward_full(inputs).argmax(1)
    noise = _flip_noise(agent, inputs)
    rnet.requires_grad_(False)
    out = curriculum_train_step(rnet, agent, inputs, targets, noise, alpha=0.8, beta=0.0,
                                penalty=-1.0, cl_step=3)
    K = 15
    assert torch.equal(out.policy[:, :K - 3], torch.ones(4, K - 3))
    out.loss.backward()
    w, b = agent.logit.weight.grad, agent.logit.bias.grad
    # the policy term (beta = 0) gives no gradient to the forced blocks' logits
    assert torch.count_nonzero(w[:K - 3]) == 0 and torch.count_nonzero(b[:K - 3]) == 0
    assert torch.count_nonzero(b[K - 3:]) == 3
    assert all(p.grad is None for p in rnet.parameters())


def test_curriculum_entropy_term_reaches_every_block():
    rnet, agent = _models()
    rnet.requires_grad_(False)
    inputs = _batch()
    out = curriculum_train_step(rnet, agent, inputs, torch.zeros(4, dtype=torch.long),
                                torch.rand(4, 15), alpha=0.8, beta=0.1, penalty=-1.0, cl_step=3)
    out.loss.backward()
    assert torch.count_nonzero(agent.logit.bias.grad) == 15


def test_curriculum_masked_and_dynamic_passes_agree():
    rnet, agent = _models()
    rnet.requires_grad_(False)
    inputs, targets = _batch(1), torch.arange(4)
    noise = torch.rand(4, 15, generator=torch.Generator().manual_seed(3))
    a = curriculum_train_step(rnet, agent, inputs, targets, noise, alpha=0.8, beta=0.1,
                              penalty=-5.0, cl_step=15, dynamic=True)
    b = curriculum_train_step(rnet, agent, inputs, targets, noise, alpha=0.8, beta=0.1,
                              penalty=-5.0, cl_step=15, dynamic=False)
    assert torch.equal(a.policy, b.policy) and torch.equal(a.reward, b.reward)
    assert torch.allclose(a.loss, b.loss)


def test_finetuning_updates_both_networks_curriculum_only_the_policy():
    inputs = _batch(2)
    for stage in ("cl", "finetune"):
        rnet, agent = _models()
        if stage == "cl":
            rnet.requires_grad_(False)
            params = list(agent.parameters())
        else:
            rnet.train()
            params = list(agent.parameters()) + list(rnet.parameters())
        before_r = [p.detach().clone() for p in rnet.parameters()]
        before_a = [p.detach().clone() for p in agent.parameters()]
        opt = torch.optim.Adam(params, lr=1e-2)
        noise = _flip_noise(agent, inputs)
        with torch.no_grad():  # labels right under the sampled policy: nonzero advantages
            sampled = sample_policy(bounded_probs(agent(inputs)[0], 0.8), noise)
            targets = rnet(inputs, sampled).argmax(1)

        def step(x, y, idx, stage=stage, rnet=rnet, agent=agent, noise=noise):  # noqa: B023
            if stage == "cl":
                return curriculum_train_step(rnet, agent, x, y, noise, alpha=0.8, beta=0.1,
                                             penalty=-1.0, cl_step=15)
            return finetune_train_step(rnet, agent, x, y, noise, alpha=0.8, penalty=-1.0)

        stats = train_epoch(step, [(inputs, targets, torch.arange(4))], opt,
                            torch.device("cpu"), progress=False)
        assert set(stats) >= {"accuracy", "reward", "block_usage", "unique_policies"}
        changed_r = any(not torch.equal(a, p)
                        for a, p in zip(before_r, rnet.parameters(), strict=True))
        changed_a = any(not torch.equal(a, p)
                        for a, p in zip(before_a, agent.parameters(), strict=True))
        assert changed_a
        assert changed_r == (stage == "finetune")


def test_finetune_sampled_pass_carries_gradient_to_the_resnet():
    rnet, agent = _models()
    rnet.train()
    inputs = _batch(4)
    out = finetune_train_step(rnet, agent, inputs, torch.arange(4), torch.rand(4, 15),
                              alpha=0.8, penalty=-5.0)
    out.loss.backward()
    assert rnet.fc.weight.grad is not None and torch.count_nonzero(rnet.fc.weight.grad) > 0
    assert agent.logit.weight.grad is not None


def test_lr_schedules():
    # the authors' LrScheduler: lr0 * ratio ** (epoch // epoch_step)
    assert [lr_at(e, 1e-4, 0.1, 1600) for e in (0, 1599, 1600, 3200)] == \
        [1e-4, 1e-4, 1e-4 * 0.1, 1e-4 * 0.1 ** 2]
    assert [multistep_lr(e, 0.1, 0.1, [82, 123]) for e in (0, 81, 82, 123, 163)] == \
        [0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1 ** 2, 0.1 * 0.1 ** 2]
