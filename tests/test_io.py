"""OME-Zarr stores: writers, readers, OME validation, path safety (semdask.io)."""

from __future__ import annotations

import itertools
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ome_zarr_models.v04.image import Image as Image04
from ome_zarr_models.v04.image_label import ImageLabel as ImageLabel04
from ome_zarr_models.v04.labels import Labels as Labels04
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from ome_zarr_models.v05.labels import Labels as Labels05

from semdask import __version__
from semdask.errors import IncompleteOutputError, StoreError, UnsafePathError
from semdask.paths import validate_input_path, validate_output_path
from semdask.storage import arrays as sarr
from semdask.storage import io
from semdask.storage.export import export_ngff04

CLASSES = ["pore", "Ni", "NiO", "YSZ"]
COLOURS = [(0, 0, 0, 255), (200, 200, 0, 255), (0, 128, 255, 255), (90, 90, 90, 255)]


def _image(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    return rng.random(shape, dtype=np.float32)


@pytest.fixture
def store(tmp_path: Path) -> io.Mosaic:
    a = _image((300, 410), np.uint8)
    return io.write_image(tmp_path / "m.ome.zarr", da.from_array(a, chunks=128),
                          pixel_size_um=0.05, levels=2)


@pytest.mark.parametrize(("dtype", "chunks"), [(np.uint8, (256, 300)), (np.uint16, (1000, 500)),
                                               (np.float32, (333, 1333))])
def test_image_round_trip_pyramid_and_ome(tmp_path: Path, dtype: type,
                                          chunks: tuple[int, int]) -> None:
    a = _image((1000, 1333), dtype)
    m = io.write_image(tmp_path / "a.ome.zarr", da.from_array(a, chunks=chunks),
                       pixel_size_um=0.2, attrs={"source": {"file": "a.tif"}})
    np.testing.assert_array_equal(m.image.compute(), a)
    assert m.image.dtype == dtype
    assert (m.levels, m.level(1).shape, m.pixel_size_um) == (2, (500, 667), 0.2)
    sem = m.attrs["semdask"]
    assert sem["complete"] is True
    assert sem["version"] == __version__
    assert sem["source"] == {"file": "a.tif"}
    assert sem["pixel_size_um"] == 0.2
    # level 1 is the 2x mean (edge-padded for the odd width)
    pad = np.pad(a, ((0, 0), (0, 1)), mode="edge").astype(np.float64)
    ref = (pad[::2, ::2] + pad[1::2, ::2] + pad[::2, 1::2] + pad[1::2, 1::2]) / 4
    if np.issubdtype(dtype, np.integer):
        ref = np.rint(ref)
    np.testing.assert_allclose(m.level(1).compute(), ref.astype(dtype), rtol=1e-6)
    # sharded, blosc-zstd, named dimensions; shard = the dask chunk edge (an axis held
    # in one chunk gets its length rounded up to 16)
    arr = zarr.open_array(tmp_path / "a.ome.zarr" / "0", mode="r")
    assert arr.shards == tuple(c if c < n else -(-n // 16) * 16
                               for c, n in zip(chunks, a.shape, strict=True))
    assert arr.metadata.dimension_names == ("y", "x")
    assert all(s % c == 0 for s, c in zip(arr.shards, arr.chunks, strict=True))
    codec = arr.metadata.codecs[0].codecs[-1]  # type: ignore[union-attr]
    assert (codec.cname.value, codec.clevel) == ("zstd", 5)
    # valid OME-Zarr 0.5
    img = Image.from_zarr(zarr.open_group(tmp_path / "a.ome.zarr", mode="r"))
    ds = img.attributes.ome.multiscales[0].datasets
    assert [d.coordinateTransformations[0].scale for d in ds] == [[0.2, 0.2], [0.4, 0.4]]


def test_unknown_pixel_size_and_explicit_chunk(tmp_path: Path) -> None:
    a = _image((200, 150), np.uint8)
    m = io.write_image(tmp_path / "u.ome.zarr", da.from_array(a), pixel_size_um=None, chunk=64,
                       levels=3)
    assert m.pixel_size_um is None
    assert m.attrs["semdask"]["pixel_size_um"] is None
    assert [m.level(i).shape for i in range(3)] == [(200, 150), (100, 75), (50, 38)]
    assert zarr.open_array(tmp_path / "u.ome.zarr" / "2", mode="r").shards == (64, 64)
    ms = m.attrs["ome"]["multiscales"][0]
    assert ms["datasets"][2]["coordinateTransformations"][0]["scale"] == [4.0, 4.0]
    Image.from_zarr(zarr.open_group(m.path, mode="r"))


def test_labels_round_trip_and_ome(store: io.Mosaic) -> None:
    lab = np.random.default_rng(3).integers(0, 4, store.image.shape).astype(np.uint8)
    out = io.write_labels(store.path, da.from_array(lab, chunks=100), classes=CLASSES,
                          colours=COLOURS, attrs={"provenance": {"model": "x"}})
    assert out.classes == CLASSES
    assert out.colours == COLOURS
    assert out.levels == store.levels
    assert out.attrs["semdask"]["provenance"] == {"model": "x"}
    np.testing.assert_array_equal(out.data.compute(), lab)
    assert out.level(1).shape == (150, 205)
    again = io.open_labels(store.path)
    assert (again.classes, again.colours) == (CLASSES, COLOURS)
    # a second label image is listed next to the first
    io.write_labels(store.path, lab, name="truth", classes=CLASSES)
    root = zarr.open_group(store.path, mode="r")
    assert root["labels"].attrs["ome"]["labels"] == ["phases", "truth"]
    img = Image.from_zarr(root)
    assert img.labels is not None
    assert Labels05.from_zarr(root["labels"]).attributes.ome.labels == ["phases", "truth"]
    il = ImageLabel.from_zarr(root["labels/phases"]).attributes.ome.image_label
    assert il is not None
    assert [p.model_dump()["name"] for p in il.properties] == CLASSES  # type: ignore[union-attr]
    assert [c.rgba for c in il.colors] == COLOURS  # type: ignore[union-attr]


def test_labels_mode_downsampling(store: io.Mosaic) -> None:
    lab = np.zeros(store.image.shape, np.uint8)
    lab[:, 1::2] = 2  # each 2x2 block holds two 0s and two 2s: tie -> top-left (0)
    lab[:100, :] = 3
    out = io.write_labels(store.path, da.from_array(lab, chunks=(64, 96)), classes=CLASSES)
    l1 = out.level(1).compute()
    assert (l1[:50] == 3).all()
    assert (l1[50:] == 0).all()


def test_labels_shape_must_match_and_not_clobbered(store: io.Mosaic) -> None:
    with pytest.raises(ValueError, match="mosaic shape"):
        io.write_labels(store.path, np.zeros((10, 10), np.uint8), classes=CLASSES)
    lab = np.ones(store.image.shape, np.uint8)
    io.write_labels(store.path, lab, classes=CLASSES)
    with pytest.raises(UnsafePathError, match="overwrite"):
        io.write_labels(store.path, lab * 2, classes=CLASSES)
    assert (io.open_labels(store.path).data.compute() == 1).all()
    io.write_labels(store.path, lab * 2, classes=CLASSES, overwrite=True)
    assert (io.open_labels(store.path).data.compute() == 2).all()


def test_extra_image_and_shared_store_graph(store: io.Mosaic) -> None:
    probs = np.random.default_rng(4).random((4, *store.image.shape), dtype=np.float32)
    io.write_extra_image(store.path, "probs", da.from_array(probs, chunks=(4, 128, 128)),
                         channel_names=CLASSES, dtype=np.float16)
    got = io.open_extra_image(store.path, "probs")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.compute(), probs.astype(np.float16))
    assert io.open_extra_image(store.path, "probs", level=1).shape == (4, 150, 205)
    g = zarr.open_group(store.path / "probs", mode="r")
    assert g["0"].metadata.dimension_names == ("c", "y", "x")
    assert g.attrs["semdask"]["channels"] == CLASSES
    assert g.attrs["semdask"]["pixel_size_um"] == 0.05  # inherited from the mosaic
    Image.from_zarr(g)
    # begin_* + one store_blocks graph + finish_group (how segment writes several outputs)
    p = da.from_array(probs, chunks=(4, 64, 64))
    lab_t = io.begin_labels(store.path, "pred", shape=store.image.shape, classes=CLASSES,
                            chunk=64)
    conf_t = io.begin_extra_image(store.path, "confidence", shape=store.image.shape,
                                  dtype=np.float16, chunk=64)
    with pytest.raises(IncompleteOutputError):
        io.open_labels(store.path, "pred")
    delayed = sarr.store_blocks([p.argmax(0).astype(np.uint8), p.max(0).astype(np.float16)],
                              [lab_t, conf_t], compute=False)
    delayed.compute()
    sarr.finish_group(store.path, "labels/pred")
    sarr.finish_group(store.path, "confidence")
    np.testing.assert_array_equal(io.open_labels(store.path, "pred").data, probs.argmax(0))
    assert io.open_extra_image(store.path, "confidence", level=1).shape == (150, 205)


def test_store_blocks_rejects_misaligned_chunks(tmp_path: Path) -> None:
    g = zarr.create_group(tmp_path / "s.zarr", zarr_format=3)
    arr = sarr.create_array(g, "x", shape=(100, 100), dtype="u1", shard=(32, 32),
                          dimension_names=("y", "x"))
    assert arr.shards == (32, 32)
    x = da.zeros((100, 100), dtype="u1", chunks=(40, 32))
    with pytest.raises(StoreError, match="rechunk"):
        sarr.store_blocks([x], [arr])
    with pytest.raises(StoreError, match="shape"):
        sarr.store_blocks([da.zeros((10, 10), dtype="u1")], [arr])
    ok = da.ones((100, 100), dtype="u1", chunks=(64, 96))  # multiples of the shard are fine
    sarr.store_blocks([ok], [arr])
    assert (arr[:] == 1).all()
    sarr.store_blocks([sarr.align_to(x + 2, arr)], [arr])
    assert (arr[:] == 2).all()


def test_incomplete_outputs_raise(store: io.Mosaic) -> None:
    lab = np.zeros(store.image.shape, np.uint8)
    io.write_labels(store.path, lab, classes=CLASSES)
    io.write_extra_image(store.path, "confidence", np.zeros(store.image.shape, np.float16))
    sarr.set_complete(store.path, "labels/phases", False)
    sarr.set_complete(store.path, "confidence", False)
    with pytest.raises(IncompleteOutputError, match="re-run"):
        io.open_labels(store.path)
    with pytest.raises(IncompleteOutputError, match="re-run"):
        io.open_extra_image(store.path, "confidence")
    sarr.set_complete(store.path, "", False)
    with pytest.raises(IncompleteOutputError):
        io.open_mosaic(store.path)
    assert sarr.read_attrs(store.path)["semdask"]["complete"] is False


def test_read_update_attrs(store: io.Mosaic) -> None:
    sarr.update_attrs(store.path, "", {"normalisation": {"low": np.float32(1.5)}})
    sem = sarr.read_attrs(store.path)["semdask"]
    assert sem["normalisation"] == {"low": 1.5}
    assert sem["complete"] is True
    sarr.update_attrs(store.path, "", {"note": "hi"}, key=None)
    assert sarr.read_attrs(store.path)["note"] == "hi"
    with pytest.raises(StoreError):
        sarr.read_attrs(store.path, "nope")


def test_missing_labels_message(store: io.Mosaic) -> None:
    with pytest.raises(StoreError, match="segment"):
        io.open_labels(store.path, "phases")


def test_existing_store_not_clobbered(store: io.Mosaic) -> None:
    a = np.zeros(store.image.shape, np.uint8)
    with pytest.raises(UnsafePathError, match="overwrite"):
        io.write_image(store.path, a, pixel_size_um=1.0)
    assert io.open_mosaic(store.path).image.compute().any()  # untouched
    m = io.write_image(store.path, a, pixel_size_um=1.0, overwrite=True)
    assert not m.image.compute().any()


def test_validate_output_path_safety(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "precious.txt").write_text("keep")
    with pytest.raises(UnsafePathError, match="not a Zarr store"):
        validate_output_path(plain, overwrite=True)
    assert (plain / "precious.txt").exists()
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UnsafePathError, match="file"):
        validate_output_path(f, overwrite=True)
    inp = tmp_path / "in.ome.zarr"
    inp.mkdir()
    with pytest.raises(UnsafePathError, match="input"):
        validate_output_path(inp / "out.zarr", overwrite=False, input_path=inp)
    with pytest.raises(UnsafePathError, match="input"):
        validate_output_path(inp, overwrite=True, input_path=inp)
    link = tmp_path / "link.zarr"
    link.symlink_to(inp)
    with pytest.raises(UnsafePathError, match="symlink"):
        validate_output_path(link, overwrite=True)
    new = validate_output_path(tmp_path / "a" / "b" / "c.zarr", overwrite=False)
    assert new.parent.is_dir()
    assert not new.exists()
    with pytest.raises(UnsafePathError, match="parent"):
        validate_output_path(f / "sub.zarr", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert validate_output_path(empty, overwrite=False) == empty.resolve()


def test_validate_input_path(tmp_path: Path) -> None:
    f = tmp_path / "a.tif"
    f.write_bytes(b"II*\x00")
    assert validate_input_path(f, kind="file") == f.resolve()
    with pytest.raises(UnsafePathError, match="directory"):
        validate_input_path(f, kind="dir")
    with pytest.raises(UnsafePathError, match="a file"):
        validate_input_path(tmp_path, kind="file")
    link = tmp_path / "l.tif"
    link.symlink_to(f)
    assert validate_input_path(link) == f.resolve()
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "gone")
    with pytest.raises(UnsafePathError, match="broken symlink"):
        validate_input_path(broken)


