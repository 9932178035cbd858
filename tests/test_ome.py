"""Pure OME-NGFF metadata builders and pyramid downsampling (semdask.ome)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ome_zarr_models.v04.image import ImageAttrs as ImageAttrs04
from ome_zarr_models.v04.image_label import ImageLabelAttrs as ImageLabelAttrs04
from ome_zarr_models.v04.labels import LabelsAttrs as LabelsAttrs04
from ome_zarr_models.v05.image import ImageAttrs
from ome_zarr_models.v05.image_label import ImageLabelAttrs
from ome_zarr_models.v05.labels import LabelsAttrs

from semdask import __version__
from semdask.storage import ome, pyramid


def _mean_ref(a: np.ndarray) -> np.ndarray:
    """Reference 2x2 mean with edge padding (independent of semdask.ome)."""
    a = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)],
               mode="edge").astype(np.float64)
    m = (a[..., ::2, ::2] + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2]) / 4
    return m


def _mode_ref(a: np.ndarray) -> np.ndarray:
    a = np.pad(a, [(0, a.shape[0] % 2), (0, a.shape[1] % 2)], mode="edge")
    out = np.empty((a.shape[0] // 2, a.shape[1] // 2), a.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            v = [a[2 * i, 2 * j], a[2 * i, 2 * j + 1], a[2 * i + 1, 2 * j], a[2 * i + 1, 2 * j + 1]]
            counts = [v.count(x) for x in v]
            out[i, j] = v[counts.index(max(counts))]
    return out


@pytest.mark.parametrize("names", ["yx", "cyx"])
@pytest.mark.parametrize("px", [0.25, None])
def test_image_attrs_validate_v05(names: str, px: float | None) -> None:
    attrs = ome.image_attrs(3, pixel_size_um=px, names=names, name="m")
    assert attrs["ome"]["version"] == "0.5"
    parsed = ImageAttrs.model_validate(attrs["ome"])
    ms = parsed.multiscales[0]
    assert [a.name for a in ms.axes] == list(names)
    assert ms.axes[0].type == ("channel" if names == "cyx" else "space")
    scales = [d["coordinateTransformations"][0]["scale"] for d in attrs["ome"]["multiscales"][0]
              ["datasets"]]
    base = 1.0 if px is None else px
    assert [s[-1] for s in scales] == [base, 2 * base, 4 * base]
    if names == "cyx":
        assert all(s[0] == 1.0 for s in scales)
    units = {a.get("unit") for a in attrs["ome"]["multiscales"][0]["axes"] if a["type"] == "space"}
    assert units == ({None} if px is None else {"micrometer"})


def test_labels_and_image_label_validate_v05_and_v04() -> None:
    classes = ["pore", "Ni", "NiO", "YSZ"]
    il = ome.image_label_attrs(2, classes=classes, pixel_size_um=0.1)
    parsed = ImageLabelAttrs.model_validate(il["ome"])
    assert parsed.image_label is not None
    assert [p.name for p in parsed.image_label.properties] == classes  # type: ignore[union-attr]
    assert parsed.image_label.source.image == "../../"  # type: ignore[union-attr]
    assert LabelsAttrs.model_validate(ome.labels_attrs(["phases"])["ome"]).labels == ["phases"]

    il4 = ome.image_label_attrs(2, classes=classes, pixel_size_um=0.1, version="0.4")
    assert "ome" not in il4
    assert il4["multiscales"][0]["version"] == "0.4"
    ImageLabelAttrs04.model_validate(il4)
    ImageAttrs04.model_validate(ome.image_attrs(2, pixel_size_um=None, version="0.4"))
    LabelsAttrs04.model_validate(ome.labels_attrs(["phases"], version="0.4"))


def test_label_info_round_trip_and_colour_mismatch() -> None:
    cols = [(1, 2, 3, 255), (4, 5, 6, 128)]
    attrs = ome.image_label_attrs(1, classes=["a", "b"], colours=cols, pixel_size_um=None)
    assert ome.label_info(attrs) == (["a", "b"], cols)
    with pytest.raises(ValueError, match="colours"):
        ome.image_label_attrs(1, classes=["a"], colours=cols, pixel_size_um=None)
    assert len(set(ome.default_colours(12))) == 12


def test_semdask_attrs_and_pixel_size() -> None:
    b = ome.semdask_attrs({"norm": np.float64(2.0), "arr": np.arange(2)}, None, classes=("a",))
    assert b == {"norm": 2.0, "arr": [0, 1], "classes": ["a"], "version": __version__,
                 "complete": False, "pixel_size_um": None}
    assert ome.pixel_size_of({"semdask": b}) is None
    # a foreign store (no semdask block) with a micrometer scale
    assert ome.pixel_size_of(ome.image_attrs(1, pixel_size_um=0.7)) == 0.7
    assert ome.pixel_size_of(ome.image_attrs(1, pixel_size_um=None)) is None


def test_versions_and_levels() -> None:
    assert ome.ngff_version(ome.image_attrs(1, pixel_size_um=1.0)) == "0.5"
    assert ome.ngff_version(ome.image_attrs(1, pixel_size_um=1.0, version="0.4")) == "0.4"
    assert ome.ngff_version({"foo": 1}) is None
    assert pyramid.n_levels((1000, 1333)) == 2
    assert pyramid.level_shapes((3, 9, 5), 3) == [(3, 9, 5), (3, 5, 3), (3, 3, 2)]


def test_shard_shape_and_misaligned() -> None:
    assert ome.shard_shape((100, 130), "yx") == (112, 144)
    assert ome.shard_shape((4, 100, 130), "cyx", chunks=((4,), (50, 50), (64, 64, 2))) == (
        4, 50, 64)
    assert ome.misaligned(((50, 50), (64, 66)), (50, 64)) is None
    assert ome.misaligned(((50, 50), (60, 70)), (50, 64)) == (1, 60)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_downsample_mean_matches_reference(dtype: type) -> None:
    rng = np.random.default_rng(1)
    a = (rng.random((3, 37, 51)) * 200).astype(dtype)
    got = pyramid.downsample_mean(da.from_array(a, chunks=(1, 10, 13))).compute()
    ref = _mean_ref(a)
    assert got.dtype == a.dtype
    assert got.shape == (3, 19, 26)
    if np.issubdtype(dtype, np.integer):
        np.testing.assert_array_equal(got, np.rint(ref).astype(dtype))
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_downsample_mode_matches_reference() -> None:
    a = np.random.default_rng(2).integers(0, 4, (23, 30)).astype(np.uint8)
    got = pyramid.downsample_mode(da.from_array(a, chunks=(7, 9))).compute()
    np.testing.assert_array_equal(got, _mode_ref(a))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 5), h=st.integers(1, 17), w=st.integers(1, 17),
       seed=st.integers(0, 2**16))
def test_downsample_mode_ties_and_sizes(k: int, h: int, w: int, seed: int) -> None:
    a = np.random.default_rng(seed).integers(0, k, (h, w)).astype(np.uint8)
    got = pyramid.downsample_mode(da.from_array(a, chunks=(5, 6))).compute()
    np.testing.assert_array_equal(got, _mode_ref(a))


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 60), w=st.integers(1, 60), cy=st.integers(1, 25), cx=st.integers(1, 25),
    seed=st.integers(0, 2**16),
)
def test_downsampling_is_chunk_invariant(h: int, w: int, cy: int, cx: int, seed: int) -> None:
    a = np.random.default_rng(seed).integers(0, 5, (h, w)).astype(np.uint8)
    one = da.from_array(a, chunks=-1)
    many = da.from_array(a, chunks=(cy, cx))
    for fn in (pyramid.downsample_mean, pyramid.downsample_mode):
        np.testing.assert_array_equal(fn(one).compute(), fn(many).compute())
