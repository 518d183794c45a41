"""Reading an untrusted ONNX file without trusting it.

``onnx.load`` is called with ``load_external_data=False``: it reads the file itself and
nothing else. Every tensor's declared size is then checked against the bytes it really
holds, and external data must name a file inside the model's own folder (after resolving
links) whose stated range exists, before any array is made. So a model cannot make
specforge read files elsewhere or allocate more memory than its files hold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

#: ONNX TensorProto data types specforge reads, with their numpy types.
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64,
          9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
#: Where each data type keeps its values when not in raw_data (the others: int32_data).
TYPED_FIELDS = {1: "float_data", 11: "double_data", 7: "int64_data", 13: "uint64_data",
                12: "uint64_data"}
EXTERNAL = 1  # TensorProto.EXTERNAL


class UnsafeModel(Exception):
    """The file asks for something specforge does not do (the message says what)."""


def declared_bytes(tensor: Any) -> int:
    """The bytes ``tensor``'s dims and type claim, computed without allocating anything."""
    if tensor.data_type not in DTYPES:
        raise UnsafeModel(f"tensor {tensor.name!r} has ONNX data type {tensor.data_type}, "
                          "which specforge does not read")
    if any(d < 0 for d in tensor.dims):
        raise UnsafeModel(f"tensor {tensor.name!r} has negative dims {list(tensor.dims)}")
    return math.prod(tensor.dims) * np.dtype(DTYPES[tensor.data_type]).itemsize


def _held_bytes(tensor: Any) -> int:
    """The bytes ``tensor`` really holds: raw_data, or one typed-field entry per element."""
    if tensor.raw_data:
        return len(tensor.raw_data)
    stored = getattr(tensor, TYPED_FIELDS.get(tensor.data_type, "int32_data"))
    return len(stored) * np.dtype(DTYPES[tensor.data_type]).itemsize


def external_range(tensor: Any, folder: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, checked: a relative location inside
    ``folder``, an existing file, and a range inside it of exactly the declared size."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    declared = declared_bytes(tensor)
    relative = Path(location)
    root = folder.resolve()
    if not location or relative.is_absolute() or ".." in relative.parts:
        raise UnsafeModel(f"tensor {tensor.name!r} names external data {location!r} outside "
                          f"the model's folder {folder}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UnsafeModel(f"tensor {tensor.name!r} names external data {location!r}, which "
                          f"leads outside the model's folder {folder}")
    if not path.is_file():
        raise UnsafeModel(f"tensor {tensor.name!r}: its external data file {location!r} "
                          "does not exist")
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries.get("length", declared))
    except ValueError:
        raise UnsafeModel(f"tensor {tensor.name!r}: bad external data offset or length"
                          ) from None
    size = path.stat().st_size
    if length != declared or offset < 0 or offset + length > size:
        raise UnsafeModel(f"tensor {tensor.name!r} declares dims {list(tensor.dims)} "
                          f"({declared:,} bytes) but its external data {location!r} holds "
                          f"{max(min(length, size - offset), 0):,}")
    return path, offset, length


def check_tensor(tensor: Any, folder: Path) -> None:
    """Refuse a tensor whose declared size is not what it (or its external file) holds."""
    if tensor.data_location == EXTERNAL:
        external_range(tensor, folder)
        return
    declared, held = declared_bytes(tensor), _held_bytes(tensor)
    if declared != held:
        raise UnsafeModel(f"tensor {tensor.name!r} declares dims {list(tensor.dims)} "
                          f"({declared:,} bytes) but holds {held:,} bytes of data")


def tensor_array(tensor: Any, folder: Path) -> np.ndarray:
    """The values of a checked tensor (see :func:`check_tensor`)."""
    check_tensor(tensor, folder)
    if tensor.data_location != EXTERNAL:
        from onnx import numpy_helper

        return np.asarray(numpy_helper.to_array(tensor))
    path, offset, length = external_range(tensor, folder)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return np.frombuffer(data, DTYPES[tensor.data_type]).reshape(tuple(tensor.dims)).copy()


def load_checked(source: Path) -> Any:
    """The ONNX model in ``source``, its external data not loaded, every tensor checked."""
    import onnx

    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UnsafeModel(f"not a readable ONNX model: {exc}") from None
    folder = source.parent
    for tensor in all_tensors(model.graph):
        check_tensor(tensor, folder)
    if len(model.graph.sparse_initializer):
        raise UnsafeModel("sparse initializers are not supported")
    return model


def all_tensors(graph: Any) -> list[Any]:
    """Initializers and the tensors of Constant nodes, including those of subgraphs."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            if attr.HasField("g"):
                tensors.extend(all_tensors(attr.g))
            for sub in attr.graphs:
                tensors.extend(all_tensors(sub))
    return tensors
