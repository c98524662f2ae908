"""ONNX export (models.export, scripts.export, utils.onnx_eval): ONNX Runtime gives the
policies, predictions and logits of PyTorch at batch 1 and 5, for BlockDrop (blocks kept
by every row, by none and by some), ACT (block stages halted after their first block by
every row, by none and by some) and every other registered method; files load with
onnxruntime alone; bad input ends in one line."""
from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import test as test_script
from helpers import error_line, printed_block, randomize_bn
from models import get_model, get_spec
from models.export import (ExportError, FixedDecision, PolicyNetDecision, check_metadata,
                           export_onnx, exportable, read_metadata)
from models.flops import flop_table
from policies.act import ActDecision, ActSource, build_halting_units, halting_flops
from policies.blockdrop import AgentSource
from policies.fixed import FixedSource, fixed_vector
from policies.method import Method
from policies.registry import get_method, method_names
from policies.seq import SeqDecision, SeqSource, build_seq_agent
from policies.source import PolicySourceError
from scripts import export as export_script
from utils.data import get_dataset
from utils.onnx_eval import OnnxModelError, evaluate_onnx, per_image_flops
from utils.stats import format_eval_block, policy_stats

R32 = get_spec("R32_C10")
ALL, NONE = range(0, 4), range(4, 8)  # blocks the biased policy keeps for every / no image


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ort(path: str, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return tuple(session.run(None, {"images": x.numpy()}))


def _compare(path: str, rnet, source, x: torch.Tensor, dynamic: bool = True,
             rel: float = 1e-5, thread_spread: bool = False) -> np.ndarray:
    """ONNX Runtime on ``x`` against ``source.run`` in PyTorch (``dynamic``, or masked):
    the same policy and predictions, logits to float rounding: ``rel`` of their scale, or
    with ``thread_spread`` four times PyTorch's own spread between one and two threads
    where that is larger (a random hundred-layer net can amplify rounding). Returns the
    policy."""
    logits, policy = _ort(path, x)
    with torch.no_grad():
        ref_logits, ref_policy = source.run(rnet, x, dynamic=dynamic)
    assert policy.dtype == np.uint8 and policy.shape == (x.shape[0], rnet.num_blocks)
    np.testing.assert_array_equal(policy, ref_policy.numpy().astype(np.uint8))
    np.testing.assert_array_equal(logits.argmax(1), ref_logits.argmax(1).numpy())
    atol = rel * max(float(ref_logits.abs().max()), 1.0)
    if thread_spread:
        threads = torch.get_num_threads()
        torch.set_num_threads(2 if threads == 1 else 1)
        try:
            with torch.no_grad():
                other = source.run(rnet, x, dynamic=dynamic)[0]
        finally:
            torch.set_num_threads(threads)
        atol = max(atol, 4 * float((other - ref_logits).abs().max()))
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=atol, rtol=0)
    return policy


def _export_random(name: str, model: str, folder, k: int) -> tuple:
    """``(rnet, source, path)``: method ``name`` on random ``model`` weights (BatchNorm
    statistics randomised, its network calibrated to spread the decisions on other images
    than the compared ones, which would otherwise sit on the threshold), exported to
    ``folder``; ``k``: the blocks a fixed rule keeps."""
    spec, method = get_spec(model), get_method(name)
    torch.manual_seed(2)
    rnet = randomize_bn(get_model(model)[0]).eval()
    agent = method.build(spec)
    if agent is not None:
        agent = randomize_bn(agent, seed=3).eval()
        with contextlib.suppress(NotImplementedError):
            method.calibrate(agent, rnet, _images(16, 5, spec.image_size), 0.5,
                             torch.Generator().manual_seed(0))
    k = None if method.learned or method.selected_by else k  # a regime keeps every block
    source = method.source(spec, agent, k=k)
    path = str(folder / f"{name}.onnx")
    export_onnx(exportable(rnet, method.export_decision(spec, agent, source)), path,
                model=model, input_size=spec.image_size)
    return rnet, source, path


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    rnet, agent = get_model("R32_C10")
    randomize_bn(rnet)
    randomize_bn(agent, seed=1)
    agent.eval()
    with torch.no_grad():  # blocks 0-3 kept by every image, 4-7 by none, the rest per image:
        agent.logit.weight.mul_(20.0)  # cut halfway between the 2nd and 3rd image of a batch
        logits = torch.logit(agent(_images(5, 10))[0].double()).sort(0).values
        agent.logit.bias.sub_(((logits[1] + logits[2]) / 2).float())
        agent.logit.bias[list(ALL)] = 1e4
        agent.logit.bias[list(NONE)] = -1e4
    return rnet.eval(), agent


