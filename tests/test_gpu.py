"""The GPU lane (docs/gpu.md): what the CPU suite cannot reach, run on CUDA.

Every test here is marked ``gpu`` and skipped where CUDA is not available
(tests/conftest.py). On a GPU machine, from the repository root:

    python -m pytest -m gpu -v

* every forward path of every registered model agrees with the masked one
  (docs/models.md), in float32 and under bfloat16 autocast;
* the engine's curriculum and finetuning steps run on CUDA (float32 and bf16);
* ``test.py --device cuda`` prints the block that ``--device cpu`` prints;
* curriculum learning and finetuning under torchrun with NCCL on two GPUs;
* the benchmark's ``--device cuda --quick`` run.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import randomize_bn
from models import MODEL_SPECS, get_model, get_spec
from scripts import benchmark
from utils.data import get_dataset, write_cifar_folder
from policies.blockdrop import curriculum_train_step, finetune_train_step

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# relative logit tolerance of a path against the masked path: float32 kernels differ
# by batch size and algorithm; bfloat16 keeps 8 bits of mantissa through every block
RTOL = {"fp32": 1e-4, "bf16": 5e-2}


@pytest.fixture
def exact_fp32():
    """Float32 that is float32: cuDNN convolutions default to TF32 (10-bit mantissa)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def amp_context(amp: str, device: torch.device):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def assert_close_logits(expected: torch.Tensor, got: torch.Tensor, rtol: float) -> None:
    """Logits within ``rtol`` of the expected scale; the same prediction for every image
    whose two best classes are further apart than the tolerance."""
    expected, got = expected.float(), got.float()
    assert got.shape == expected.shape
    scale = float(expected.abs().max().clamp_min(1e-6))
    assert float((got - expected).abs().max()) <= rtol * scale
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * rtol * scale
    assert torch.equal(got.argmax(1)[clear], expected.argmax(1)[clear])


def eval_models(name: str, device: torch.device, seed: int = 0):
    """Random models with realistic BatchNorm statistics, in eval mode on ``device``."""
    torch.manual_seed(seed)
    rnet, agent = get_model(name)
    randomize_bn(rnet, seed)
    randomize_bn(agent, seed + 1)
    return rnet.to(device).eval(), agent.to(device).eval()


