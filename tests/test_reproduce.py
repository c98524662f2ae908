"""The reproduction scripts: paper numbers as data, tables beside the paper,
released-checkpoint discovery, training steps, and every script's --smoke run."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

import test as test_script
from helpers import make_cifar, pk_layout, randomize_bn
from legacy_writer import legacy_state_dict, save_pytorch03
from models import get_model
from policies.registry import method_names
from scripts import reproduce
from scripts.repro.steps import StepError, make_step, run_step
from scripts.repro.paper import paper_row, paper_rows
from scripts.repro.report import Label, Metric, Table, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the paper's numbers ----------------------------------------------------------------
def test_paper_tables_are_complete_and_consistent():
    assert len(paper_rows("table1")) == 20 and len(paper_rows("table2")) == 6
    assert len(paper_rows("table3")) == 6 and len(paper_rows("table4")) == 7
    assert paper_row("table1", model="R110_C10", method="blockdrop") == {
        "model": "R110_C10", "method": "blockdrop", "acc": 75.4, "k": 20.1, "acc_ft": 93.6,
        "k_ft": 16.9}
    assert paper_row("table2", model="R110_C10", method="seq")["ms"] == 29.1
    # the supplement's speed-up is the FLOP reduction against the full ResNet of the table
    for table, full_of in (("table3", {"R32_C10": 1.38e8, "R110_C10": 5.06e8}),
                           ("table4", {"R101_ImgNet": 1.56e10})):
        for row in paper_rows(table):
            if row["gamma"] is not None:
                implied = 100 * (1 - row["flops"] / full_of[row["model"]])
                assert abs(implied - row["speedup"]) < 0.25, row
    assert paper_row("table4", model="R101_ImgNet", gamma=5)["usage"] == 24.8


def test_table_puts_paper_beside_ours(tmp_path):
    table = Table("T", [Label("net", "network"), Metric("acc", "accuracy", ".1f"),
                        Metric("flops", "FLOPs", ".2E", std=True),
                        Metric("ms", "ms", ".2f", paper=False)])
    table.add({"net": "a"}, {"acc": 93.64, "flops": 1.8e8, "flops_std": 3e7, "ms": 1.5},
              {"acc": 93.6, "flops": 1.81e8, "flops_std": 3.43e7})
    table.add({"net": "b"}, {"acc": None})
    md = table.markdown()
    assert "accuracy (ours) | accuracy (paper) | Δ" in md
    assert "| a | 93.6 | 93.6 | +0.0 | 1.80E+08 ± 3.00E+07 | 1.81E+08 ± 3.43E+07 | -1.00E+06 |" \
        " 1.50 |" in md
    assert "| b | – | – | – |" in md
    md_path, csv_path = write_table(table, str(tmp_path), "t")
    rows = list(csv.DictReader(open(csv_path)))
    assert float(rows[0]["diff_acc"]) == pytest.approx(0.04)
    assert float(rows[0]["paper_flops_std"]) == 3.43e7 and rows[1]["acc"] == ""
    assert open(md_path).read().startswith("# T")


# -- training steps ------------------------------------------------------------------------
def _step(tmp_path, data_dir, **extra):
    opts = {"model": "R32_C10", "data_dir": data_dir, "cv_dir": str(tmp_path / "pre"),
            "device": "cpu", "workers": 0, "no_progress": True, "epochs": 1, "batch_size": 8,
            "milestones": [1], "test_every": 1, **extra}
    return make_step("pretrain R32_C10", "pretrain_resnet.py",
                     os.path.join(ROOT, "configs/pretrain/R32_C10.yaml"), opts,
                     str(tmp_path / "logs" / "pre.log"))


def test_step_skip_interrupt_resume_force(tmp_path, tiny_data):
    step = _step(tmp_path, tiny_data["data_dir"])
    final = run_step(step, say=lambda m: None)
    assert os.path.basename(final).startswith("pk_E_1_")
    said = []
    assert run_step(step, say=said.append) == final and said[0].startswith("[skip]")
    os.remove(final)  # so it looks interrupted: last.t7 without the final checkpoint
    with pytest.raises(StepError, match="interrupted.*--resume.*--force"):
        run_step(step, say=lambda m: None)
    run_step(step, force=True, say=said.append)
    assert any(s.startswith("[force]") for s in said)
    assert [p for p in os.listdir(tmp_path) if p.startswith("pre.replaced-")]


def test_failing_step_names_itself_its_log_and_command(tmp_path, tiny_data):
    bad = _step(tmp_path, tiny_data["data_dir"], lr=-1)
    with pytest.raises(StepError) as err:
        run_step(bad, say=lambda m: None)
    text = str(err.value)
    assert "step 'pretrain R32_C10' failed" in text and "--lr must be > 0" in text
    assert f"Log: {bad.log}" in text and "pretrain_resnet.py --config" in text
    assert "--lr=-1" in open(bad.log).read()


# -- released checkpoints ----------------------------------------------------------------
def _released_tree(root, gammas=(5, 10)):
    """The authors' tarball layout with PyTorch 0.3 files of R32_C10."""
    torch.manual_seed(0)
    base, _ = get_model("R32_C10")
    randomize_bn(base, 3)
    pk = root / "pretrained" / "R32_C10"
    pk.mkdir(parents=True)
    save_pytorch03({"state_dict": pk_layout(base)}, str(pk / "pk_E_164_A_0.923.t7"))
    for g in gammas:
        rnet, agent = get_model("R32_C10")
        randomize_bn(rnet, g)
        with torch.no_grad():
            agent.logit.bias.fill_(0.3 * g - 2.0)
        folder = root / "finetuned" / f"R32_C10_gamma_{g}"
        folder.mkdir(parents=True)
        save_pytorch03({"agent": legacy_state_dict(agent), "resnet": legacy_state_dict(rnet),
                        "epoch": 2000, "reward": 0.1, "acc": 0.9},
                       str(folder / f"ckpt_E_2000_A_0.900_R_1.00E-01_S_{g}.00_#_1.t7"))
    return root


