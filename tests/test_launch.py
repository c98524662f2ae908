"""The launcher: flags spelled out in full, one error path, one main() for every script."""
import errno

import pytest
import torch

import cl_training
import finetune
import pretrain_resnet
import test as test_script
from scripts import benchmark, demo_data
from utils.errors import UserError
from utils.launch import Script, error_path

TRAINING = [cl_training, finetune, pretrain_resnet]


def _exit(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("main, argv, abbreviated", [
    (finetune.main, ["--policy_in", "x.t7"], "--policy_in"),  # of --policy_init
    (cl_training.main, ["--max_epoch", "3"], "--max_epoch"),
    (pretrain_resnet.main, ["--epoch", "3"], "--epoch"),
    (test_script.main, ["--batch", "3"], "--batch"),
    (demo_data.main, ["generate", "--out", "x", "--trai", "9"], "--trai"),
    (benchmark.parse_args, ["--model", "R32_C10"], "--model"),  # of --models
])
def test_abbreviated_flags_are_refused(main, argv, abbreviated, capsys):
    code, err = _exit(main, argv, capsys)
    assert code == 2
    assert f"unrecognized arguments: {abbreviated}" in err


@pytest.mark.parametrize("module", TRAINING)
def test_every_training_script_is_a_parser_and_a_stage(module):
    assert isinstance(module.SCRIPT, Script)
    assert module.SCRIPT.build_parser is module.build_parser
    assert module.SCRIPT.build_stage is module.build_stage
    assert not module.build_parser().allow_abbrev


def test_a_bad_flag_is_one_line(tiny_args, tmp_path, capsys):
    code, err = _exit(finetune.main, tiny_args(tmp_path / "r", "--lr", "-1"), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("finetune.py: error: --lr must be > 0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("main", [cl_training.main, finetune.main, pretrain_resnet.main,
                                  test_script.main])
def test_cuda_without_cuda_is_one_line(main, tiny_args, tmp_path, capsys):
    argv = tiny_args(tmp_path / "r")
    argv[argv.index("--device") + 1] = "cuda"
    if main is test_script.main:
        argv = [a for a in argv if a not in ("--cv_dir", str(tmp_path / "r"), "--no_progress",
                                             "--deterministic")]
    code, err = _exit(main, argv, capsys)
    assert code == 2
    assert "--device cuda: CUDA is not available on this machine" in err
    assert not (tmp_path / "r").exists()


def _raise(err):
    with error_path("x.py"):
        raise err


@pytest.mark.parametrize("err, line", [
    (UserError("bad data (data/x)"), "x.py: error: bad data (data/x)"),
    (OSError(errno.ENOSPC, "No space left on device", "cv/run/last.t7"),
     "x.py: error: disk full: no space left on the device (cv/run/last.t7)"),
    (PermissionError(errno.EACCES, "Permission denied", "cv/run"),
     "x.py: error: Permission denied (cv/run)"),
])
def test_expected_failures_are_one_line(err, line):
    with pytest.raises(SystemExit) as info:
        _raise(err)
    assert info.value.code == line


def test_bugs_and_debug_keep_the_traceback():
    with pytest.raises(KeyError):
        _raise(KeyError("a bug"))
    with pytest.raises(UserError):
        with error_path("x.py", debug=True):
            raise UserError("shown with its traceback")
