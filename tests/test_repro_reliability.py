"""What the reproduction tools promise when something goes wrong (docs/reliability.md):
interrupted steps resume, bookkeeping files are atomic and read defensively, cached
evaluations follow what they depend on, every failure is one line, flags are checked first."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import signal
import sys
import threading
import time

import pytest

from helpers import make_cifar
from models import get_spec
from scripts import benchmark, demo_data, reproduce
from scripts.repro import commands, outdir, smoke
from scripts.repro.evaluation import EvalRequest, run_test
from scripts.repro.steps import Step, StepError, flags, make_step, run_step
from utils.data import get_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _exit_code(main, argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


# -- training steps -----------------------------------------------------------------------
def _pretrain(tmp_path, data_dir, epochs):
    opts = {"model": "R32_C10", "data_dir": data_dir, "cv_dir": str(tmp_path / "pre"),
            "device": "cpu", "workers": 0, "no_progress": True, "epochs": epochs,
            "batch_size": 8, "milestones": [1], "test_every": 1}
    return make_step("pretrain R32_C10", "pretrain_resnet.py",
                     os.path.join(ROOT, "configs/pretrain/R32_C10.yaml"), opts,
                     str(tmp_path / "logs" / "pre.log"))


@pytest.mark.slow
def test_step_killed_before_its_first_last_t7_resumes(tmp_path, tiny_data):
    """A step stopped after ``pk_E_1`` but before any ``last.t7`` is interrupted work:
    refused without --resume, continued with it (two pretraining runs: about 15 s)."""
    first = _pretrain(tmp_path, tiny_data["data_dir"], 1)
    run_step(first, say=lambda m: None)
    os.remove(os.path.join(first.folder, "last.t7"))
    step = _pretrain(tmp_path, tiny_data["data_dir"], 2)
    with pytest.raises(StepError, match="interrupted.*--resume"):
        run_step(step, say=lambda m: None)
    final = run_step(step, resume=True, say=lambda m: None)
    assert os.path.basename(final).startswith("pk_E_2_")


def test_the_rerun_command_names_this_python_and_a_reachable_script(tmp_path):
    step = Step("x", "finetune.py", ["--penalty=-1e-05"], str(tmp_path), 1, "log")
    argv = shlex.split(step.command("--resume"))
    assert argv[0] == sys.executable and os.path.isfile(argv[1])
    assert argv[2:] == ["--penalty=-1e-05", "--resume"]


def test_a_step_killed_by_a_signal_says_so(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    step = Step("dies", str(script), [], str(tmp_path / "run"), 1, str(tmp_path / "dies.log"))
    with pytest.raises(StepError, match="step 'dies' failed: killed by signal SIGKILL"):
        run_step(step, say=lambda m: None)


def test_a_stopped_reproduction_stops_its_step(tmp_path):
    """SIGTERM to the reproduction reaches the running step, which can release its folder."""
    marker = tmp_path / "marker"
    script = tmp_path / "slow.py"
    script.write_text(
        "import signal, sys, time\n"
        f"MARK = {str(marker)!r}\n"
        "def stop(*_):\n"
        "    open(MARK, 'w').write('stopped')\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "open(MARK, 'w').write('up')\n"
        "time.sleep(60)\n")
    step = Step("slow", str(script), [], str(tmp_path / "run"), 1, str(tmp_path / "slow.log"))

    def stop_when_up():
        deadline = time.time() + 30
        while time.time() < deadline and not (marker.exists() and marker.read_text()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_up, daemon=True).start()
    with pytest.raises(SystemExit) as info:
        run_step(step, say=lambda m: None)
    assert info.value.code == 128 + signal.SIGTERM
    assert marker.read_text() == "stopped"


def test_values_reach_the_scripts_as_one_token():
    argv = flags({"penalty": -1e-05, "lr": 0.1, "milestones": [1, 2], "no_progress": True,
                  "pretrained": None})
    assert argv == ["--penalty=-1e-05", "--lr=0.1", "--milestones", "1", "2", "--no_progress"]
    p = argparse.ArgumentParser()
    p.add_argument("--penalty", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--milestones", type=int, nargs="+")
    p.add_argument("--no_progress", action="store_true")
    assert p.parse_args(argv).penalty == -1e-05


# -- flags are checked before any work ------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["table3", "--gammas", "5", "nan"], "--gammas must be a finite number, got nan"),
    (["table1", "--gamma", "inf"], "--gamma must be a finite number, got inf"),
    (["table3", "--gammas", "-5"], "--gammas must be at least 0"),
    (["table2", "--keep", "R32_C10=x"], "--keep expects MODEL=N"),
    (["table2", "--keep", "R32_C10=99"], r"N must be in \[1, 15\]"),
    (["table2", "--models", "R999"], "unknown model 'R999'"),
    (["table3", "--workers", "100000"], "--workers must be in"),
    (["table3", "--batch_size", "0"], "--batch_size must be in"),
    (["table3", "--time_images", "100000000"], "--time_images must be in"),
    (["table3", "--device", "tpu"], "--device tpu is not a device"),
    (["figures", "--classes", "-1"], "--classes must be in"),
    (["figures", "--load", "missing.t7"], "--load missing.t7: no such file"),
    (["table3", "--base_ckpt", "missing.t7"], "--base_ckpt missing.t7: no such file"),
])
def test_bad_flags_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert _exit_code(reproduce.main, argv + ["--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"python -m scripts.reproduce {argv[0]}: error: ")
    assert re.search(message, line), line
    assert not out.exists()


def test_missing_policy_weights_are_refused_before_any_step(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["table4", "--smoke", "--policy_init", str(tmp_path / "none.pth"), "--out", str(out)]
    assert _exit_code(reproduce.main, argv) == 2
    assert "none.pth: no such file" in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_table1_finds_every_released_checkpoint_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    argv = _released_args(tmp_path, out)
    argv[0] = "table1"
    assert reproduce.main(argv + ["--models", "R32_C10"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "no base, curriculum, finetuned checkpoint of R32_C10" in line
    assert not out.exists()


def test_an_out_under_a_file_is_refused_first(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _exit_code(reproduce.main, ["table3", "--smoke", "--out", str(blocker / "o")]) == 2
    assert "is a file" in _one_line(capsys.readouterr().err)
    assert _exit_code(reproduce.main, ["table3", "--smoke", "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in _one_line(capsys.readouterr().err)


def _released_args(tmp_path, out):
    cv = tmp_path / "cv"
    cv.mkdir(exist_ok=True)
    data = make_cifar(tmp_path / "data", n=4)
    return ["table3", "--released", str(cv), "--data_dir", data, "--out", str(out)]


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(outdir, "write_json", full)
    out = tmp_path / "out"
    assert reproduce.main(_released_args(tmp_path, out)) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("table3: error: disk full") and "command.json" in line


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "run", interrupted)
    assert reproduce.main(["table3", "--smoke", "--out", str(tmp_path / "o")]) == 130
    assert _one_line(capsys.readouterr().err) == "table3: interrupted"
    monkeypatch.setattr(benchmark, "run", interrupted)
    assert _exit_code(benchmark.main, ["--quick"]) == 130
    assert _one_line(capsys.readouterr().err) == "benchmark: interrupted"
    monkeypatch.setattr(demo_data, "run", interrupted)
    assert _exit_code(demo_data.main, ["generate", "--out", str(tmp_path / "d")]) == 130
    assert _one_line(capsys.readouterr().err) == "demo_data: interrupted"


# -- the --out folder -----------------------------------------------------------------------
def test_an_unreadable_command_json_is_refused_and_force_recovers(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "command.json").write_text('{"script": "tab')  # a killed, non-atomic write
    argv = _released_args(tmp_path, out)
    assert reproduce.main(argv) == 1
    line = _one_line(capsys.readouterr().err)
    assert "command.json is not readable JSON" in line and "--force" in line
    assert reproduce.main(argv + ["--force"]) == 1  # gets past the folder: no checkpoints
    assert "no finetuned checkpoints" in _one_line(capsys.readouterr().err)
    assert json.loads((out / "command.json").read_text())["script"] == "table3"


def test_force_moves_another_commands_results_aside(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "command.json").write_text(json.dumps(
        {"script": "table2", "settings": {"models": None}, "command": "scripts/table2.sh"}))
    (out / "table2.md").write_text("old results")
    assert reproduce.main(_released_args(tmp_path, out) + ["--force"]) == 1
    capsys.readouterr()
    assert not (out / "table2.md").exists()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert (aside / "table2.md").read_text() == "old results"
    assert json.loads((aside / "command.json").read_text())["script"] == "table2"


# -- cached evaluations -------------------------------------------------------------------
def test_cached_evaluations_follow_the_data_and_survive_broken_files(tmp_path, tiny_data):
    data = make_cifar(tmp_path / "data", n=4)
    request = EvalRequest("R32_C10", None, tiny_data["base"], data, 4, "cpu", 0)
    json_path, log = str(tmp_path / "evals" / "full.json"), str(tmp_path / "test.log")

    def said():
        out = []
        run_test(request, json_path, log, say=out.append)
        return out[0].split()[0]

    assert said() == "[eval]" and said() == "[skip]"
    make_cifar(tmp_path / "data", n=4, seed=1)  # another test set at the same path
    assert said() == "[eval]"
    with open(json_path + ".cmd", "w") as f:
        f.write('{"version": ')  # truncated key
    assert said() == "[eval]"
    open(json_path, "w").close()  # empty result
    assert said() == "[eval]" and said() == "[skip]"
    with open(json_path, "w") as f:
        json.dump(["not", "a", "result"], f)
    assert said() == "[eval]"


# -- generated data ---------------------------------------------------------------------------
def test_smoke_data_interrupted_while_written_is_written_again(tmp_path, monkeypatch):
    real = demo_data.write_cifar_folder
    calls = []

    def dies_on_the_test_split(root, *args, **kwargs):
        calls.append(root)
        folder = real(root, *args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return folder

    monkeypatch.setattr(demo_data, "write_cifar_folder", dies_on_the_test_split)
    root = str(tmp_path / "smoke_data")
    with pytest.raises(KeyboardInterrupt):
        smoke.cifar_data(root)
    monkeypatch.setattr(demo_data, "write_cifar_folder", real)
    smoke.cifar_data(root)
    spec = get_spec("R32_C10")
    assert len(get_dataset(spec, root, train=False)) == smoke.SMOKE_TEST
    assert len(get_dataset(spec, root, train=True)) == smoke.SMOKE_TRAIN
    assert demo_data.read_difficulty(root).shape == (smoke.SMOKE_TEST,)  # the demo's own
    assert os.listdir(root) == ["cifar-10-batches-py"]


# -- benchmark and demo_data -------------------------------------------------------------------
def test_benchmark_checks_its_files_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _exit_code(benchmark.main, ["--quick", "--out", str(blocker / "b.json")]) == 2
    assert "is a file, not a folder" in _one_line(capsys.readouterr().err)
    page = tmp_path / "speed.md"
    page.write_text("no markers\n")
    bench = tmp_path / "bench.json"
    bench.write_text('{"machine": ')
    assert _exit_code(benchmark.main, ["--render", str(bench), "--doc", str(page)]) == 2
    assert "has no <!-- benchmark:begin -->" in _one_line(capsys.readouterr().err)
    assert _exit_code(benchmark.main, ["--render", str(bench)]) == 1
    assert "bench.json is not readable JSON" in _one_line(capsys.readouterr().err)
    assert _exit_code(benchmark.main, ["--quick", "--seq-images", "100000000"]) == 2
    assert "--seq-images must be in" in _one_line(capsys.readouterr().err)


def test_demo_data_bad_input_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _exit_code(demo_data.main, ["generate", "--out", str(blocker / "d")]) == 2
    assert "is a file" in _one_line(capsys.readouterr().err)
    assert _exit_code(demo_data.main, ["compare", "--load", str(tmp_path / "none.t7"),
                                       "--data_dir", str(tmp_path)]) == 2
    assert "none.t7: no such file" in _one_line(capsys.readouterr().err)
    assert _exit_code(demo_data.main, ["generate", "--out", str(tmp_path / "d"),
                                       "--hard_fraction", "nan"]) == 2
    assert "--hard_fraction" in _one_line(capsys.readouterr().err)
