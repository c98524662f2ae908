"""ONNX export of a BlockDrop model: decisions and dynamic execution in one graph
(paper Sec. 3.1, 4.3; docs/export.md).

An exported model takes a batch of images and returns ``(logits, policy)``:
the logits of the ResNet run under the model's decisions and the (B, K) uint8
keep policy it ran. It is built from two parts:

* a **decision** (:class:`Decision`): where the keep/drop decisions come from.
  :class:`PolicyNetDecision` is BlockDrop's policy network, greedy (keep block k
  iff ``sigmoid(logit_k) >= 0.5``, Sec. 3.3); :class:`FixedDecision` a constant
  keep vector (Table 1's FirstK, RandomK, DistributeK), whose dropped blocks are
  simply absent from the graph; :class:`SeqDecision` BlockDrop-seq's gates,
  where gate t decides from the input of block t (supplement, ``models.seq``).
  Another method is one more subclass. A :class:`StageDecision` runs whole block
  stages itself (ACT, ``policies.act``, whose stage passes on a weighted sum of its
  blocks' outputs), on the backbone's blocks and the same row helpers.
* the **backbone** (:class:`ExportedBlockDrop`): the ResNet (an inference copy,
  BatchNorm folded, ``models.fast``) run block by block. For a block decided per
  image the rows that keep it are found (``NonZero``), gathered (``Gather``), run
  through the block and written back into the residual (``ScatterND``); every
  other row passes its residual on. So a block is computed only for the images
  that keep it, at any batch size, and a block kept by no image runs on an empty
  tensor (ONNX Runtime handles 0-row convolutions). :func:`gather_rows` and
  :func:`scatter_rows` are the row indexing every decision shares.

:func:`export_onnx` writes such a module with ``torch.onnx.export`` (the
``torch.export``-based exporter, ``dynamo=True``), rewrites the row indexing into
fewer nodes (:func:`index_rows_directly`, :func:`split_rows_once`: the same
values, six nodes fewer per block, which is what ONNX Runtime's batch-1 time
hangs on) and records in the file's ``metadata_props`` what it is
(:data:`METADATA_KEYS`).
:func:`read_metadata` and :func:`check_metadata` read and check them back
without ONNX Runtime. This module imports only torch, onnx and ``models``.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fast import FastOptions, inference_copy
from .resnet import FlatResNet

# the opset the exporter writes by default (ONNX Runtime 1.17+ runs it)
DEFAULT_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "policy")
# what metadata_props records; model and input_size are checked before a file is used
METADATA_KEYS = ("blockdrop.model", "blockdrop.method", "blockdrop.input_size",
                 "blockdrop.num_blocks", "blockdrop.num_classes", "blockdrop.opset",
                 "blockdrop.kept_blocks", "blockdrop.mean", "blockdrop.std",
                 "blockdrop.policy_flops", "blockdrop.block_decision_flops")


class ExportError(ValueError):
    """An ONNX file that is not one, or not the model it is expected to be."""


# -- (a) decisions -----------------------------------------------------------------
class Decision(nn.Module):
    """Where the decisions of an exported model come from.

    ``begin(x)`` runs once on the images and returns whatever ``keep`` needs (a
    one-shot decision: the whole (B, K) bool policy). ``keep(t, h, state)`` is the
    (B,) bool decision for block ``t``, given ``h``, the input of block t. A
    decision that is the same for every image sets ``fixed`` (K bools): the graph
    then holds only the kept blocks and no per-image machinery. ``block_flops`` (K
    ints): what deciding costs an image per block it runs, where that depends on the
    path (ACT's halting units); None: the constant ``blockdrop.policy_flops``.
    """

    method: str = ""
    fixed: tuple[bool, ...] | None = None
    block_flops: tuple[int, ...] | None = None

    def begin(self, x: torch.Tensor):
        return None

    def keep(self, t: int, h: torch.Tensor, state) -> torch.Tensor:
        raise NotImplementedError


class PolicyNetDecision(Decision):
    """BlockDrop: the policy network looks at the image once; greedy policy
    ``u_k = 1`` iff ``s_k >= 0.5`` (Sec. 3.3; ``threshold`` moves the 0.5)."""

    method = "blockdrop"

    def __init__(self, agent: nn.Module, threshold: float = 0.5):
        super().__init__()
        self.agent = agent
        self.threshold = threshold

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        probs, _ = self.agent(x)
        return probs >= self.threshold

    def keep(self, t: int, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return state[:, t]


class FixedDecision(Decision):
    """The same K keep flags for every image (FirstK, RandomK, DistributeK, Table 1)."""

    def __init__(self, method: str, vector: Sequence[float] | torch.Tensor):
        super().__init__()
        self.method = method
        self.fixed = tuple(bool(v) for v in torch.as_tensor(vector).reshape(-1).tolist())


class StageDecision(Decision):
    """A decision that runs each block stage itself, for a method whose stage is not a
    residual chain of kept and dropped blocks (ACT: the stage passes on a weighted sum
    of its blocks' outputs, and stops per image). ``run_stage(net, s, blocks, h)`` gets
    the :class:`ExportedBlockDrop` (its ``rnet`` and ``run_block``), the stage index,
    the stage's flat block indices and the stage input (B, C, H, W); it returns the
    stage output and one (B,) bool column per block: the images that ran it. Rows are
    picked and written back with :func:`gather_rows` and :func:`scatter_rows`."""

    def run_stage(self, net: ExportedBlockDrop, s: int, blocks: range,
                  h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError


# -- (b) the backbone, block by block ------------------------------------------------
class ExportedBlockDrop(nn.Module):
    """``forward(images) -> (logits, policy)``: the ResNet run under ``decision``, stage
    by stage, each per-image block on the rows that run it only."""

    def __init__(self, rnet: FlatResNet, decision: Decision):
        super().__init__()
        if decision.fixed is not None and len(decision.fixed) != rnet.num_blocks:
            raise ValueError(f"the fixed policy has {len(decision.fixed)} flags, the ResNet "
                             f"{rnet.num_blocks} blocks")
        self.rnet = rnet
        self.decision = decision
        starts = [sum(rnet.layers[:s]) for s in range(len(rnet.layers))]
        self.stages = [range(t, t + count) for t, count in zip(starts, rnet.layers,
                                                               strict=True)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rnet, decision = self.rnet, self.decision
        state = decision.begin(x)
        h = rnet.stem(x)
        columns = []
        for s, blocks in enumerate(self.stages):
            h, ran = self.run_stage(s, blocks, h, state)
            columns += ran
        logits = rnet.head(h)
        if decision.fixed is not None:
            flags = torch.tensor(decision.fixed, dtype=torch.uint8, device=x.device)
            policy = flags.expand(x.shape[0], rnet.num_blocks)
        elif state is not None and isinstance(state, torch.Tensor):
            policy = state.to(torch.uint8)
        else:
            policy = torch.stack(columns, 1).to(torch.uint8)
        return logits, policy

    def run_stage(self, s: int, blocks: range, h: torch.Tensor,
                  state) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage ``s``: its output and the (B,) keep column of each per-image block. A
        :class:`StageDecision` runs it; otherwise block by block, each kept block on the
        rows that keep it (a fixed decision: the kept blocks on every row)."""
        decision = self.decision
        if isinstance(decision, StageDecision):
            return decision.run_stage(self, s, blocks, h)
        columns = []
        for t in blocks:
            residual = self.rnet.residual(t, h)
            if decision.fixed is not None:
                h = self.run_block(t, h, residual) if decision.fixed[t] else residual
                continue
            keep = decision.keep(t, h, state)
            columns.append(keep)
            h = self._rows(t, h, residual, keep)
        return h, columns

    def run_block(self, t: int, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Block ``t`` on every row of ``h``: relu(residual + F(h))."""
        return F.relu(self.rnet.block(t)(h) + residual)

    def _rows(self, t: int, h: torch.Tensor, residual: torch.Tensor,
              keep: torch.Tensor) -> torch.Tensor:
        """Block ``t`` on the rows of ``h`` where ``keep`` (B,) is true, written into
        ``residual``; the other rows keep their residual."""
        rows = torch.nonzero(keep).reshape(-1)
        hs = gather_rows(h, rows)
        res = hs if residual is h else gather_rows(residual, rows)
        return scatter_rows(residual, rows, self.run_block(t, hs, res))


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (n,) int64 of ``x``, in that order (``Gather``; ``GatherND``
    after :func:`index_rows_directly`)."""
    return x.index_select(0, rows)


def scatter_rows(base: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` with its rows ``rows`` (n,) replaced by ``values`` (n, ...): a new tensor
    (``ScatterND``)."""
    return base.index_copy(0, rows, values)


def exportable(rnet: FlatResNet, decision: Decision) -> ExportedBlockDrop:
    """An :class:`ExportedBlockDrop` on eval-mode inference copies (BatchNorm folded,
    NCHW) of ``rnet`` and of the decision's network; the originals are untouched."""
    fast = FastOptions(fold_bn=True, channels_last=False)
    rnet = inference_copy(rnet, fast, torch.device("cpu")).cpu()
    decision = copy.deepcopy(decision)
    if getattr(decision, "agent", None) is not None:
        decision.agent = inference_copy(decision.agent, fast, torch.device("cpu")).cpu()
    return ExportedBlockDrop(rnet, decision).eval()


# -- writing and reading files --------------------------------------------------------
def export_onnx(module: ExportedBlockDrop, path: str, *, model: str, input_size: int,
                opset: int = DEFAULT_OPSET, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """Write ``module`` to ``path`` as one self-contained ONNX file with a dynamic batch
    dimension (``torch.onnx.export``, the ``torch.export``-based exporter) and its
    metadata (:data:`METADATA_KEYS`); returns the metadata. ``mean``/``std``: the
    normalisation the model expects of its input (None: raw [0, 1] pixels); ``extra``:
    more ``blockdrop.*`` entries (e.g. ``blockdrop.policy_flops``). A decision with
    ``block_flops`` records them as ``blockdrop.block_decision_flops``."""
    import onnx

    x = torch.rand(2, 3, input_size, input_size)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(module, (x,), None, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), opset_version=opset,
                                    dynamo=True, dynamic_shapes=({0: "batch"},),
                                    external_data=False, verbose=False)
    proto = program.model_proto
    index_rows_directly(proto)
    split_rows_once(proto)
    decision = module.decision
    kept = decision.fixed
    meta = {
        "blockdrop.model": model,
        "blockdrop.method": decision.method,
        "blockdrop.input_size": str(input_size),
        "blockdrop.num_blocks": str(module.rnet.num_blocks),
        "blockdrop.num_classes": str(module.rnet.fc.out_features),
        "blockdrop.opset": str(opset),
        "blockdrop.kept_blocks": ("per image" if kept is None else
                                  ",".join(str(t) for t, k in enumerate(kept) if k)),
        "blockdrop.mean": "none" if mean is None else ",".join(f"{v:.6g}" for v in mean),
        "blockdrop.std": "none" if std is None else ",".join(f"{v:.6g}" for v in std),
        **(extra or {}),
    }
    if decision.block_flops is not None:
        meta["blockdrop.block_decision_flops"] = ",".join(str(int(f))
                                                         for f in decision.block_flops)
    onnx.helper.set_model_props(proto, meta)
    proto.producer_name = "blockdrop"
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta


def index_rows_directly(proto) -> int:
    """Let each block's gather and scatter take the (n, 1) row indices that
    ``Transpose(NonZero(keep))`` gives: ``Gather(x, Reshape(idx, [-1]))`` becomes
    ``GatherND(x, idx)`` and ``ScatterND(base, Unsqueeze(Reshape(idx, [-1]), -1), rows)``
    takes ``idx`` itself; the reshapes, now unused, are removed. The same values with
    three nodes fewer per block (ONNX Runtime pays a few microseconds per node, which
    is what batch 1 costs). Returns how many nodes were rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in v.type.tensor_type.shape.dim]
              for v in list(graph.value_info) + list(graph.output)}

    def flat_of(name: str, through: str) -> str | None:
        """The (n, 1) row indices that ``name`` flattens (via ``through`` nodes and
        Reshape(-1)), or None."""
        node = producer.get(name)
        while node is not None and node.op_type in ("Reshape", through):
            if node.op_type == "Reshape":
                target = consts.get(node.input[1])
                if target is None or target.tolist() != [-1]:
                    return None
            elif node.op_type == "Unsqueeze":
                axes = consts.get(node.input[1]) if len(node.input) > 1 else None
                if axes is None or axes.tolist() not in ([-1], [1]):
                    return None
            name = node.input[0]
            node = producer.get(name)
        if (node is None or node.op_type != "Transpose"
                or list(node.attribute[0].ints) != [1, 0]
                or producer.get(node.input[0]) is None
                or producer[node.input[0]].op_type != "NonZero"
                or shapes.get(node.output[0], [None, None])[1:] != [1]):
            return None
        return name

    rewritten = 0
    for i, node in enumerate(graph.node):
        if node.op_type == "Gather" and all(a.i == 0 for a in node.attribute if a.name == "axis"):
            idx = flat_of(node.input[1], through="Reshape")
            if idx is not None:
                graph.node[i].CopyFrom(helper.make_node("GatherND", [node.input[0], idx],
                                                        list(node.output), name=node.name))
                rewritten += 1
        elif node.op_type == "ScatterND" and producer.get(node.input[1]) is not None \
                and producer[node.input[1]].op_type == "Unsqueeze":
            idx = flat_of(node.input[1], through="Unsqueeze")
            if idx is not None:
                node.input[1] = idx
                rewritten += 1
    _remove_dead_nodes(graph)
    return rewritten


def split_rows_once(proto) -> int:
    """For a one-shot policy P (B, K), find the row indices of every block in one go:
    the per-block ``Transpose(NonZero(Gather(P, t, axis=1)))`` become the outputs of
    one ``Split`` of the rows of ``NonZero(Transpose(P))`` (block-major, rows ascending
    within a block: the same indices) by the per-block counts ``ReduceSum(P, axis 0)``.
    Three nodes fewer per block. Returns the number of blocks rewritten (0 when the
    graph has no such pattern, e.g. BlockDrop-seq, whose decisions come block by block)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    found: dict[str, dict[int, str]] = {}  # policy tensor -> {block: its (n, 1) indices}
    first_use: dict[str, int] = {}
    position = {id(node): i for i, node in enumerate(graph.node)}
    for node in graph.node:
        if node.op_type != "Transpose" or list(node.attribute[0].ints) != [1, 0]:
            continue
        nonzero = producer.get(node.input[0])
        if nonzero is None or nonzero.op_type != "NonZero":
            continue
        column = producer.get(nonzero.input[0])
        if column is None or column.op_type != "Gather" or \
                [a.i for a in column.attribute if a.name == "axis"] != [1]:
            continue
        t = consts.get(column.input[1])
        policy = column.input[0]
        shape = shapes.get(policy)
        if t is None or t.ndim != 0 or shape is None or len(shape) != 2 or shape[1] is None:
            continue
        found.setdefault(policy, {})[int(t)] = node.output[0]
        first_use[policy] = min(first_use.get(policy, len(position)), position[id(column)])
    rewritten = 0
    for policy, blocks in found.items():
        k = shapes[policy][1]
        names = {key: f"{policy}_rows_{key}" for key in ("t", "nz", "row", "rows", "int",
                                                          "counts")}
        one = f"{policy}_rows_one"
        axes = f"{policy}_rows_axes"
        graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), one),
                                  numpy_helper.from_array(np.array([1], np.int64), axes)])
        outputs = [f"{policy}_rows_of_{t}" for t in range(k)]
        nodes = [
            helper.make_node("Transpose", [policy], [names["t"]], perm=[1, 0]),
            helper.make_node("NonZero", [names["t"]], [names["nz"]]),
            helper.make_node("Gather", [names["nz"], one], [names["row"]], axis=0),
            helper.make_node("Unsqueeze", [names["row"], axes], [names["rows"]]),
            helper.make_node("Cast", [names["t"]], [names["int"]], to=TensorProto.INT64),
            helper.make_node("ReduceSum", [names["int"], axes], [names["counts"]],
                             keepdims=0),
            helper.make_node("Split", [names["rows"], names["counts"]], outputs, axis=0),
        ]
        at = first_use[policy]
        order = list(graph.node)
        del graph.node[:]
        graph.node.extend(order[:at] + nodes + order[at:])
        renamed = {old: outputs[t] for t, old in blocks.items()}
        for node in graph.node:
            for j, name in enumerate(node.input):
                if name in renamed:
                    node.input[j] = renamed[name]
        rewritten += len(blocks)
    _remove_dead_nodes(graph)
    return rewritten


def _remove_dead_nodes(graph) -> None:
    """Drop nodes none of whose outputs is used (repeatedly), keeping graph outputs, then
    the initializers and shape records of values no longer there."""
    while True:
        used = {name for node in graph.node for name in node.input}
        used |= {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            produced = {o for node in graph.node for o in node.output}
            for field, names in ((graph.initializer, used), (graph.value_info, produced)):
                kept = [v for v in field if v.name in names]
                del field[:]
                field.extend(kept)
            return
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        del graph.node[:]
        graph.node.extend(keep)


class _quiet:
    """Silence the exporter's progress lines on stdout (it prints them unasked)."""

    def __enter__(self):
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)


def read_metadata(path: str) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file ``path`` (weights not loaded);
    ExportError if it is not an ONNX model."""
    import onnx

    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load_model(path, load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several types on bad bytes
        raise ExportError(f"{path} is not an ONNX model ({type(err).__name__})") from None
    if not proto.graph.node:
        raise ExportError(f"{path} is not an ONNX model (no graph)")
    return {p.key: p.value for p in proto.metadata_props}


def check_metadata(path: str, model: str, input_size: int) -> dict[str, str]:
    """The metadata of ``path``, after checking that it is an exported BlockDrop model
    of ``model`` taking ``input_size`` x ``input_size`` images (ExportError if not)."""
    meta = read_metadata(path)
    if "blockdrop.model" not in meta:
        raise ExportError(f"{path} is an ONNX model but not an exported BlockDrop model "
                          f"(no blockdrop.model metadata; export it with scripts.export)")
    problems = []
    if meta["blockdrop.model"] != model:
        problems.append(f"model {meta['blockdrop.model']}, expected {model}")
    if meta.get("blockdrop.input_size") != str(input_size):
        problems.append(f"input size {meta.get('blockdrop.input_size')}, expected {input_size}")
    if problems:
        raise ExportError(f"{path} does not match: " + "; ".join(problems))
    return meta
