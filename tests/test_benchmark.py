"""The benchmark's smoke run, its JSON output and its flag checks (no timing asserts)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from models import get_model
from scripts.benchmark import calibrate_agent, main, random_policies

TINY = ["--quick", "--models", "R32_C10", "--batch-sizes", "1", "3", "--repeats", "1",
        "--warmup", "0", "--single-images", "2", "--eval-models", "R32_C10",
        "--eval-images", "6", "--eval-batch", "4", "--cl-model", "R32_C10", "--cl-batch", "4",
        "--cl-repeats", "1", "--seq-batches", "1", "2", "--seq-images", "2",
        "--profile-models", "R32_C10", "--profile-batches", "2"]


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(TINY + ["--out", str(out)])
    printed = capsys.readouterr().out
    assert "R32_C10" in printed and "FLOP bound" in printed and "Unique Policies" in printed
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__
    rows = data["inference"]
    assert [(r["model"], r["batch"], r["keep"]) for r in rows] == [("R32_C10", 1, 7),
                                                                  ("R32_C10", 3, 7)]
    # batch 1 runs --single-images images one at a time; a batch runs its own images
    assert [(r["images"], r["single_images"]) for r in rows] == [(2, 2), (3, 2)]
    for r in rows:
        assert set(r["ms_per_image"]) == {"full_eager", "full", "masked", "single", "dynamic"}
        assert all(v > 0 for v in r["ms_per_image"].values())
        assert r["speedup"]["full"] == 1.0
        assert 1.0 < r["flop_bound"] < 137725184 / 24479744  # below full / policy-net FLOPs
    assert data["fast"] == {"fold_bn": True, "channels_last": True}  # test.py's CPU defaults
    (prof,) = data["profile"]
    assert set(prof["paths"]) == {"full", "dynamic", "policy network"}
    dyn = prof["paths"]["dynamic"]["ms_per_image"]
    assert {"stem", "stage 1 blocks", "stage 3 blocks", "gather", "scatter", "head",
            "total"} <= set(dyn)
    assert abs(sum(v for k, v in dyn.items() if k != "total") - dyn["total"]) < 1e-6 * dyn["total"]
    (ev,) = data["eval"]
    assert ev["same_statistics"] is True and ev["images"] == 6
    assert all(v > 0 for v in ev["images_per_s"].values())
    cl = data["curriculum"]
    assert cl["cl_step"] == 15 and cl["batch"] == 4
    assert set(cl["steps_per_s"]) == {"masked", "dynamic"}
    assert "BlockDrop-seq" in printed
    seq = data["seq"]
    assert [(r["model"], r["batch"], r["seq_batch_mode"]) for r in seq] == [
        ("R32_C10", 1, "grouped"), ("R32_C10", 2, "grouped")]
    for r in seq:
        assert set(r["ms_per_image"]) == {"full", "blockdrop", "seq", "seq_masked",
                                          "seq_grouped"}
        assert all(v > 0 for v in r["ms_per_image"].values())
        assert 0 <= r["blocks_used"]["seq"] <= 15 and r["images"] == 2


@pytest.mark.parametrize("flags,message", [
    (["--batch-sizes", "0"], "--batch-sizes must be at least 1"),
    (["--keep", "R32_C10=16"], r"N must be in \[0, 15\]"),
    (["--keep", "R32_C10=-1"], r"N must be in \[0, 15\]"),
    (["--keep", "R32_C10"], "MODEL=N"),
    (["--keep", "R999=3"], "unknown model 'R999'"),
    (["--models", "R999"], "unknown model 'R999'; valid names: R32_C10"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--eval-images", "0"], "--eval-images must be at least 1"),
    (["--cl-keep-fraction", "1.5"], "--cl-keep-fraction"),
    (["--bf16"], "needs --device cuda"),
    (["--seq-batches", "0"], "--seq-batches must be at least 1"),
    (["--seq-models", "R999"], "unknown model 'R999'"),
])
def test_bad_flags_are_rejected(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--quick"] + flags)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_render_writes_between_the_markers(tmp_path, capsys):
    out, doc = tmp_path / "bench.json", tmp_path / "speed.md"
    main(TINY + ["--parts", "inference", "--out", str(out)])
    capsys.readouterr()
    doc.write_text("# Speed\n\nmethod\n<!-- benchmark:begin -->\nSTALE\n"
                   "<!-- benchmark:end -->\ntail\n")
    main(["--render", str(out), "--doc", str(doc)])
    page = doc.read_text()
    assert page.startswith("# Speed\n\nmethod\n<!-- benchmark:begin -->\nMeasured ")
    assert "STALE" not in page and page.endswith("<!-- benchmark:end -->\ntail\n")
    assert "| R32_C10 | 3 | 7/15 |" in page and torch.__version__ in page
    main(["--render", str(out)])
    assert capsys.readouterr().out in page


def test_methods_part_times_every_learned_method_and_renders_into_its_place(tmp_path, capsys):
    from policies.registry import method_names
    out, doc = tmp_path / "methods.json", tmp_path / "speed.md"
    main(["--parts", "methods", "--method-models", "R32_C10", "--method-batches", "1", "3",
          "--seq-images", "3", "--repeats", "1", "--warmup", "0", "--min-time", "0",
          "--out", str(out)])
    capsys.readouterr()
    rows = json.loads(out.read_text())["methods"]
    assert [(r["model"], r["batch"], r["images"]) for r in rows] == [("R32_C10", 1, 3),
                                                                     ("R32_C10", 3, 3)]
    for r in rows:
        timed = set(r["ms_per_image"]) - {"full"}
        assert timed | set(r["skipped"]) == set(method_names(learned=True))
        assert {"blockdrop", "seq", "skipnet", "convnet_aig", "act"} <= timed
        assert all(v > 0 for v in r["ms_per_image"].values())
        assert all(0 <= r["blocks_used"][m] <= 15 for m in timed)
    doc.write_text("<!-- benchmark:begin -->\nKEEP\n<!-- benchmark:end -->\n"
                   "<!-- benchmark:methods:begin -->\nSTALE\n<!-- benchmark:methods:end -->\n")
    main(["--render", str(out), "--doc", str(doc)])
    page = doc.read_text()
    assert "KEEP" in page and "STALE" not in page
    assert page.index("Every registered method") > page.index("<!-- benchmark:methods:begin")


def test_random_policies_keep_exactly_k():
    gen = torch.Generator().manual_seed(0)
    policy = random_policies(50, 54, 17, gen)
    assert policy.shape == (50, 54)
    assert (policy.sum(1) == 17).all()
    assert torch.unique(policy, dim=0).shape[0] > 40  # chosen per image
    assert random_policies(3, 15, 0, gen).sum() == 0 and random_policies(3, 15, 15, gen).all()


def test_calibrated_agent_keeps_the_asked_fraction():
    torch.manual_seed(0)
    _, agent = get_model("R32_C10")
    agent.eval()
    x = torch.rand(60, 3, 32, 32)
    calibrate_agent(agent, x, 1.0 / 3.0)
    with torch.no_grad():
        kept = (agent(x)[0] >= 0.5).float().mean(0)
    assert torch.allclose(kept, torch.full_like(kept, 1.0 / 3.0), atol=0.05)
