"""Unpickling with an allow-list: plain containers and plain numeric numpy arrays, nothing that runs code.

The CIFAR-10 "python version" is a set of pickles. `pickle.load` on a tampered file executes whatever
the file names (`os.system`, ...). Even letting numpy rebuild its own objects is unsafe: a pickle can
hand `numpy.dtype` a forged internal state (an object field flagged as plain bytes) that turns raw
bytes into pointers. So numpy objects are never built during unpickling: the allowed numpy globals are
replaced by inert stubs that only record their arguments and state, and arrays are made afterwards with
`np.frombuffer` from a short list of plain numeric dtypes.
"""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np

from distvit.errors import DataError

# Plain numeric dtypes an array in a data pickle may have (kind + item size).
_PLAIN_DTYPES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"}


class _DtypeStub:
    """Stands in for numpy.dtype(spec, align, copy); its pickled state only contributes byte order."""

    def __init__(self, spec=None, align=False, copy=True):
        self.spec = spec.decode() if isinstance(spec, bytes) else spec
        self.byteorder = "|"

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "=", b"<", b">", b"|", b"="):
            order = state[1]
            self.byteorder = order.decode() if isinstance(order, bytes) else order

    def to_dtype(self) -> np.dtype:
        if not isinstance(self.spec, str) or self.spec not in _PLAIN_DTYPES:
            raise pickle.UnpicklingError(f"refusing numpy dtype {self.spec!r} (only plain numeric arrays are read)")
        order = "" if self.byteorder in ("|", "=") else self.byteorder
        return np.dtype(order + self.spec)


class _ArrayStub:
    """Stands in for numpy.core.multiarray._reconstruct(ndarray, ...) and records the array's state."""

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state

    def to_array(self) -> np.ndarray:
        if not (isinstance(self.state, tuple) and len(self.state) == 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        _, shape, dtype, fortran, raw = self.state
        if not isinstance(dtype, _DtypeStub) or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("numpy array without plain dtype and raw bytes (object arrays are refused)")
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"malformed numpy array shape {shape!r}")
        dtype = dtype.to_dtype()
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(
                f"numpy array of shape {shape} and dtype {dtype} does not match its {len(raw)} bytes"
            )
        return np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(*args):
    return _ArrayStub(*args)


class _BufferArrayStub(_ArrayStub):
    """Stands in for numpy's _frombuffer(buffer, dtype, shape, order), used by pickle protocol 5."""

    def __init__(self, buffer=None, dtype=None, shape=(), order="C"):
        super().__init__()
        self.state = (1, tuple(shape) if isinstance(shape, (tuple, list)) else shape, dtype, order == "F", buffer)


class _NdarrayMarker:
    """The `numpy.ndarray` argument of `_reconstruct`; never instantiated."""


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.numeric", "_frombuffer"): _BufferArrayStub,
    ("numpy.core.numeric", "_frombuffer"): _BufferArrayStub,
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _DtypeStub,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 store bytes
    ("__builtin__", "bytes"): lambda: b"",  # ... and empty bytes (no argument: bytes(n) could allocate n)
    ("builtins", "bytes"): lambda: b"",
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return _ALLOWED_GLOBALS[(module, name)]


def _materialise(value):
    """Replace array stubs by real arrays inside plain containers; anything else stubby is refused."""
    if isinstance(value, _ArrayStub):
        return value.to_array()
    if isinstance(value, dict):
        return {_materialise(k): _materialise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_materialise(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialise(v) for v in value)
    if isinstance(value, (_DtypeStub, type)):
        raise pickle.UnpicklingError("a bare numpy dtype or class is not data")
    return value


def safe_loads(payload: bytes, where: str) -> object:
    """Unpickle `payload` (bytes keys as in Python 2 pickles); a `DataError` naming `where` on refusal."""
    try:
        return _materialise(_AllowListUnpickler(io.BytesIO(payload), encoding="bytes").load())
    except pickle.UnpicklingError as err:
        raise DataError(f"{where}: {err}; the file is not a plain data pickle and was not loaded.") from None
    except Exception as err:  # truncated or foreign data raises many types
        raise DataError(f"{where}: cannot be read as a pickle ({type(err).__name__}: {err}).") from None
