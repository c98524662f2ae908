"""Evaluation for the reproduction tables: test.py's numbers and measured speed-ups
(paper Sec. 4, Tables 2-4; docs/reproducing.md).

:func:`run_test` calls ``test.py --out`` itself, so every number in a table is the number
test.py prints for the same checkpoint and data. Its JSON is kept beside the table with the
key of what it depends on (:func:`cache_key`); a later run reuses it while the key matches.
:func:`measure_speedup` times the full ResNet against dynamic execution under the
checkpoint's greedy policy with the clock of ``utils.timing`` (CUDA events on a GPU).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any

import torch

from models import get_spec
from scripts.repro.bookkeeping import read_cache, write_json
from scripts.repro.steps import StepError, call_script, failure, shown_path
from utils.data import CIFAR10Files, CIFAR100Files, get_dataset
from utils.networks import Request, load_for_eval
from utils.timing import Clock, time_interleaved

EVAL_VERSION = 2  # raise when a change of the evaluation changes its numbers: caches go stale
CIFAR_FILES = {"cifar10": CIFAR10Files, "cifar100": CIFAR100Files}


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
    threshold: float | None = None  # a learned method's keep threshold (test.py --threshold)

    def argv(self) -> list[str]:
        out = ["--model", self.model, "--data_dir", self.data_dir,
               "--batch_size", str(self.batch_size), "--device", self.device,
               "--workers", str(self.workers)]
        for flag, value in (("--load", self.load), ("--base_ckpt", self.base_ckpt),
                            ("--policy", self.policy), ("--k", self.k), ("--seed", self.seed),
                            ("--threshold", self.threshold)):
            if value is not None:
                out += [flag, str(value)]
        return out


def _fingerprint(path: str | None) -> list[int] | None:
    """Size and modification time of a file (None: no file)."""
    if path is None or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def data_fingerprint(model: str, data_dir: str) -> list[Any]:
    """Size and modification time of the model's test files under ``data_dir`` (CIFAR:
    the test batch and the meta file; ImageNet: every file under ``val/``, summed)."""
    kind = get_spec(model).data.kind
    if kind in CIFAR_FILES:
        cls = CIFAR_FILES[kind]
        folder = os.path.join(data_dir, cls.base_folder)
        names = [n for n, _ in cls.test_list] + [cls.meta["filename"]]
        return [[n, _fingerprint(os.path.join(folder, n))] for n in names]
    count, size, newest = 0, 0, 0
    for folder, _dirs, files in os.walk(os.path.join(data_dir, "val")):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return [count, size, newest]


def cache_key(request: EvalRequest, argv: list[str]) -> dict[str, Any]:
    """What an evaluation depends on: test.py's command, the checkpoint files, the test
    data and the version of the evaluation code (:data:`EVAL_VERSION`)."""
    return {"version": EVAL_VERSION, "argv": argv, "checkpoint": _fingerprint(request.load),
            "base": _fingerprint(request.base_ckpt),
            "data": data_fingerprint(request.model, request.data_dir)}


def _is_result(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("accuracy"), (int, float))


def run_test(request: EvalRequest, json_path: str, log: str, force: bool = False,
             say=print) -> dict[str, Any]:
    """test.py's numbers for ``request`` (its ``--out`` JSON), computed or reused. The
    JSON is reused while its key file (``<json>.cmd``, :func:`cache_key`) matches; a
    missing, truncated or stale JSON or key is recomputed."""
    key_path = json_path + ".cmd"
    argv = request.argv() + ["--out", json_path]
    key = json.loads(json.dumps(cache_key(request, argv)))
    cached = None if force else read_cache(json_path, _is_result)
    if cached is not None and read_cache(key_path, lambda k: k == key) is not None:
        say(f"[skip] test.py {os.path.basename(json_path)}: evaluated before")
        return cached
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    for stale in (key_path, json_path):  # test.py never overwrites: we rerun on purpose
        if os.path.lexists(stale):
            os.remove(stale)
    say(f"[eval] {request.model} {request.load or '(base ResNet)'}"
        + (f" --policy {request.policy} --k {request.k}" if request.policy else "")
        + (f" --threshold {request.threshold}" if request.threshold is not None else ""))
    error = call_script("test.py", argv, log)
    result = read_cache(json_path, _is_result) if error is None else None
    if error is None and result is None:
        error = f"test.py wrote no readable {json_path}"
    if error is not None:
        raise StepError(failure(f"evaluation of {request.load or request.model}", error, log,
                                shlex.join([sys.executable, shown_path("test.py"), *argv])))
    write_json(key_path, key)
    return result


def measure_speedup(request: EvalRequest, batch_size: int, images: int, repeats: int,
                    warmup: int = 1) -> dict[str, float]:
    """Milliseconds per image of the full ResNet and of BlockDrop (policy network, greedy
    policy, dynamic execution: ``PolicySource.run``) on the first ``images`` test images in
    batches of ``batch_size``; ``speedup`` = 1 − BlockDrop time / full time, in percent."""
    spec = get_spec(request.model)
    device = torch.device(request.device)
    setup = load_for_eval(spec, Request(request.load, request.base_ckpt, request.policy,
                                        request.k, request.seed))
    rnet = setup.rnet.to(device).eval()
    source = setup.source.to(device).eval()
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
