"""Configuration: defaults -> YAML -> explicit flags; every YAML in configs/ resolves."""
import glob
import os
import re

import pytest
import yaml

import cl_training
import finetune
import pretrain_resnet
from models import get_spec
from policies.registry import method_names
from utils.config import ConfigError, check_common, method_problems, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"cl": cl_training.build_parser, "finetune": finetune.build_parser,
           "pretrain": pretrain_resnet.build_parser}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))))
def test_every_config_parses_and_resolves(path):
    stage = os.path.basename(os.path.dirname(path))
    # a method's own folder (configs/<method>/) holds finetune.py settings
    args = resolve(PARSERS.get(stage, finetune.build_parser)(), ["--config", path])
    with open(path) as f:
        data = yaml.safe_load(f)
    for key, value in data.items():
        assert getattr(args, key) == pytest.approx(value) if isinstance(value, float) \
            else getattr(args, key) == value
    assert os.path.basename(path).startswith(args.model)
    get_spec(args.model)
    assert check_common(args) == []
    if stage not in PARSERS:
        assert stage in method_names(), f"{path}: configs/{stage}/ names no registered method"
        assert method_problems(args) == []


def test_the_paper_settings_are_covered():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs"))
             for p in glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml"))}
    for gamma in (2, 5, 10):
        assert f"finetune/R110_C10_gamma{gamma}.yaml" in names
        assert f"finetune/R101_ImgNet_gamma{gamma}.yaml" in names
    assert {"finetune/R32_C10_gamma5.yaml", "cl/R110_C10.yaml", "cl/R32_C10.yaml",
            "cl/R101_ImgNet.yaml", "pretrain/R110_C10.yaml"} <= names


def test_precedence_defaults_yaml_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nbatch_size: 64\npenalty: -10\nparallel: true\n")
    args = resolve(cl_training.build_parser(), ["--config", str(cfg), "--batch_size", "32"])
    assert args.lr == 1e-3 and isinstance(args.lr, float)  # YAML (read as a string, converted)
    assert args.batch_size == 32  # the explicit flag wins
    assert args.penalty == -10.0 and args.parallel is True
    assert args.beta == 0.1  # default


def test_saved_config_sits_below_yaml_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\n")
    saved = {"lr": 0.25, "beta": 0.3, "batch_size": 16, "resume": False, "config": "old.yaml",
             "device": "cuda:3", "workers": 9}
    args = resolve(cl_training.build_parser(), ["--config", str(cfg), "--batch_size", "4"],
                   saved=saved)
    assert (args.lr, args.beta, args.batch_size) == (0.5, 0.3, 4)
    assert args.config == str(cfg)
    # the machine's own settings are not taken from the run being resumed
    assert args.device != "cuda:3" and args.workers != 9


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 0.1\n", "unknown option"),
    ("batch_size: 2.5\n", "batch_size"),
    ("parallel: 3\n", "true or false"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve(cl_training.build_parser(), ["--config", str(cfg)])


def test_missing_yaml_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found"):
        resolve(finetune.build_parser(), ["--config", "/nonexistent/x.yaml"])


@pytest.mark.parametrize("text, needle", [
    ("data_dir: 5\n", "'data_dir': 5 (expected text"),
    ("cv_dir: [a, b]\n", "expected one value, got a list"),
    ("lr: null\n", "'lr': None (expected a value, got null)"),
    ("batch_size: [8]\n", "expected one value"),
    ("lr: true\n", "expected a float"),
    ("amp: fp8\n", "expected one of none, bf16"),
    ("agent: lstm\n", "(expected one of act, blockdrop"),
])
def test_a_yaml_value_of_the_wrong_kind_is_refused_like_a_flag(text, needle, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: R32_C10\n" + text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        resolve(finetune.build_parser(), ["--config", str(path)])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: R32_C10\nlr: 1e-3\nbatch_size: [8\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:") + r"[34]: not valid YAML"):
        resolve(finetune.build_parser(), ["--config", str(path)])
