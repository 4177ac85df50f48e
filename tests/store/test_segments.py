"""``SegmentedArray`` indexes per-shard segment files exactly like the one flat array they make up."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_fast._errors import StoreError
from scfm_fast.store.segments import SegmentedArray


@pytest.fixture
def seg(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [7, 1, 0, 12, 5]  # an empty segment too
    flat = rng.integers(0, 60_000, sum(lengths)).astype(np.uint16)
    files, pos = [], 0
    for k, n in enumerate(lengths):
        files.append(tmp_path / f"s{k}.npy")
        np.save(files[-1], flat[pos:pos + n])
        pos += n
    return SegmentedArray(files, lengths, np.uint16, repair="redo it"), flat


def test_slices_ints_and_gathers_equal_the_flat_array(seg):
    s, flat = seg
    assert len(s) == s.shape[0] == flat.size and s.dtype == flat.dtype and s.ndim == 1
    n = flat.size
    for lo in range(-2, n + 2):
        for hi in range(lo - 1, n + 3):
            np.testing.assert_array_equal(s[lo:hi], flat[lo:hi], err_msg=f"[{lo}:{hi}]")
    for key in (slice(None, None, 2), slice(None, None, -1), slice(20, 3, -3), slice(None)):
        np.testing.assert_array_equal(s[key], flat[key])
    for i in (0, 6, 7, 8, n - 1, -1, -n):
        assert s[i] == flat[i]
    rng = np.random.default_rng(1)
    for idx in (rng.integers(-n, n, 50), np.array([], np.int64), np.array([3, 3, 2]), rng.integers(0, n, (4, 6)),
                np.arange(8, 20), np.array([0, 0, 7, 7, 8, 19, 19, 24]), np.array([24])):
        got = s[idx]
        assert got.shape == idx.shape and got.dtype == flat.dtype
        np.testing.assert_array_equal(got, flat[idx])
    mask = rng.random(n) < 0.4
    np.testing.assert_array_equal(s[mask], flat[mask])
    np.testing.assert_array_equal(np.asarray(s), flat)
    np.testing.assert_array_equal(np.asarray(s, dtype=np.int64), flat.astype(np.int64))


def test_a_slice_inside_one_segment_is_a_view_of_its_map(seg):
    s, _ = seg
    v = s[8:15]
    assert not v.flags.owndata and not v.flags.writeable


def test_bad_indexes_raise_index_error(seg):
    s, flat = seg
    for bad in (flat.size, -flat.size - 1):
        with pytest.raises(IndexError):
            s[bad]
        with pytest.raises(IndexError):
            s[np.array([0, bad])]
    with pytest.raises(IndexError):
        s[np.array([0.5])]
    with pytest.raises(IndexError):
        s[np.ones(3, bool)]


def test_a_damaged_or_missing_segment_names_its_file(seg, tmp_path):
    s, flat = seg
    np.save(tmp_path / "s3.npy", flat[:3])  # too short
    assert s[0] == flat[0]  # untouched segments still read
    with pytest.raises(StoreError, match=r"s3\.npy: packed segment holds uint16\[3\], expected uint16\[12\]; "
                                         "redo it"):
        s[10]
    (tmp_path / "s4.npy").unlink()
    with pytest.raises(StoreError, match=r"s4\.npy: packed segment missing or damaged .*; redo it"):
        s[-1]


def test_take_ranges_equals_concatenated_slices(seg):
    s, flat = seg
    n = flat.size
    starts = np.array([0, 3, 7, 8, 8, 20, 24, 5, 0])
    lengths = np.array([7, 4, 1, 12, 0, 5, 1, 10, n])  # within segments, empty, spanning several, all
    got = s.take_ranges(starts, lengths, np.int64)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.concatenate([flat[a:a + m] for a, m in zip(starts, lengths)]))
    assert s.take_ranges(np.array([], np.int64), np.array([], np.int64)).size == 0
    with pytest.raises(IndexError):
        s.take_ranges(np.array([n - 1]), np.array([2]))
