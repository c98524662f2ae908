"""Run folders that cannot be mixed or stranded (docs/reliability.md): the lock, recovery
after a kill, a full or read-only disk, and the small cases of a resumed or short run.

The lock, kill and disk-full cases run the scripts as real subprocesses."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import cl_training
import pretrain_resnet
from utils import engine
from utils.checkpoint import read_checkpoint
from utils.run_folder import LOCK, RunFolderError, acquire_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, argv, fault=None, **popen):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("BLOCKDROP_TEST_FAULT", None)
    if fault:
        env["BLOCKDROP_TEST_FAULT"] = fault
    cmd = [sys.executable, os.path.join(ROOT, name), *argv]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, **popen)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _epochs(folder):
    with open(os.path.join(str(folder), "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


def _files(folder):
    return sorted(os.listdir(str(folder)))


def _exit(main, argv, capsys):
    """``(exit status, stderr)`` of ``main(argv)``; ``sys.exit(message)`` is status 1."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code, err = info.value.code, capsys.readouterr().err
    if isinstance(code, str):
        return 1, err + code + "\n"
    return code, err


def _one_error_line(text, prog="cl_training.py"):
    lines = text.strip().splitlines()
    assert "Traceback" not in text, text
    assert lines[-1].startswith(f"{prog}: error: "), text
    return lines[-1]