def policies_for(batch: int, num_blocks: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random per-image policies, two distinct policies (grouped path), all and none kept."""
    two = torch.randint(0, 2, (2, num_blocks), generator=gen).float()
    return {"random": torch.randint(0, 2, (batch, num_blocks), generator=gen).float(),
            "two_distinct": two[torch.arange(batch) % 2],
            "all": torch.ones(batch, num_blocks), "none": torch.zeros(batch, num_blocks)}


@pytest.mark.parametrize("amp", ["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_forward_paths_agree_with_masked(name, amp, exact_fp32):
    spec = get_spec(name)
    rnet, agent = eval_models(name, CUDA)
    batch = 6 if spec.image_size <= 64 else 3
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=gen).to(CUDA)
    rtol = RTOL[amp]
    with torch.inference_mode(), amp_context(amp, CUDA):
        probs, value = agent(x)
        assert probs.shape == (batch, spec.num_blocks) and value.shape == (batch, 1)
        assert probs.is_cuda and torch.isfinite(probs.float()).all()
        full = rnet.forward_full(x)
        assert_close_logits(full, rnet(x), rtol)  # policy=None: the full network
        for kind, cpu_policy in policies_for(batch, spec.num_blocks, gen).items():
            policy = cpu_policy.to(CUDA)
            masked = rnet(x, policy)
            assert masked.is_cuda and torch.isfinite(masked.float()).all(), kind
            assert_close_logits(masked, rnet.forward_dynamic(x, policy), rtol)
            assert_close_logits(masked, rnet.forward_dynamic(x, policy.bool()), rtol)
            together = rnet.forward_policies(x, [policy, torch.ones_like(policy)])
            assert_close_logits(masked, together[0], rtol)
            assert_close_logits(full, together[1], rtol)
            for i in (0, batch - 1):
                assert_close_logits(masked[i:i + 1], rnet.forward_single(x[i:i + 1], policy[i]),
                                    rtol)
            if kind == "all":
                assert_close_logits(masked, full, rtol)


def test_forward_paths_channels_last(exact_fp32):
    """channels_last weights and inputs on CUDA: gathers keep the layout, results agree."""
    rnet, _ = eval_models("R110_C10", CUDA)
    rnet.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 32, 32, generator=gen).to(CUDA).contiguous(
        memory_format=torch.channels_last)
    policy = torch.randint(0, 2, (8, rnet.num_blocks), generator=gen).float().to(CUDA)
    with torch.inference_mode():
        masked = rnet(x, policy)
        assert_close_logits(masked, rnet.forward_dynamic(x, policy), RTOL["fp32"])
        assert_close_logits(masked, rnet.forward_policies(x, [policy])[0], RTOL["fp32"])


def _step_inputs(name: str, batch: int, device: torch.device):
    spec = get_spec(name)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(batch, 3, spec.image_size, spec.image_size, generator=gen).to(device)
    y = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
    noise = torch.rand(batch, spec.num_blocks, generator=gen).to(device)
    return x, y, noise


def _assert_trains(out, params: list[torch.nn.Parameter], optimizer) -> None:
    """A finite loss on the device whose gradient reaches ``params`` and moves them."""
    assert out.loss.is_cuda and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.policy.is_cuda and out.reward.is_cuda and out.match.is_cuda
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    out.loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
    optimizer.step()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_curriculum_step_on_cuda(amp, exact_fp32):
    """The engine's curriculum step: frozen ResNet, dynamic and masked passes agree."""
    rnet, agent = eval_models("R32_C10", CUDA)
    agent.train()
    x, y, noise = _step_inputs("R32_C10", 16, CUDA)
    start = {k: v.clone() for k, v in agent.state_dict().items()}
    outs = []
    for dynamic in (False, True):
        agent.load_state_dict(start)
        out = curriculum_train_step(rnet, agent, x, y, noise, alpha=0.8, beta=0.1,
                                    penalty=-10.0, cl_step=5, dynamic=dynamic, amp=amp)
        outs.append(out)
        _assert_trains(out, list(agent.parameters()),
                       torch.optim.Adam(agent.parameters(), lr=1e-3))
    masked, dynamic = outs
    assert (masked.policy[:, :10] == 1).all()  # the curriculum keeps the first K - 5 blocks
    assert torch.equal(masked.policy, dynamic.policy)
    if amp == "none":
        assert torch.equal(masked.match, dynamic.match)
        assert torch.allclose(masked.reward, dynamic.reward)
        assert torch.allclose(masked.loss, dynamic.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_finetune_step_on_cuda(amp):
    """The engine's finetuning step: policy and ResNet in train mode, both updated."""
    rnet, agent = eval_models("R32_C10", CUDA)
    rnet.train()
    agent.train()
    x, y, noise = _step_inputs("R32_C10", 16, CUDA)
    params = list(agent.parameters()) + list(rnet.parameters())
    out = finetune_train_step(rnet, agent, x, y, noise, alpha=0.8, penalty=-5.0, amp=amp)
    _assert_trains(out, params, torch.optim.Adam(params, lr=1e-4))
    assert all(p.grad is not None for p in rnet.fc.parameters())


# -- test.py on CUDA -------------------------------------------------------------
BLOCK_LINE = re.compile(r"^\s*(Accuracy|Block Usage|FLOPs/img|Unique Policies): .*$", re.M)


def _decisive_subset(spec, rnet, agent, dataset, count: int) -> list[int]:
    """Indices of images whose predicted class and greedy policy are far from a tie
    (computed in float64), so that TF32 or another kernel cannot flip them."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).double()
    with torch.no_grad():
        logits = rnet.double()(images)
        probs, _ = agent.double()(images)
    rnet.float()
    agent.float()
    top2 = logits.topk(2, dim=1).values
    margin_ok = (top2[:, 0] - top2[:, 1]) > 0.05 * logits.abs().max()
    policy_ok = ((probs - 0.5).abs() > 0.02).all(1)
    keep = torch.nonzero(margin_ok & policy_ok).flatten().tolist()
    assert len(keep) >= count, f"only {len(keep)} decisive images"
    return keep[:count]


def _varied_policy(agent, images: torch.Tensor) -> None:
    """Set the keep head to a random projection of the standardised features, so
    that greedy policies vary from image to image (a random head keeps ~all or none)."""
    with torch.no_grad():
        feats = agent.features.forward_full(images)
        mu, sd = feats.mean(0), feats.std(0) + 1e-6
        w = torch.randn(agent.num_blocks, feats.shape[1]) / sd / feats.shape[1] ** 0.5 * 3
        agent.logit.weight.copy_(w)
        agent.logit.bias.copy_(-w @ mu)


@pytest.fixture(scope="module")
def eval_case(tmp_path_factory):
    """A CIFAR-10 test split of decisive images and a finetuned-style checkpoint."""
    root = tmp_path_factory.mktemp("gpu_eval")
    spec = get_spec("R32_C10")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(96, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=96)
    write_cifar_folder(str(root / "all"), images, labels, train=False)
    dataset = get_dataset(spec, str(root / "all"), train=False)
    rnet, agent = eval_models("R32_C10", torch.device("cpu"), seed=5)
    _varied_policy(agent, torch.stack([dataset[i][0] for i in range(len(dataset))]))
    keep = _decisive_subset(spec, rnet, agent, dataset, 40)
    data = str(root / "data")
    write_cifar_folder(data, images[keep], labels[keep], train=False)
    ckpt = str(root / "ckpt_E_2_A_0.500_R_1.00E-01_S_7.00_#_9.t7")
    torch.save({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 2,
                "reward": 0.1, "acc": 0.5}, ckpt)
    return {"data": data, "ckpt": ckpt}


def _test_py(eval_case, device: str, *extra: str) -> str:
    cmd = [sys.executable, "test.py", "--model", "R32_C10", "--load", eval_case["ckpt"],
           "--data_dir", eval_case["data"], "--workers", "0", "--batch_size", "16",
           "--device", device, *extra]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _block(stdout: str) -> list[str]:
    """The four lines of the evaluation block in test.py's output."""
    return [m.group(0).strip() for m in BLOCK_LINE.finditer(stdout)]


def test_test_py_prints_the_cpu_block_on_cuda(eval_case):
    cpu = _block(_test_py(eval_case, "cpu"))
    assert [line.split(":")[0] for line in cpu] == ["Accuracy", "Block Usage", "FLOPs/img",
                                                    "Unique Policies"]
    assert cpu[3] != "Unique Policies: 1"  # the policies really vary
    for extra in ((), ("--masked",)):
        assert _block(_test_py(eval_case, "cuda", *extra)) == cpu, extra


# -- several GPUs ------------------------------------------------------------------
def _metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _torchrun(script: str, argv: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script, *argv]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_nccl_two_gpus(tiny_data, tmp_path):
    """Curriculum learning, then finetuning from its checkpoint, each under torchrun
    with two processes, one GPU each (NCCL): one writer, both random states saved."""
    common = ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--batch_size", "8",
              "--workers", "0", "--device", "cuda", "--no_progress", "--parallel",
              "--base_ckpt", tiny_data["base"], "--max_epochs", "1", "--test_every", "1"]
    cl_dir, ft_dir = tmp_path / "cl", tmp_path / "ft"
    _torchrun("cl_training.py", common + ["--cv_dir", str(cl_dir)])
    cl_ckpt = sorted(cl_dir.glob("ckpt_E_1_*.t7"))
    assert len(cl_ckpt) == 1
    _torchrun("finetune.py", common + ["--cv_dir", str(ft_dir), "--pretrained", str(cl_ckpt[0])])
    for folder in (cl_dir, ft_dir):
        lines = _metrics(folder / "metrics.jsonl")
        assert [m["epoch"] for m in lines] == [0, 1]  # rank 0 alone writes
        assert all(np.isfinite(m["train"]["loss"]) for m in lines)
        assert lines[-1]["test"]["unique_policies"] >= 1
        last = torch.load(folder / "last.t7", weights_only=True, map_location="cpu")
        assert last["epoch"] == 1 and len(last["rng"]) == 2
    assert sorted(ft_dir.glob("ckpt_E_1_*.t7"))


# -- the benchmark -----------------------------------------------------------------
def test_benchmark_quick_on_cuda(tmp_path, exact_fp32):
    """``python -m scripts.benchmark --device cuda --quick``: every part runs and the
    batched evaluation prints what the authors' batch-1 loop prints (in float32,
    hence in this process with TF32 off); timings are not judged."""
    out = tmp_path / "bench.json"
    data = benchmark.main(["--device", "cuda", "--quick", "--out", str(out)])
    assert json.loads(out.read_text())["settings"]["device"] == "cuda"
    assert data["machine"]["gpu"] == torch.cuda.get_device_name(CUDA)
    assert data["settings"]["device"] == "cuda"
    assert {r["model"] for r in data["inference"]} == set(data["settings"]["models"])
    for row in data["inference"]:
        assert all(v > 0 for v in row["ms_per_image"].values())
        assert row["flop_bound"] > 1.0
    for ev in data["eval"]:
        assert ev["same_statistics"] is True, ev["printed"]
    assert all(v > 0 for v in data["curriculum"]["steps_per_s"].values())


def test_benchmark_gpu_options_from_the_command_line(tmp_path):
    """The command line itself, with the GPU-only options (channels_last, bf16)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "scripts.benchmark", "--device", "cuda", "--quick",
           "--models", "R32_C10", "--parts", "inference", "--channels-last", "--bf16",
           "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["settings"]["bf16"] and data["settings"]["channels_last"]
    assert [(r["model"], r["batch"]) for r in data["inference"]] == [("R32_C10", 1),
                                                                   ("R32_C10", 8)]
    assert all(v > 0 for r in data["inference"] for v in r["ms_per_image"].values())