@pytest.fixture(scope="module")
def blockdrop_onnx(nets, tmp_path_factory):
    rnet, agent = nets
    path = str(tmp_path_factory.mktemp("onnx") / "blockdrop.onnx")
    meta = export_onnx(exportable(rnet, PolicyNetDecision(agent)), path, model="R32_C10",
                       input_size=32, mean=R32.mean, std=R32.std)
    return path, meta


def test_blockdrop_matches_pytorch_at_batch_1_and_5(nets, blockdrop_onnx):
    rnet, agent = nets
    path, meta = blockdrop_onnx
    source = AgentSource(agent, flop_table("R32_C10").policy)
    policies = [_compare(path, rnet, source, _images(1, seed)) for seed in range(4)]
    policies.append(_compare(path, rnet, source, _images(5, 10)))
    batch = policies[-1]
    assert batch[:, list(ALL)].all() and not batch[:, list(NONE)].any()
    # some blocks are kept by some rows of the batch and dropped by others
    mixed = [t for t in range(8, R32.num_blocks) if 0 < batch[:, t].sum() < 5]
    assert mixed, batch
    assert meta["blockdrop.method"] == "blockdrop" and meta["blockdrop.num_blocks"] == "15"
    assert meta["blockdrop.kept_blocks"] == "per image"


def test_fixed_heuristics_export_the_static_subnetwork(nets, tmp_path):
    import onnx

    rnet, _ = nets
    for name in ("randomk", "distributek"):  # firstk: through the script, below
        vector = fixed_vector(name, R32.layers, 5, seed=3)
        path = str(tmp_path / f"{name}.onnx")
        meta = export_onnx(exportable(rnet, FixedDecision(name, vector)), path,
                           model="R32_C10", input_size=32)
        source = FixedSource(name, vector, 3)
        for x in (_images(1, 0), _images(5, 1)):
            policy = _compare(path, rnet, source, x)
            assert (policy == vector.numpy().astype(np.uint8)).all()
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert "NonZero" not in ops and "ScatterND" not in ops
        assert ops.count("Conv") == 1 + 2 * 5  # the stem and the kept blocks only
        kept = ",".join(str(t) for t in vector.nonzero().view(-1).tolist())
        assert (meta["blockdrop.method"], meta["blockdrop.kept_blocks"]) == (name, kept)


@pytest.mark.slow
def test_seq_matches_pytorch(nets, tmp_path):
    rnet, _ = nets
    torch.manual_seed(1)
    agent = build_seq_agent(R32).eval()
    with torch.no_grad():
        agent.gates[1].bias.copy_(torch.tensor([0.0, 1e4]))
        agent.gates[2].bias.copy_(torch.tensor([1e4, 0.0]))
        for gate in agent.gates:
            gate.weight.mul_(50.0)
    path = str(tmp_path / "seq.onnx")
    export_onnx(exportable(rnet, SeqDecision(agent)), path, model="R32_C10", input_size=32)
    for x in (_images(1, 0), _images(5, 1)):
        policy = _compare(path, rnet, SeqSource(agent), x)
        assert policy[:, 1].all() and not policy[:, 2].any()


ACT_BATCH = 5  # the images of the ACT tests: _images(ACT_BATCH, 1), together and one by one
ACT_STAGES = (range(0, 5), range(5, 10), range(10, 15))  # R32_C10's block stages


@pytest.fixture(scope="module")
def act_units(nets):
    """ACT halting units for the ``nets`` ResNet: stage 1 halts after its first block for
    every image (h_1 = 1), stage 2 for none (h = 0: all five blocks, the last with the
    remainder 1), stage 3 after its first block for three of the five images and after
    its third (h_2 = h_3 = 0.5) for the other two, with wide margins."""
    rnet, _ = nets
    torch.manual_seed(4)
    agent = build_halting_units(R32).eval()
    with torch.no_grad():
        for unit in agent.units[0]:
            unit.bias.fill_(1e4)
        for unit in agent.units[1]:
            unit.bias.fill_(-1e4)
        h = rnet.stem(_images(ACT_BATCH, 1))
        for t in (0, *ACT_STAGES[1], ACT_STAGES[2][0]):  # the blocks the images run up to
            h = rnet.run_block(t, h, rnet.residual(t, h))  # unit 1 of stage 3 reads
        first, *rest = agent.units[2]
        margin = h.mean((2, 3)) @ first.weight.view(-1)
        cut = margin.sort().values[1:3].mean()  # between the 2nd and 3rd image
        scale = 30.0 / float((margin - cut).abs().min())  # |logit| >= 30: h_1 is 0 or 1
        first.weight.mul_(scale)
        first.bias.fill_(-float(cut) * scale)
        for unit in rest:
            unit.weight.zero_()
            unit.bias.zero_()
    return agent


