"""Graphs past ONNX's 2 GB protobuf limit: trace without weights, then stream them to external data.

``torch.onnx.export`` serializes every weight into one protobuf, so the exporter holds the model, its
serialized copy and (with constant folding) folded copies at once, and a protobuf cannot exceed 2 GB:
a Qwen2.5-VL-3B decoder (11 GB fp32) cannot be written that way at all. Here the export is split:

1. ``export_unbound`` traces the module with its parameters passed in as inputs (swapped into the
   module for the call), so every parameter becomes a graph input under its name and the graph
   holds no weights; torch's constant folding still folds the index and shape arithmetic. (``export_params=False`` is not enough: the exporter still serializes
   every parameter for its shape inference, and compares them all to de-duplicate initializers.)
   The traced values do not matter (the graph does not depend on them), so a caller may trace a
   model whose large weights are stand-ins (``models.streamed``: stride-0 views of a scalar).
2. ``bind_weights`` turns each such input into an initializer whose bytes are appended to
   ``<graph>.data`` one tensor at a time, read through a resolver (memory-mapped shards, or a
   resident module). A weight whose only reader is a 2-D ``Transpose`` (what ``nn.Linear`` on a 3-D
   input traces to when its weight is an input) is stored transposed and the Transpose dropped,
   which is what constant folding would have done and what the MatMul quantizers need (weights as
   MatMul initializers).

Offsets are aligned to 4 KiB so ONNX Runtime can memory-map each tensor. The ``.onnx`` and its
``.data`` are written together (both or neither, ``fileio.atomic_paths``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import ExportError
from conceptseg_edge.export.parts import PartSpec
from conceptseg_edge.fileio import atomic_path, atomic_paths

#: Byte alignment of every tensor in a ``.data`` file (a page: ONNX Runtime maps aligned tensors).
ALIGNMENT = 4096
#: Initializers smaller than this stay inside the ``.onnx`` (norm weights, biases, scales).
INLINE_MAX_BYTES = 64 * 1024
DATA_SUFFIX = ".data"

Resolver = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class StreamedWeights:
    """How ``export_and_validate`` exports a part whose weights are streamed: ``resolve`` gives each
    parameter (by the traced module's ``state_dict`` name) as fp32; ``tracing`` is entered while
    the module is traced (stand-in weights), ``reference`` while the torch reference runs (the
    real ones, e.g. ``StreamedPolicy.streaming``)."""

    resolve: Resolver
    tracing: Callable[[], AbstractContextManager] = nullcontext
    reference: Callable[[], AbstractContextManager] = nullcontext


def data_path(path: Path) -> Path:
    """The external data file that belongs to graph ``path`` (``<file>.data``, beside it)."""
    return path.with_name(path.name + DATA_SUFFIX)


def _weights_as_inputs(module, count: int, slots: dict[str, list[str]]):
    """``module`` called with its parameters as trailing positional arguments, swapped into every
    slot that holds them for the call, so the tracer records them as graph inputs: their values are
    never serialized or inspected (as parameters they would be, by the exporter's shape inference
    and initializer de-duplication). ``torch.func.functional_call`` refuses to run under the tracer."""
    import torch

    class WeightsAsInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args):
            saved = []
            for weight, names in zip(args[count:], slots.values()):
                for name in names:
                    owner, _, attr = name.rpartition(".")
                    owner = self.inner.get_submodule(owner)
                    saved.append((owner, attr, owner._parameters[attr]))
                    owner._parameters[attr] = weight
            try:
                return self.inner(*args[:count])
            finally:
                for owner, attr, param in reversed(saved):
                    owner._parameters[attr] = param

    return WeightsAsInputs()


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the TorchScript exporter's expected warnings. Tracer warnings flag Python-side shape
    branches (Hiera's padding); the parity check after every export is what tells whether the trace
    holds for other shapes."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        yield


def export_unbound(module, spec: PartSpec, example: Mapping[str, np.ndarray], path: Path, opset: int) -> None:
    """Trace ``module`` on ``example`` into ``path`` with its parameters (by ``named_parameters``
    name; a tied parameter once) as extra graph inputs after ``spec``'s."""
    import torch

    params: dict[int, torch.Tensor] = {}
    slots: dict[str, list[str]] = {}  # first name of each parameter (its input name) → every name (tied ones)
    first: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        key = first.setdefault(id(param), name)
        params.setdefault(id(param), param)
        slots.setdefault(key, []).append(name)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[name])) for name in spec.input_names)
    wrapper = _weights_as_inputs(module, len(args), slots)
    with atomic_path(path) as tmp, torch.no_grad(), quiet_tracing():
        torch.onnx.export(
            wrapper,
            (*args, *params.values()),
            str(tmp),
            input_names=[*spec.input_names, *slots],
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,  # weights are inputs: only index/shape arithmetic folds
            dynamo=False,
        )


