"""Two gloo processes on the CPU train like one process on the same global batch.

The engine is run with tiny BatchNorm-free networks (BatchNorm statistics are
per process under DDP, as they were per GPU under the authors' DataParallel),
so the two runs must agree to float rounding: same data order, same sampled
policies (keyed by image index), gradients averaged by DDP, statistics
gathered from both processes. A second test runs cl_training.py itself under
an ``env://`` process group, as torchrun would.
"""
import importlib
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import TensorDataset

from utils.dist import DistInfo, wrap
from policies.blockdrop import AgentSource, curriculum_train_step, finetune_train_step
from utils.engine import Loop, Stage, evaluate_policy, fit, lr_at
from utils.run_folder import RunLog
from utils.seeding import keyed_uniform

K, D, CLASSES, N = 4, 6, 3, 16
STAGES = ("cl", "finetune")


class TinyResNet(nn.Module):
    """K residual maps h += u_k · tanh(W_k h) and a classifier: no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(D, D) for _ in range(K))
        self.fc = nn.Linear(D, CLASSES)

    def forward(self, x, policy):
        for k, layer in enumerate(self.maps):
            x = x + policy[:, k:k + 1] * torch.tanh(layer(x))
        return self.fc(x)

    forward_dynamic = forward

    def forward_policies(self, x, policies, dynamic=True):
        return [self.forward(x, p) for p in policies]


class TinyPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit = nn.Linear(D, K)
        self.vnet = nn.Linear(D, 1)

    def forward(self, x):
        return torch.sigmoid(self.logit(x)), self.vnet(x)


def _data():
    g = torch.Generator().manual_seed(7)
    def make(n):
        return TensorDataset(torch.randn(n, D, generator=g),
                             torch.randint(0, CLASSES, (n,), generator=g))
    return make(N), make(6)


def train_tiny(rank: int, world: int, stage: str, out_dir: str) -> None:
    """Two epochs of the engine's loop; writes the final weights and the metrics."""
    from utils.data import make_loaders

    info = DistInfo(rank, world, rank)
    torch.manual_seed(0)
    rnet, agent = TinyResNet(), TinyPolicy()
    trainset, testset = _data()
    train_loader, test_loader, sampler = make_loaders(trainset, testset, 8, 0, 11, rank, world)
    device = torch.device("cpu")
    d_agent = wrap(agent, device, info)
    d_rnet = wrap(rnet, device, info) if stage == "finetune" else rnet
    params = list(agent.parameters()) + (list(rnet.parameters()) if stage == "finetune" else [])
    # weight decay makes the update depend on the gradient scale (Adam alone would not)
    optimizer = torch.optim.Adam(params, lr=0.05, weight_decay=0.5)

    def step_for(epoch):
        def step(x, y, idx):
            noise = keyed_uniform(11, epoch, idx, K)
            if stage == "cl":
                return curriculum_train_step(d_rnet, d_agent, x, y, noise, alpha=0.8, beta=0.1,
                                             penalty=-2.0, cl_step=epoch + 3)
            return finetune_train_step(d_rnet, d_agent, x, y, noise, alpha=0.8, penalty=-2.0,
                                       world_size=world)
        return step

    modules = {"agent": agent, "resnet": rnet}
    st = Stage(stage, modules, optimizer, lambda: (d_agent.train(), d_rnet.train()), step_for,
               lambda e: evaluate_policy(rnet, AgentSource(agent, 0), test_loader, device, -2.0,
                                         progress=False),
               lambda e: lr_at(e, 0.05, 0.1, 1),
               lambda e, s: (f"ckpt_{e}.t7", {"agent": agent.state_dict()}))
    os.makedirs(out_dir, exist_ok=True)
    folder = os.path.join(out_dir, f"world{world}")
    log = RunLog(folder, info.is_main)
    fit(st, Loop(range(0, 2), 0, lambda e: True, folder, "tiny", {}, progress=False),
        train_loader, sampler, device, info, log)
    log.close()
    if info.is_main:
        torch.save({k: m.state_dict() for k, m in modules.items()},
                   os.path.join(out_dir, f"weights{world}.pt"))


def _tiny_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for stage in STAGES:
            train_tiny(rank, world, stage, os.path.join(out_dir, stage))
    finally:
        dist.destroy_process_group()


def _metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Both stages, once in this process and once in two gloo processes."""
    out = tmp_path_factory.mktemp("ddp_tiny")
    for stage in STAGES:
        train_tiny(0, 1, stage, str(out / stage))
    mp.spawn(_tiny_worker, args=(2, str(out / "init"), str(out)), nprocs=2)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_match_one(stage, tiny_runs):
    out = tiny_runs / stage
    one, two = torch.load(out / "weights1.pt"), torch.load(out / "weights2.pt")
    for key in ("agent", "resnet"):
        for name, value in one[key].items():
            assert torch.allclose(value, two[key][name], atol=1e-6), (key, name)
    torch.manual_seed(0)
    rnet0, agent0 = TinyResNet(), TinyPolicy()
    assert not torch.equal(agent0.logit.weight, one["agent"]["logit.weight"])
    assert torch.equal(rnet0.fc.weight, one["resnet"]["fc.weight"]) == (stage == "cl")
    m1 = _metrics(out / "world1" / "metrics.jsonl")
    m2 = _metrics(out / "world2" / "metrics.jsonl")
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2, strict=True):
        for part in ("train", "test"):
            assert a[part]["unique_policies"] == b[part]["unique_policies"]
            for key in ("accuracy", "reward", "block_usage", "block_usage_std"):
                assert a[part][key] == pytest.approx(b[part][key], abs=1e-5)


def _script_worker(rank, world, port, argv, script="cl_training"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    importlib.import_module(script).main(argv)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cl_training_under_an_env_process_group(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "ddp"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "1", "--parallel")
    mp.spawn(_script_worker, args=(2, _free_port(), argv), nprocs=2)
    lines = _metrics(cv / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [0, 1]  # one writer
    assert lines[0]["test"]["unique_policies"] >= 1
    last = torch.load(cv / "last.t7", weights_only=True)
    assert len(last["rng"]) == 2 and last["epoch"] == 1


@pytest.mark.slow
def test_seq_and_fixed_policy_under_an_env_process_group(tiny_data, tiny_args, tmp_path):
    """BlockDrop-seq (gates and ResNet as one DDP module) and fixed-policy finetuning (the
    dropped blocks frozen, outside DDP) train under two processes."""
    base = ["--base_ckpt", tiny_data["base"], "--max_epochs", "0", "--parallel"]
    cl = tmp_path / "seq_cl"
    mp.spawn(_script_worker, args=(2, _free_port(), tiny_args(cl, *base, "--agent", "seq")),
             nprocs=2)
    (ckpt,) = cl.glob("ckpt_E_0_*.t7")
    ft = tmp_path / "seq_ft"
    argv = tiny_args(ft, *base, "--agent", "seq", "--pretrained", str(ckpt))
    mp.spawn(_script_worker, args=(2, _free_port(), argv, "finetune"), nprocs=2)
    fixed = tmp_path / "fixed"
    argv = tiny_args(fixed, *base, "--policy", "distributek", "--k", "5")
    mp.spawn(_script_worker, args=(2, _free_port(), argv, "finetune"), nprocs=2)
    for folder, stage in ((cl, "cl"), (ft, "finetune"), (fixed, "finetune_fixed")):
        last = torch.load(folder / "last.t7", weights_only=True)
        assert last["stage"] == stage and len(last["rng"]) == 2