@pytest.fixture(scope="module")
def act_onnx(nets, act_units, tmp_path_factory):
    rnet, _ = nets
    path = str(tmp_path_factory.mktemp("onnx") / "act.onnx")
    meta = export_onnx(exportable(rnet, ActDecision(act_units, 1 - float(act_units.eps))),
                       path, model="R32_C10", input_size=32)
    return path, meta


def test_act_matches_pytorch_at_batch_1_and_5(nets, act_units, act_onnx):
    """Each stage of the exported ACT model halts as ``ActSource.run`` does, dynamic and
    masked: after the first block for every row (the other blocks run on 0 rows), for no
    row, and for some rows, at batch 5 and at batch 1 (a row's halted blocks: 0 rows)."""
    rnet, _ = nets
    path, meta = act_onnx
    source = ActSource(act_units)
    x = _images(ACT_BATCH, 1)
    for dynamic in (True, False):
        batch = _compare(path, rnet, source, x, dynamic)
        singles = np.concatenate([_compare(path, rnet, source, x[i:i + 1], dynamic)
                                  for i in range(ACT_BATCH)])
        np.testing.assert_array_equal(singles, batch)
    stages = [batch[:, list(blocks)].sum(1) for blocks in ACT_STAGES]
    assert (stages[0] == 1).all() and (stages[1] == 5).all()
    assert sorted(stages[2].tolist()) == [1, 1, 1, 3, 3]
    assert batch[:, list(ACT_STAGES[2])].tolist().count([1, 1, 1, 0, 0]) == 2
    assert meta["blockdrop.method"] == "act" and meta["blockdrop.kept_blocks"] == "per image"
    # FLOPs as test.py counts them: each image's halting units, not all of them
    table, policy = flop_table("R32_C10"), torch.from_numpy(batch)
    np.testing.assert_array_equal(
        per_image_flops(meta, table, policy),
        table.per_image(policy, include_policy=False) + halting_flops(act_units, policy))


def test_act_graph_runs_later_blocks_on_the_running_rows(act_onnx):
    """A stage's first block runs on every row; each later block on the rows gathered
    from the previous block's output (one row search per halting unit)."""
    import onnx

    path, _ = act_onnx
    nodes = onnx.load(path).graph.node
    producer = {out: node.op_type for node in nodes for out in node.output}
    units = sum(len(blocks) - 1 for blocks in ACT_STAGES)
    ops = [node.op_type for node in nodes]
    assert ops.count("NonZero") == ops.count("Sigmoid") == units
    # a block's first convolution reads gathered rows exactly for the non-first blocks
    firsts = [node for node in nodes if node.op_type == "Conv"][1::2]
    assert [producer.get(node.input[0]) == "GatherND" for node in firsts] == [
        b != blocks[0] for blocks in ACT_STAGES for b in blocks]