def _run(*argv):
    return reproduce.main(list(argv))


def test_table3_released_equals_test_py(tmp_path, capsys):
    cv = _released_tree(tmp_path / "cv")
    data = make_cifar(tmp_path / "data", n=12)
    out = tmp_path / "out"
    assert _run("table3", "--released", str(cv), "--data_dir", data, "--out", str(out),
                "--device", "cpu", "--workers", "0", "--time_images", "2", "--repeats",
                "1", "--batch_size", "5") == 0
    rows = list(csv.DictReader(open(out / "table3.csv")))
    assert [r["network"].split(" ")[0] for r in rows] == ["ResNet-32", "BlockDrop-32",
                                                          "BlockDrop-32"]
    assert [r["gamma"] for r in rows] == ["–", "5", "10"]
    for row, g in zip(rows[1:], (5, 10), strict=False):
        ckpt = next((cv / "finetuned" / f"R32_C10_gamma_{g}").glob("ckpt_*.t7"))
        ref = tmp_path / f"ref{g}.json"
        test_script.main(["--model", "R32_C10", "--data_dir", data, "--load", str(ckpt),
                          "--workers", "0", "--device", "cpu", "--out", str(ref)])
        want = json.load(open(ref))
        assert float(row["accuracy"]) == pytest.approx(100 * want["accuracy"], abs=1e-9)
        assert float(row["usage"]) == pytest.approx(want["block_usage_mean"], abs=1e-9)
        assert float(row["usage_std"]) == pytest.approx(want["block_usage_std"], abs=1e-9)
        assert float(row["flops"]) == pytest.approx(want["flops_mean"], rel=1e-12)
        assert float(row["flops_std"]) == pytest.approx(want["flops_std"], rel=1e-12)
        assert int(float(row["unique"])) == want["unique_policies"]
        assert row["measured_speedup"] != ""
    assert rows[2]["paper_accuracy"] == ""  # the paper has no R32 γ=10 model
    assert float(rows[1]["paper_accuracy"]) == pytest.approx(91.3)
    assert float(rows[0]["paper_flops"]) == 1.38e8 and float(rows[0]["flops"]) == 137725184
    md = open(out / "table3.md").read()
    assert "accuracy (%) (paper)" in md and "scripts/table3.sh --released" in md
    assert os.path.getsize(out / "table3_figure3.png") > 10000


