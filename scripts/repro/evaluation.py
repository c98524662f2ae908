"""Evaluation for the reproduction tables: test.py's numbers and measured speed-ups
(paper Sec. 4, Tables 2-4; docs/reproducing.md).

:func:`run_test` calls ``test.py --out`` itself, so every number in a table is the number
test.py prints for the same checkpoint and data. Its JSON is kept beside the table with the
command that made it; a later run reuses it while the command and the checkpoint file are
unchanged. :func:`measure_speedup` times the full ResNet against dynamic execution under the
checkpoint's greedy policy with the clock of ``utils.timing`` (CUDA events on a GPU).
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from typing import Any

import torch

from models import get_spec
from models.sources import build_source
from scripts.repro.steps import StepError, call_script, failure
from utils.checkpoint import load_for_eval
from utils.data import get_dataset
from utils.timing import Clock, time_interleaved


@dataclass(frozen=True)
class EvalRequest:
    """What test.py evaluates: a model, a checkpoint (None: the base ResNet, every block
    kept) and an optional fixed policy source (test.py --policy)."""

    model: str
    load: str | None
    base_ckpt: str | None
    data_dir: str
    batch_size: int = 256
    device: str = "cpu"
    workers: int = 0
    policy: str | None = None  # firstk, randomk, distributek (None: the checkpoint's policy)
    k: int | None = None
    seed: int | None = None

    def argv(self) -> list[str]:
        out = ["--model", self.model, "--data_dir", self.data_dir,
               "--batch_size", str(self.batch_size), "--device", self.device,
               "--workers", str(self.workers)]
        for flag, value in (("--load", self.load), ("--base_ckpt", self.base_ckpt),
                            ("--policy", self.policy), ("--k", self.k), ("--seed", self.seed)):
            if value is not None:
                out += [flag, str(value)]
        return out


def _fingerprint(path: str | None) -> list[int] | None:
    if path is None or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def run_test(request: EvalRequest, json_path: str, log: str, force: bool = False,
             say=print) -> dict[str, Any]:
    """test.py's numbers for ``request`` (its ``--out`` JSON), computed or reused."""
    meta_path = json_path + ".cmd"
    argv = request.argv() + ["--out", json_path]
    meta = {"argv": argv, "checkpoint": _fingerprint(request.load),
            "base": _fingerprint(request.base_ckpt)}
    if not force and os.path.isfile(json_path) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            if json.load(f) == meta:
                say(f"[skip] test.py {os.path.basename(json_path)}: evaluated before")
                return _read(json_path)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    for stale in (json_path, meta_path):  # test.py never overwrites: we rerun on purpose
        if os.path.exists(stale):
            os.remove(stale)
    say(f"[eval] {request.model} {request.load or '(base ResNet)'}"
        + (f" --policy {request.policy} --k {request.k}" if request.policy else ""))
    error = call_script("test.py", argv, log)
    if error is None and not os.path.isfile(json_path):
        error = f"test.py wrote no {json_path}"
    if error is not None:
        raise StepError(failure(f"evaluation of {request.load or request.model}", error, log,
                                 shlex.join(["python", "test.py", *argv])))
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return _read(json_path)


def _read(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def measure_speedup(request: EvalRequest, batch_size: int, images: int, repeats: int,
                    warmup: int = 1) -> dict[str, float]:
    """Milliseconds per image of the full ResNet and of BlockDrop (policy network, greedy
    policy, dynamic execution: ``PolicySource.run``) on the first ``images`` test images in
    batches of ``batch_size``; ``speedup`` = 1 − BlockDrop time / full time, in percent."""
    spec = get_spec(request.model)
    device = torch.device(request.device)
    rnet, agent = load_for_eval(spec, request.load, request.base_ckpt, log=lambda _m: None)
    rnet.to(device).eval()
    source = build_source("blockdrop", spec, agent=agent).to(device).eval()
    testset = get_dataset(spec, request.data_dir, train=False)
    n = min(images, len(testset))
    batches = list(torch.split(torch.stack([testset[i][0] for i in range(n)]).to(device),
                               batch_size))

    def full():
        for b in batches:
            rnet.forward_full(b)

    def blockdrop():
        for b in batches:
            source.run(rnet, b, dynamic=True)

    with torch.inference_mode():
        med = time_interleaved({"full": full, "blockdrop": blockdrop}, repeats, warmup,
                               Clock(device))
    ms_full, ms_bd = 1e3 * med["full"] / n, 1e3 * med["blockdrop"] / n
    return {"ms_full": ms_full, "ms_blockdrop": ms_bd,
            "speedup": 100.0 * (1.0 - ms_bd / ms_full), "images": n, "batch_size": batch_size}