def test_open_mosaic_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="nothing there"):
        io.open_mosaic(tmp_path / "missing.ome.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="semdask convert"):
        io.open_mosaic(tmp_path / "plain")
    tif = tmp_path / "img.tif"
    tif.write_bytes(b"II*\x00")
    with pytest.raises(StoreError, match="TIFF") as err:
        io.open_mosaic(tif)
    assert f"semdask convert {tif}" in str(err.value)
    zarr.create_group(tmp_path / "g.zarr", zarr_format=3)
    with pytest.raises(StoreError, match="multiscales"):
        io.open_mosaic(tmp_path / "g.zarr")
    zarr.create_group(tmp_path / "v2.zarr", zarr_format=2)
    with pytest.raises(StoreError, match=r"0\.4"):
        io.open_mosaic(tmp_path / "v2.zarr")


def test_export_ngff04_validates(store: io.Mosaic, tmp_path: Path) -> None:
    lab = np.random.default_rng(5).integers(0, 4, store.image.shape).astype(np.uint8)
    io.write_labels(store.path, lab, classes=CLASSES, colours=COLOURS)
    dst = export_ngff04(store.path, tmp_path / "out.ngff04.zarr", chunk=128)
    assert (dst / ".zgroup").is_file()
    assert (dst / "0" / "0" / "0").is_file()  # "/" dimension separator
    root = zarr.open_group(dst, mode="r", zarr_format=2)
    img = Image04.from_zarr(root)
    assert img.attributes.multiscales[0].version == "0.4"
    assert Labels04.from_zarr(root["labels"]).attributes.labels == ["phases"]
    il = ImageLabel04.from_zarr(root["labels/phases"]).attributes.image_label
    assert [c.rgba for c in il.colors] == COLOURS  # type: ignore[union-attr]
    np.testing.assert_array_equal(root["0"][:], store.image.compute())
    np.testing.assert_array_equal(root["labels/phases/0"][:], lab)
    assert root["0"].chunks == (128, 128)
    assert root.attrs["semdask"]["complete"] is True
    with pytest.raises(UnsafePathError):
        export_ngff04(store.path, store.path / "inside.zarr")


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(1, 120), w=st.integers(1, 120), seed=st.integers(0, 1000),
    data=st.data(),
)
def test_random_chunkings_round_trip(tmp_path: Path, h: int, w: int, seed: int,
                                     data: st.DataObject) -> None:
    def splits(n: int) -> tuple[int, ...]:
        cuts = sorted(data.draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=5)))
        edges = [0, *[c for c in cuts if 0 < c < n], n]
        return tuple(b - a for a, b in itertools.pairwise(edges))

    a = np.random.default_rng(seed).integers(0, 65535, (h, w), dtype=np.uint16)
    x = da.from_array(a, chunks=(splits(h), splits(w)))
    path = tmp_path / f"r{seed}-{h}-{w}.ome.zarr"
    m = io.write_image(path, x, pixel_size_um=1.0, levels=2, overwrite=True)
    np.testing.assert_array_equal(m.image.compute(), a)
    ref = io.write_image(path.with_suffix(".ref"), da.from_array(a), pixel_size_um=1.0,
                         levels=2, overwrite=True)
    np.testing.assert_array_equal(m.level(1).compute(), ref.level(1).compute())


def test_write_synthetic(tmp_path: Path) -> None:
    from semdask.synthetic.sem import PHASES, synthetic_mosaic

    s = synthetic_mosaic((200, 260), seed=1, chunk=64)
    m = io.write_synthetic(tmp_path / "s.ome.zarr", s)
    np.testing.assert_array_equal(m.image.compute(), s.image.compute())
    truth = io.open_labels(m.path, "truth")
    assert truth.classes == list(PHASES)
    np.testing.assert_array_equal(truth.data.compute(), s.truth.compute())
    eds = io.open_extra_image(m.path, "eds")
    np.testing.assert_array_equal(eds.compute(), s.eds.compute())
    assert sarr.read_attrs(m.path, "eds")["semdask"]["pixel_size_um"] == 4 * s.pixel_size_um
    Image.from_zarr(zarr.open_group(m.path, mode="r"))