def test_released_bad_input(tmp_path, capsys):
    data = make_cifar(tmp_path / "data", n=4)
    empty = tmp_path / "cv"
    empty.mkdir()
    assert _run("table3", "--released", str(empty), "--data_dir", data, "--out",
                str(tmp_path / "o1")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no finetuned checkpoints of R32_C10, R110_C10" in err
    assert "finetuned/<model>_gamma_<γ>/ckpt_E_*.t7" in err and "pretrained/<model>/" in err
    assert _run("table3", "--released", str(empty), "--data_dir", str(tmp_path / "nodata"),
                "--out", str(tmp_path / "o2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CIFAR-10 test data not found" in err
    assert "nodata/cifar-10-batches-py" in err


def test_out_folder_of_another_command_is_refused(tmp_path, capsys):
    data = make_cifar(tmp_path / "data", n=4)
    cv = _released_tree(tmp_path / "cv", gammas=(5,))
    out = str(tmp_path / "out")
    common = ["--data_dir", data, "--out", out, "--workers", "0", "--time_images", "1",
              "--repeats", "1"]
    assert _run("table3", "--released", str(cv), *common) == 0
    assert _run("table3", "--released", str(cv), "--models", "R32_C10", *common) == 1
    assert "holds results of a different command" in capsys.readouterr().err
    assert _run("table3", "--released", str(cv), "--models", "R32_C10", *common,
                "--force") == 0


def test_compare_gamma_refuses_different_models(tmp_path, capsys):
    paths = []
    for name in ("R32_C10", "R110_C10"):
        rnet, agent = get_model(name)
        path = tmp_path / f"{name}.t7"
        torch.save({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "model": name},
                   path)
        paths.append(str(path))
    assert _run("compare_gamma", *paths, "--out", str(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "different models" in err and "(R32_C10)" in err and "(R110_C10)" in err


# -- smoke runs: every script end to end on generated data -------------------------------
SMOKE = {
    "table1": ["table1.md", "table1.csv", "table1_acc.png", "table1_acc_ft.png"],
    "table2": ["table2.md", "table2.csv", "table2_times.png"],
    "table3": ["table3.md", "table3.csv", "table3_figure3.png"],
    "compare_gamma": ["compare_gamma.md", "compare_gamma.csv", "compare_gamma_figure3.png"],
    "figures": ["figures.md", "figures.csv", "figures_usage_histogram.png",
                "figures_keep_rate.png", "figures_accuracy_by_blocks.png",
                "figure4_dominant_policies.png", "figure5_fewest_most_blocks.png"],
}


def run_smoke(name, tmp_path, files):
    out = tmp_path / name
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", f"{name}.sh"), "--smoke",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in files:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert "Smoke run" in (out / files[0]).read_text()
    return out


@pytest.mark.long
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n == "compare_gamma" else n for n in sorted(SMOKE)])
def test_smoke(name, tmp_path):
    """Every script's smoke run; compare_gamma (the same training steps as table3 at
    other gammas) under --runslow."""
    run_smoke(name, tmp_path, SMOKE[name])


@pytest.mark.slow
def test_smoke_table4(tmp_path):
    """ResNet-101 at 224 px on the CPU, on a handful of images (about 2-3 minutes)."""
    run_smoke("table4", tmp_path, ["table4.md", "table4.csv", "table4_figure3.png"])


def test_a_failing_step_stops_the_script(tmp_path, capsys):
    data = make_cifar(tmp_path / "data", n=8)
    make_cifar(tmp_path / "data", n=16, train=True)
    bad = tmp_path / "base.t7"
    bad.write_text("not a checkpoint")
    out = tmp_path / "out"
    assert _run("table3", "--models", "R32_C10", "--gammas", "5", "--data_dir", data,
                "--out", str(out), "--base_ckpt", str(bad), "--workers", "0") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "step 'curriculum R32_C10' failed" in err and "not a readable PyTorch checkpoint" in err
    assert f"Log: {out}/logs/curriculum_R32_C10.log" in err
    assert "cl_training.py --config" in err.split("Rerun it with: ")[1]
    assert not (out / "cv" / "finetuned").exists() and not (out / "table3.md").exists()


def test_table1_gamma_follows_the_paper():
    from scripts.repro.table1 import table1_gamma
    assert table1_gamma("R32_C10", None) == 5.0 and table1_gamma("R110_C10", None) == 10.0
    assert table1_gamma("R32_C100", None) == 5.0 and table1_gamma("R110_C10", 2.0) == 2.0


@pytest.mark.long
def test_smoke_pareto_draws_every_method(tmp_path):
    """Every registered method trained on generated data, swept and timed on one backbone."""
    out = run_smoke("pareto", tmp_path, ["pareto.md", "pareto.csv", "pareto_flops.png",
                                         "pareto_time.png"])
    with open(out / "pareto.csv") as f:
        drawn = {row["method"] for row in csv.DictReader(f)}
    assert "full network" in drawn
    for name in method_names():
        assert any(m == name or m.startswith(f"{name} + ") for m in drawn), (name, drawn)


def test_pareto_refuses_mixed_backbones_and_empty_run_folders(tmp_path):
    a, b, empty = tmp_path / "a.t7", tmp_path / "b.t7", tmp_path / "empty_run"
    torch.save({"model": "R32_C10", "agent": {}}, a)
    torch.save({"model": "R110_C10", "agent": {}}, b)
    empty.mkdir()
    for paths, needle in (([a, b], "different models"), ([empty], "no ckpt_E_")):
        proc = subprocess.run([sys.executable, "-m", "scripts.reproduce", "pareto",
                               *map(str, paths), "--out", str(tmp_path / "out")], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_step_that_loads_a_checkpoint_ends_at_the_continued_epoch(tmp_path):
    """--load continues the loaded epoch count for max_epochs + 1 epochs, so a chained
    step's final checkpoint is ckpt_E_<loaded + 1 + max_epochs>."""
    from scripts.repro.steps import make_step
    config = tmp_path / "step.yaml"
    config.write_text("model: R32_C10\nmax_epochs: 25\ncv_dir: cv/x/\n")
    fresh = make_step("a", "finetune.py", str(config), {}, str(tmp_path / "a.log"))
    chained = make_step("b", "finetune.py", str(config),
                        {"load": "cv/sp/ckpt_E_163_A_0.900_R_-1.00E-01_S_9.00_#_3.t7"},
                        str(tmp_path / "b.log"))
    assert (fresh.final_epoch, chained.final_epoch) == (25, 189)
    assert 189 % chained.options["test_every"] == 0  # the final epoch is tested and saved
