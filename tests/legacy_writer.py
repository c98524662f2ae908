"""Write checkpoints the way PyTorch 0.3 under Python 2.7 wrote them.

The authors' released files are in this format: the pre-zip "magic number"
serialisation, pickle protocol 2 with Python 2 byte strings (SHORT_BINSTRING),
tensors rebuilt by ``torch._utils._rebuild_tensor``, storages saved from the GPU
(``torch.cuda.FloatStorage``, location ``cuda:0``) and state dicts pickled as
``OrderedDict([[key, value], ...])``. Only the tests use this module.
"""
from __future__ import annotations

import io
import pickle
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.int64: "LongStorage",
                  torch.float64: "DoubleStorage", torch.uint8: "ByteStorage"}


class _Storage:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach().contiguous().cpu()


class _Py2Pickler(pickle._Pickler):
    """Pure-Python pickler that writes str like Python 2 wrote its byte strings."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, storages, location):
        super().__init__(file, protocol=2)
        self.storages = storages
        self.location = location

    def save_py2_str(self, obj):
        data = obj.encode("ascii")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            key = str(len(self.storages) + 140000000)
            self.storages.append((key, obj))
            module = torch.cuda if self.location.startswith("cuda") else torch
            storage_type = getattr(module, _STORAGE_TYPES[obj.tensor.dtype])
            return ("storage", storage_type, key, self.location, obj.tensor.numel(), None)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            return (torch._utils._rebuild_tensor,
                    (_Storage(obj), 0, tuple(obj.shape), tuple(obj.contiguous().stride())))
        if isinstance(obj, OrderedDict):
            return (OrderedDict, ([[k, v] for k, v in obj.items()],))
        return NotImplemented


def _dump(obj, f):
    p = _Py2Pickler(f, [], "cpu")
    p.dump(obj)


def save_pytorch03(obj, path: str, location: str = "cuda:0") -> None:
    """Serialise ``obj`` (dicts, OrderedDicts, tensors, numbers, strings) like torch 0.3."""
    buf = io.BytesIO()
    _dump(MAGIC_NUMBER, buf)
    _dump(PROTOCOL_VERSION, buf)
    _dump({"protocol_version": PROTOCOL_VERSION, "little_endian": sys.byteorder == "little",
           "type_sizes": {"short": 2, "int": 4, "long": 8}}, buf)
    storages = []
    pickler = _Py2Pickler(buf, storages, location)
    pickler.dump(obj)
    keys = sorted(key for key, _ in storages)
    _dump(keys, buf)
    by_key = dict(storages)
    for key in keys:
        t = by_key[key].tensor
        buf.write(struct.pack("<q", t.numel()))
        buf.write(np.ascontiguousarray(t.numpy()).tobytes())
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def legacy_state_dict(module: torch.nn.Module, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """A module's state dict as PyTorch 0.3 had it: no ``num_batches_tracked``."""
    return OrderedDict((prefix + k, v.clone()) for k, v in module.state_dict().items()
                       if not k.endswith("num_batches_tracked"))