def test_file_runs_with_onnxruntime_alone(blockdrop_onnx, tmp_path):
    """A fresh interpreter outside the project (isolated mode: no cwd, no PYTHONPATH)
    runs the file with onnxruntime and numpy only."""
    path, _ = blockdrop_onnx
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "meta = s.get_modelmeta().custom_metadata_map\n"
            "x = np.zeros((3, 3, 32, 32), np.float32)\n"
            "logits, policy = s.run(None, {'images': x})\n"
            "assert 'models' not in sys.modules and 'utils' not in sys.modules\n"
            "print(meta['blockdrop.model'], logits.shape, policy.shape)\n")
    out = subprocess.run([sys.executable, "-I", "-c", code, path], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "R32_C10 (3, 10) (3, 15)"


def test_evaluate_onnx_feeds_the_statistics(nets, blockdrop_onnx):
    rnet, agent = nets
    path, _ = blockdrop_onnx
    x, y = _images(6, 2), torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
    policies, matches, logits = evaluate_onnx(path, R32, DataLoader(TensorDataset(x, y),
                                                                     batch_size=4))
    assert policies.dtype == torch.uint8 and policies.shape == (6, 15)
    assert matches.shape == (6,) and logits.shape == (6, 10)
    with torch.no_grad():
        ref_logits, ref_policy = AgentSource(agent, 0).run(rnet, x)
    assert torch.equal(policies, ref_policy.to(torch.uint8))
    assert torch.equal(matches, (ref_logits.argmax(1) == y).float())
    block = format_eval_block(policy_stats(policies, matches), [1] * 6)
    assert "Unique Policies" in block


def test_metadata_mismatch_and_bad_files(blockdrop_onnx, tmp_path):
    path, _ = blockdrop_onnx
    assert read_metadata(path)["blockdrop.input_size"] == "32"
    with pytest.raises(OnnxModelError, match=r"blockdrop\.onnx does not match: model R32_C10, "
                                             r"expected R110_C10"):
        evaluate_onnx(path, get_spec("R110_C10"), [])
    with pytest.raises(ExportError, match="input size 32, expected 224"):
        check_metadata(path, "R32_C10", 224)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00 this is not a model \xff" * 10)
    with pytest.raises(OnnxModelError, match="junk.onnx is not an ONNX model"):
        evaluate_onnx(str(junk), R32, [])
    with pytest.raises(OnnxModelError, match="no such ONNX file"):
        evaluate_onnx(str(tmp_path / "missing.onnx"), R32, [])


def test_script_exports_and_checks_a_fixed_policy(tiny_data, tmp_path, capsys):
    out = tmp_path / "firstk.onnx"
    result = export_script.main(["--model", "R32_C10", "--policy", "firstk", "--k", "4",
                                 "--base_ckpt", tiny_data["base"], "--out", str(out),
                                 "--check", "--check_images", "3"])
    check = result["check"]
    assert check["same_policies"] and check["same_predictions"]
    assert check["max_logit_diff"] <= 1e-4 * max(check["max_logit"], 1.0)
    assert result["metadata"]["blockdrop.kept_blocks"] == "0,1,2,3"
    assert "policies identical: True" in capsys.readouterr().out


@pytest.mark.parametrize("argv,expected", [
    (["--model", "R999"], "unknown model 'R999'"),
    (["--model", "R32_C10", "--load", "missing.t7"], "--load missing.t7: no such checkpoint"),
    (["--model", "R32_C10", "--policy", "firstk"], "--policy firstk needs --k"),
    (["--model", "R32_C10", "--policy", "firstk", "--k", "99"], "--k must be an integer between"),
])
def test_script_bad_input_is_one_line(argv, expected, tiny_data, tmp_path, capsys):
    argv = argv + ["--out", str(tmp_path / "m.onnx"), "--base_ckpt", tiny_data["base"]]
    line = error_line(export_script.main, argv, capsys)
    assert line.startswith("scripts.export: error: ") and expected in line, line


def test_script_refuses_an_existing_out(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    line = error_line(export_script.main, ["--model", "R32_C10", "--out", str(out)], capsys)
    assert "exists; pass --force" in line
    assert out.read_bytes() == b"keep me"


@pytest.mark.slow
def test_benchmark_onnx_part_smoke(tmp_path):
    """``python -m scripts.benchmark --parts onnx --quick``: rows, ratios and the profile,
    rendered between the page's onnx markers."""
    from scripts import benchmark

    out = tmp_path / "onnx.json"
    data = benchmark.main(["--parts", "onnx", "--quick", "--repeats", "1", "--warmup", "1",
                           "--onnx-batches", "1", "3", "--single-images", "2", "--out", str(out)])
    rows = data["onnx"]
    assert [(r["model"], r["batch"], r["images"]) for r in rows] == [("R32_C10", 1, 2),
                                                                      ("R32_C10", 3, 3)]
    for r in rows:
        assert all(v > 0 for v in r["ms_per_image"].values())
        assert 1.0 < r["flop_bound"] and r["share_of_bound"] > 0
    ops = rows[0]["ops"]["dynamic"]["kernel_ms_per_image"]
    assert {"Conv", "NonZero", "GatherND", "ScatterND"} <= set(ops)
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- benchmark:onnx:begin -->\nSTALE\n<!-- benchmark:onnx:end -->\ny\n")
    benchmark.main(["--render", str(out), "--doc", str(page)])
    text = page.read_text()
    assert "STALE" not in text and "| R32_C10 | 3 |" in text and text.endswith("y\n")


def test_test_py_onnx_prints_the_block_of_the_checkpoint(nets, tiny_data, tmp_path, capsys):
    """Export through the command line, then test.py --onnx against test.py --load."""
    rnet, agent = nets
    ckpt = str(tmp_path / "bd.t7")
    torch.save({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "model": "R32_C10",
                "agent_type": "blockdrop"}, ckpt)
    onnx = str(tmp_path / "bd.onnx")
    export_script.main(["--model", "R32_C10", "--load", ckpt, "--out", onnx])
    common = ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--workers", "0",
              "--batch_size", "3"]
    capsys.readouterr()
    test_script.main([*common, "--load", ckpt, "--out", str(tmp_path / "torch.json")])
    torch_block = printed_block(capsys.readouterr().out)
    test_script.main([*common, "--onnx", onnx, "--out", str(tmp_path / "onnx.json")])
    assert printed_block(capsys.readouterr().out) == torch_block
    line = error_line(test_script.main, [*common, "--onnx", onnx, "--load", ckpt], capsys)
    assert "--onnx" in line and "--load" in line
    line = error_line(test_script.main, [*common[:1], "R110_C10", *common[2:], "--onnx", onnx],
                      capsys)
    assert onnx in line and "R32_C10" in line


def test_act_checkpoint_exports_checks_and_evaluates_like_test_py(nets, tiny_data, tmp_path,
                                                                  capsys):
    """``scripts.export --check`` on an ACT checkpoint with ``--threshold 0.9`` baked in,
    then ``test.py --onnx`` prints the block of ``test.py --load --threshold 0.9``
    (FLOPs: each image's halting units, from the file's metadata)."""
    rnet, _ = nets
    testset = get_dataset(R32, tiny_data["data_dir"], train=False)
    images = torch.stack([testset[i][0] for i in range(len(testset))])
    g = torch.Generator().manual_seed(0)  # calibrated on other images than the test set's
    noisy = images.repeat(4, 1, 1, 1) + 0.5 * torch.randn(32, 3, 32, 32, generator=g)
    agent = build_halting_units(R32).eval()
    get_method("act").calibrate(agent, rnet, noisy, 0.5, g)
    ckpt = str(tmp_path / "act.t7")
    torch.save({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "model": "R32_C10",
                "agent_type": "act"}, ckpt)
    onnx = str(tmp_path / "act.onnx")
    result = export_script.main(["--model", "R32_C10", "--load", ckpt, "--threshold", "0.9",
                                 "--out", onnx, "--check", "--check_images", "5"])
    check = result["check"]
    assert check["same_policies"] and check["same_predictions"]
    assert check["max_logit_diff"] <= 1e-4 * max(check["max_logit"], 1.0)
    assert result["metadata"]["blockdrop.method"] == "act"
    assert "policies identical: True" in capsys.readouterr().out
    common = ["--model", "R32_C10", "--data_dir", tiny_data["data_dir"], "--workers", "0",
              "--batch_size", "3"]
    test_script.main([*common, "--load", ckpt, "--threshold", "0.9"])
    torch_block = printed_block(capsys.readouterr().out)
    assert "Unique Policies: 1\n" not in torch_block + "\n", torch_block  # decisions vary
    test_script.main([*common, "--onnx", onnx])
    assert printed_block(capsys.readouterr().out) == torch_block


@pytest.mark.parametrize("name", [n for n in method_names()
                                  if n not in ("blockdrop", "seq", "firstk", "randomk",
                                               "distributek", "act")])
def test_every_other_registered_method_exports(name, tmp_path):
    """Each method the tests above do not cover: ONNX Runtime against its PyTorch source
    at batch 1 and 5, on random weights calibrated to spread the decisions."""
    rnet, source, path = _export_random(name, "R32_C10", tmp_path, k=7)
    assert read_metadata(path)["blockdrop.method"] == name
    for x in (_images(1, 0), _images(5, 1)):
        _compare(path, rnet, source, x)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["R110_C100", "R101_ImgNet"])
@pytest.mark.parametrize("name", method_names())
def test_every_method_exports_on_the_other_backbones(name, model, tmp_path):
    """Every registered method on CIFAR-100's R110 and on ImageNet's bottleneck R101 at
    224 px: ONNX Runtime against PyTorch at batch 1 and 3, logits to 1e-4 of their scale
    or to PyTorch's own spread between thread counts (ACT's on R101 move by 1e-3)."""
    rnet, source, path = _export_random(name, model, tmp_path, k=get_spec(model).num_blocks // 3)
    size = get_spec(model).image_size
    for x in (_images(1, 0, size), _images(3, 1, size)):
        _compare(path, rnet, source, x, rel=1e-4, thread_spread=True)


def test_a_method_without_export_is_refused_in_one_line():
    class Unexported(Method):
        name = "unexported"

    with pytest.raises(PolicySourceError, match="^the unexported method does not export to "
                                                "ONNX$"):
        Unexported().export_decision(R32, None, None)
