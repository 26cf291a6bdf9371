"""distvit.data.prepare.safe_pickle: the allow-list unpickler reads plain containers and numeric arrays exactly and
refuses anything that would run code or build numpy objects from the file (a DataError naming the file)."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
from numpy._core.multiarray import _reconstruct

from distvit.data.prepare.safe_pickle import safe_loads
from distvit.errors import DataError

REFUSED = "the file is not a plain data pickle and was not loaded"


class RunsCommand:
    """Plain pickle.loads of this calls os.system(command)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class ForgedArray:
    """Pickles as numpy's own array reconstruction with an arbitrary state (shape, dtype, raw bytes)."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return (_reconstruct, (np.ndarray, (0,), b"b"), self.state)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_containers_and_numeric_arrays_round_trip_exactly(protocol):
    grid = np.arange(12, dtype=np.uint16).reshape(3, 4)
    value = {
        b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072),
        b"labels": [0, 9, 4],
        b"name": b"batch 1",
        "nested": (grid, np.asfortranarray(grid), [np.array([1.5, -2.0], dtype=np.float32)]),
        "big_endian": grid.astype(">i4"),
        "scalar": np.array(True),
        "plain": (1, 2.5, None, "text"),
    }
    loaded = safe_loads(pickle.dumps(value, protocol=protocol), "data_batch_1")
    assert loaded.keys() == value.keys()
    for key in (b"data", "big_endian", "scalar"):
        assert type(loaded[key]) is np.ndarray and loaded[key].dtype == value[key].dtype
        np.testing.assert_array_equal(loaded[key], value[key])
    assert loaded[b"labels"] == [0, 9, 4] and loaded[b"name"] == b"batch 1" and loaded["plain"] == value["plain"]
    c_order, f_order, (floats,) = loaded["nested"]
    np.testing.assert_array_equal(c_order, grid)
    np.testing.assert_array_equal(f_order, grid)  # Fortran-ordered raw bytes land in the right places
    assert floats.dtype == np.float32 and floats.tolist() == [1.5, -2.0]
    loaded[b"data"][0, 0] = 7  # a writable copy, not a view of the payload
    assert loaded[b"data"][0, 0] == 7


@pytest.mark.parametrize("protocol", [2, 5])
def test_a_pickle_naming_os_system_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": RunsCommand(f"touch {marker}"), b"labels": []}, protocol=protocol)
    with pytest.raises(DataError) as caught:
        safe_loads(payload, "data_batch_3")
    assert str(caught.value) == f"data_batch_3: refusing to load global {os.system.__module__}.system; {REFUSED}."
    assert not marker.exists()


@pytest.mark.parametrize(
    "hostile, refusal",
    [
        (np.zeros(4, dtype=[("a", "V8")]), "refusing numpy dtype 'V8'"),
        (np.zeros(2, dtype="U3"), "refusing numpy dtype 'U3'"),
        (np.zeros(2, dtype=np.complex64), "refusing numpy dtype 'c8'"),
        (np.array([object()], dtype=object), "refusing to load global __builtin__.object"),
        (np.dtype("f4"), "a bare numpy dtype or class is not data"),
    ],
)
def test_numpy_objects_other_than_plain_numeric_arrays_are_refused(hostile, refusal):
    with pytest.raises(DataError) as caught:
        safe_loads(pickle.dumps({b"data": hostile}, protocol=2), "f.pkl")
    assert str(caught.value).startswith(f"f.pkl: {refusal}") and str(caught.value).endswith(f"; {REFUSED}.")


def test_forged_array_states_are_refused():
    plain = np.dtype("u1")
    accepted = safe_loads(pickle.dumps(ForgedArray((1, (3,), plain, False, b"abc")), protocol=2), "w")
    assert accepted.tolist() == [97, 98, 99]  # the same path with a consistent state is read
    for state, message in (
        ((1, (5,), plain, False, b"abc"), "numpy array of shape (5,) and dtype uint8 does not match its 3 bytes"),
        ((1, (-1,), plain, False, b"abc"), "malformed numpy array shape (-1,)"),
        ((1, (3,)), "malformed numpy array state"),
        ((1, (3,), plain, False, [97, 98, 99]), "numpy array without plain dtype and raw bytes"),
    ):
        with pytest.raises(DataError, match="^" + re.escape(f"w: {message}")):
            safe_loads(pickle.dumps(ForgedArray(state), protocol=2), "w")


def test_data_that_is_not_a_pickle_is_a_data_error():
    with pytest.raises(DataError, match="^t: pickle data was truncated; the file is not a plain data pickle"):
        safe_loads(pickle.dumps([1, 2, 3])[:-3], "t")
    with pytest.raises(DataError, match=r"^t: cannot be read as a pickle \(EOFError: Ran out of input\)\.$"):
        safe_loads(b"", "t")