def test_a_second_run_into_a_locked_folder_stops_at_once(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "run"
    first = _script("cl_training.py", tiny_args(cv, "--base_ckpt", tiny_data["base"],
                                                "--max_epochs", "100000", "--test_every", "1000"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (cv / "metrics.jsonl").exists():  # the first run is training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        holder = json.loads((cv / LOCK).read_text())
        assert holder["pid"] == first.pid and "cl_training.py" in holder["command"]
        for extra in ([], ["--resume"]):
            second = _script("cl_training.py", tiny_args(cv, "--base_ckpt", tiny_data["base"],
                                                         *extra))
            line = _one_error_line(second.stderr)
            assert second.returncode == 1
            assert f"is in use by another run: pid {first.pid} on {holder['host']}" in line
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed run's lock is stale: the next run on this host takes it over
    lock = acquire_lock(str(cv))
    assert json.loads((cv / LOCK).read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
        acquire_lock(str(cv))  # a live holder (this process) is never taken over
    lock.release()
    assert not (cv / LOCK).exists()


def test_sigterm_releases_the_lock(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "run"
    run = _script("cl_training.py", tiny_args(cv, "--base_ckpt", tiny_data["base"],
                                              "--max_epochs", "100000", "--test_every", "1000"),
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cv / "metrics.jsonl").exists():
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 128 + signal.SIGTERM
    assert not (cv / LOCK).exists()
    assert not [n for n in _files(cv) if n.startswith(".tmp_")]


def test_a_kill_before_the_first_last_t7_is_recoverable(tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "run"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "2", "--test_every",
                     "1")
    killed = _script("cl_training.py", argv, fault="kill:last.t7")  # after ckpt_E_0 is written
    assert killed.returncode == -signal.SIGKILL
    names = _files(cv)
    assert LOCK in names and "last.t7" not in names
    assert [n for n in names if n.startswith(".tmp_")], names  # the interrupted write
    assert [n for n in names if n.startswith("ckpt_E_0_")]
    # a fresh run refuses the folder; --resume continues from ckpt_E_0
    code, err = _exit(cl_training.main, argv, capsys)
    assert code == 2 and "already holds checkpoints" in err and "--resume" in err
    cl_training.main(argv + ["--resume"])
    err = capsys.readouterr().err
    assert "resuming from ckpt_E_0_" in err and "optimizer state" in err
    assert not [n for n in _files(cv) if n.startswith(".tmp_") or n == LOCK]
    assert _epochs(cv) == [0, 1, 2]
    assert read_checkpoint(str(cv / "last.t7"))["epoch"] == 2


def test_resume_without_last_or_config_says_what_to_do(tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "run"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "0")
    cl_training.main(argv)
    os.remove(cv / "last.t7")
    os.remove(cv / "config.yaml")
    code, err = _exit(cl_training.main, argv + ["--resume"], capsys)
    assert code == 2 and "start a new run with --load" in err and "ckpt_E_0_" in err


def test_disk_full_is_one_line_and_keeps_the_last_good_state(tiny_data, tiny_args, tmp_path):
    cv = tmp_path / "run"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "2", "--test_every",
                     "2")
    full = _script("cl_training.py", argv, fault="enospc:ckpt_E_2_*")
    line = _one_error_line(full.stderr)
    assert full.returncode == 1
    assert "disk full: no space left on the device" in line and "ckpt_E_2_" in line
    assert not [n for n in _files(cv) if n.startswith(".tmp_") or n == LOCK]
    assert read_checkpoint(str(cv / "last.t7"))["epoch"] == 1  # the last good epoch


@pytest.fixture
def mounted(tmp_path):
    """``mounted(options)``: a tmpfs folder (root only; the test skips where mounting fails)."""
    points = []

    def mount(options):
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_a_real_full_disk(tiny_data, tiny_args, mounted):
    cv = mounted("size=256k") / "run"  # room for the logs, not for a 2 MB ResNet checkpoint
    full = _script("pretrain_resnet.py", tiny_args(cv, "--epochs", "1"))
    line = _one_error_line(full.stderr, "pretrain_resnet.py")
    assert full.returncode == 1 and "disk full" in line and "pk_E_1_" in line
    assert not [n for n in _files(cv) if n.startswith(".tmp_") or n == LOCK]


def test_read_only_cv_dir_is_one_line(tiny_data, tiny_args, mounted, capsys):
    cv = mounted("ro,size=64k")
    code, err = _exit(cl_training.main, tiny_args(cv, "--base_ckpt", tiny_data["base"]), capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        f"cl_training.py: error: Read-only file system: cannot write in the run folder ({cv})"]


def test_cv_dir_that_is_a_file_is_one_line(tiny_data, tiny_args, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    for cv in (path, path / "run"):
        code, err = _exit(cl_training.main, tiny_args(cv, "--base_ckpt", tiny_data["base"]),
                          capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert "is a file, not a folder" in err or "Not a directory" in err


def test_half_written_metrics_line_does_not_block_resume(tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "run"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "1")
    cl_training.main(argv)
    with open(cv / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.001, "tra')  # a kill inside the write
    cl_training.main(argv[:-1] + ["2", "--resume"])
    assert "dropped 1 line that is not an epoch record" in capsys.readouterr().err
    assert _epochs(cv) == [0, 1, 2]


def test_resuming_a_finished_run_changes_nothing(tiny_data, tiny_args, tmp_path, capsys):
    cv = tmp_path / "run"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "1")
    cl_training.main(argv)
    before = {n: (cv / n).read_bytes() for n in _files(cv) if (cv / n).is_file()}
    cl_training.main(argv + ["--resume", "--lr", "0.5"])
    assert "nothing to do" in capsys.readouterr().err
    assert {n: (cv / n).read_bytes() for n in _files(cv) if (cv / n).is_file()} == before


def test_a_positive_penalty_warns_and_runs(tiny_data, tiny_args, tmp_path, capsys):
    cl_training.main(tiny_args(tmp_path / "r", "--base_ckpt", tiny_data["base"],
                               "--max_epochs", "0", "--penalty", "1"))
    assert "warning: --penalty 1.0 is positive" in capsys.readouterr().err
    assert glob.glob(str(tmp_path / "r" / "ckpt_E_0_*.t7"))


def test_pretrain_one_epoch_with_the_default_milestones(tiny_args, tmp_path):
    cv = tmp_path / "p"
    pretrain_resnet.main(tiny_args(cv, "--epochs", "1"))
    assert glob.glob(str(cv / "pk_E_1_A_*.t7"))
    assert yaml.safe_load((cv / "config.yaml").read_text())["milestones"] == []


@pytest.mark.parametrize("saved_first", [False, True])
def test_the_non_finite_message_names_only_files_that_exist(saved_first, tiny_data, tiny_args,
                                                            tmp_path, capsys, monkeypatch):
    cv = tmp_path / "run"
    argv = tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "1")
    real = engine.train_epoch
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 + saved_first:
            raise engine.NonFiniteLossError("non-finite loss (nan) at batch 0 of epoch")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_epoch", poisoned)
    code, err = _exit(cl_training.main, argv, capsys)
    assert code == 1 and err.count("\n") == 1 and "non-finite loss" in err
    if saved_first:
        assert f"the last good state is {cv / 'last.t7'}" in err
    else:
        assert "last.t7" not in err and "holds no state to resume" in err
