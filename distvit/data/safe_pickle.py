"""Unpickling with an allow-list: plain containers and numpy arrays, nothing that can run code.

The CIFAR-10 "python version" is a set of pickles. `pickle.load` on a tampered file executes whatever
the file names (`os.system`, ...); `safe_loads` resolves only the globals needed to rebuild numpy
arrays and refuses everything else before it is called.
"""

from __future__ import annotations

import io
import pickle

from distvit.errors import DataError

# (module, name) pairs a numpy array pickle needs, across numpy 1.x/2.x and Python 2/3 writers.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def safe_loads(payload: bytes, where: str) -> object:
    """Unpickle `payload` (bytes keys as in Python 2 pickles); a `DataError` naming `where` on refusal."""
    try:
        return _AllowListUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DataError(f"{where}: {err}; the file is not a plain data pickle and was not loaded.") from None
    except Exception as err:  # truncated or foreign data raises many types
        raise DataError(f"{where}: cannot be read as a pickle ({type(err).__name__}: {err}).") from None
