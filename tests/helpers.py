"""Small builders shared by the tests: realistic BatchNorm statistics, tiny data."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from legacy_writer import legacy_state_dict
from utils.data import write_cifar_folder


@torch.no_grad()
def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, so
    that eval-mode outputs exercise every buffer a checkpoint carries."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(1.0 + 4.0 * torch.rand(n, generator=g))
    return module


def make_cifar(root, n: int = 24, num_classes: int = 10, train: bool = False, seed: int = 0) -> str:
    """Write ``n`` random images in the CIFAR python format under ``root``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n)
    write_cifar_folder(str(root), images, labels, train=train, num_classes=num_classes)
    return str(root)


def pk_layout(rnet) -> dict:
    """img_classification_pk_pytorch names: module. prefix, layer<i>, no num_batches_tracked."""
    out = {}
    for k, v in legacy_state_dict(rnet).items():
        if k.startswith("blocks."):
            _, s, rest = k.split(".", 2)
            k = f"layer{int(s) + 1}.{rest}"
        elif k.startswith("ds."):
            _, s, rest = k.split(".", 2)
            k = f"layer{int(s) + 1}.0.downsample.{rest}"
        out["module." + k] = v
    return out


def printed_block(out: str) -> str:
    """test.py's four-line block (docs/evaluation.md) from its standard output, after the
    lines the authors' test.py printed first ("loading checkpoints", "loaded ... from")."""
    return out[out.index("\n    Accuracy:"):]


def error_line(main, argv, capsys) -> str:
    """Run a script's ``main``: it must fail with one line and no traceback; returns the line.

    Accepts either exit path: ``sys.exit(message)``, a message on stderr and a
    non-zero status, or a raised UserError for a launcher to print.
    """
    from utils.errors import UserError

    try:
        main(argv)
    except SystemExit as exit_:
        assert exit_.code not in (0, None)
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        if isinstance(exit_.code, str):
            assert "\n" not in exit_.code.strip(), exit_.code
            return exit_.code
        return err.strip().splitlines()[-1]
    except UserError as err:
        assert "\n" not in str(err), str(err)
        return str(err)
    raise AssertionError(f"{main.__module__} did not fail")


def finetuned_once(tiny_args, tiny_data, cv, *flags: str) -> tuple[str, dict]:
    """``finetune.py`` for epoch 0 from the tiny base with ``flags``: the path of its
    checkpoint and the checkpoint read back."""
    import glob
    import os

    import finetune
    from utils.checkpoint import read_checkpoint

    finetune.main(tiny_args(cv, "--base_ckpt", tiny_data["base"], "--max_epochs", "0",
                            "--test_every", "1", *flags))
    path = sorted(glob.glob(os.path.join(str(cv), "ckpt_E_*.t7")))[-1]
    return path, read_checkpoint(path)


def reference_block(model: str, dataset, one_image, decision_flops) -> str:
    """test.py's four-line block computed one image at a time, apart from the evaluation
    code: ``one_image(x)`` gives ``(logits (1, C), policy (1, K))``; an image's FLOPs are the
    table's fixed part, its kept blocks and ``decision_flops(policy)`` (the deciding
    network's, a number)."""
    from models.flops import flop_table
    from utils.stats import format_eval_block, policy_stats

    table = flop_table(model)
    costs = torch.tensor(table.block_costs, dtype=torch.float64)
    policies, matches, flops = [], [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            x, y = dataset[i]
            logits, policy = one_image(x.unsqueeze(0))
            policies.append(policy.to(torch.uint8))
            matches.append((logits.argmax(1) == y).float())
            flops.append(table.resnet_fixed + float(policy[0].double() @ costs)
                         + float(decision_flops(policy)))
    return format_eval_block(policy_stats(torch.cat(policies), torch.cat(matches)),
                             np.asarray(flops))