class DataWriter:
    """Appends arrays to one external data file at aligned offsets and returns their TensorProtos
    (arrays under ``inline_max_bytes`` stay inline; ``math.inf`` keeps a graph self-contained)."""

    def __init__(self, handle, location: str, inline_max_bytes: float = INLINE_MAX_BYTES) -> None:
        self.handle = handle
        self.location = location
        self.inline_max_bytes = inline_max_bytes
        self.offset = 0

    def tensor(self, array: np.ndarray, name: str):
        """``array`` as an initializer ``name``: inline when small, else appended to the data file."""
        from onnx import TensorProto, helper, numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes < self.inline_max_bytes:
            return numpy_helper.from_array(array, name)
        pad = -self.offset % ALIGNMENT
        self.handle.write(b"\0" * pad)
        self.offset += pad
        self.handle.write(array.data)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += array.nbytes
        return proto


def bind_weights(path: Path, spec: PartSpec, resolve: Resolver, progress: Callable[[int], None] | None = None) -> int:
    """Replace the parameter inputs of the unbound graph ``path`` by initializers streamed to
    ``<path>.data``; rewrites both files atomically. Returns the number of bytes stored externally.

    ``resolve(name)`` returns the fp32 array of the parameter the graph input ``name`` stands for;
    it is called once per parameter and its result dropped after writing.

    Raises:
        ExportError: the resolver has no tensor for an input, or returns another shape.
    """
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    declared = set(spec.input_names)
    params = [i for i in graph.input if i.name not in declared]
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dropped: set[int] = set()
    initializers = []
    target = data_path(path)
    with atomic_paths(path, target) as (tmp_graph, tmp_data), open(tmp_data, "wb") as handle:
        writer = DataWriter(handle, target.name)
        for param in params:
            shape = tuple(d.dim_value for d in param.type.tensor_type.shape.dim)
            try:
                array = np.asarray(resolve(param.name), dtype=np.float32)
            except KeyError as exc:
                raise ExportError(f"{spec.name}: no weight for graph input {param.name!r} ({exc})") from exc
            if array.shape != shape:
                raise ExportError(f"{spec.name}: weight {param.name!r} has shape {array.shape}, the graph {shape}")
            name, users = param.name, readers.get(param.name, [])
            if array.ndim == 2 and len(users) == 1 and _is_transpose_2d(users[0]):
                dropped.add(id(users[0]))
                array, name = array.T, users[0].output[0]
            initializers.append(writer.tensor(array, name))
            del array
            if progress is not None:
                progress(1)
        keep = [n for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(keep)
        inputs = [i for i in graph.input if i.name in declared]
        del graph.input[:]
        graph.input.extend(inputs)
        graph.initializer.extend(initializers)
        handle.flush()
        stored = writer.offset
        model_bytes = model.SerializeToString()
        if len(model_bytes) >= 2**31:
            raise ExportError(f"{spec.name}: graph without weights is still {len(model_bytes)} bytes")
        Path(tmp_graph).write_bytes(model_bytes)
    onnx.checker.check_model(str(path))  # by path: the checker then follows the external data
    if not any(t.data_location == TensorProto.EXTERNAL for t in initializers):
        target.unlink()
    return stored


def _is_transpose_2d(node) -> bool:
    if node.op_type != "Transpose":
        return False
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return not perm or perm[0] == [1, 0]


def data_files(out_dir: Path, parts: Iterable) -> dict[str, str]:
    """``{data file name: sha256}`` of the parts' external data in ``out_dir`` (for a manifest's
    ``files``: the part's own hash covers only its ``.onnx``)."""
    from conceptseg_edge.fileio import sha256_file

    found = (data_path(Path(out_dir) / part.file) for part in parts)
    return {str(path.relative_to(out_dir)): sha256_file(path) for path in found if path.is_file()}
