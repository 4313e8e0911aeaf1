"""Attention heatmaps: score normalisation, painting, PNG, CSV/GeoJSON exports, thumbnails, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from wsi_ncmi.evaluation.heatmap import (
    HeatmapError,
    attention_scores,
    normalize_scores,
    overlay_heatmap,
    read_thumbnail,
    render_heatmap,
    tile_boxes_thumb,
    write_tile_scores,
)

# three 100-px tiles (level 0) on a 400x300 level-0 slide, thumbnail downsample 4 -> 100x75 thumbnail
COORDS = np.array([[0, 0], [200, 100], [300, 200]], np.int64)
SCORES = np.array([0.2, 0.7, 0.1])
PS = 100
DS = 4.0


def _thumb() -> np.ndarray:
    return np.full((75, 100, 3), 128, np.uint8)


def _top_colour(cmap: str = "jet", v: float = 1.0) -> np.ndarray:
    return np.rint(np.asarray(matplotlib.colormaps[cmap](v)[:3]) * 255).astype(int)


def test_normalize_rank_minmax_none() -> None:
    s = np.array([3.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(normalize_scores(s, "rank"), [1.0, 0.0, 0.5, 0.5])  # ties share a rank
    np.testing.assert_allclose(normalize_scores(s, "minmax"), [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(normalize_scores(np.array([1.0, 100.0, 0.0]), "rank"), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(normalize_scores(np.array([-1.0, 0.3, 2.0]), "none"), [0.0, 0.3, 1.0])
    np.testing.assert_allclose(normalize_scores(np.array([5.0, 5.0]), "minmax"), [1.0, 1.0])
    with pytest.raises(HeatmapError, match="unknown method"):
        normalize_scores(s, "zscore")
    with pytest.raises(HeatmapError, match="non-finite"):
        normalize_scores(np.array([1.0, np.nan]), "rank")


def test_tile_boxes_in_thumbnail_pixels() -> None:
    boxes = tile_boxes_thumb(COORDS, PS, DS, (75, 100))
    np.testing.assert_array_equal(boxes[1], [50, 25, 75, 50])
    np.testing.assert_array_equal(boxes[2], [75, 50, 100, 75])  # clipped to the thumbnail


def test_overlay_paints_top_score_with_top_colour() -> None:
    thumb = _thumb()
    out = overlay_heatmap(thumb, DS, COORDS, PS, SCORES, cmap="jet", alpha=1.0)
    assert out.shape == thumb.shape and out.dtype == np.uint8
    # tile 1 (highest score) covers thumbnail x 50..75, y 25..50
    assert np.abs(out[30, 60].astype(int) - _top_colour()).max() <= 1
    assert np.abs(out[60, 80].astype(int) - _top_colour(v=0.0)).max() <= 1  # lowest score: bottom colour
    np.testing.assert_array_equal(out[70, 10], thumb[70, 10])  # no tile: unchanged
    half = overlay_heatmap(thumb, DS, COORDS, PS, SCORES, alpha=0.5)
    expect = np.rint(0.5 * 128 + 0.5 * matplotlib.colormaps["jet"](1.0)[0] * 255)
    assert abs(int(half[30, 60, 0]) - expect) <= 1


def test_overlay_overlap_keeps_higher_score_on_top() -> None:
    coords = np.array([[0, 0], [40, 40]])
    for scores in (np.array([1.0, 0.0]), np.array([0.0, 1.0])):
        out = overlay_heatmap(_thumb(), DS, coords, PS, scores, alpha=1.0)
        assert np.abs(out[15, 15].astype(int) - _top_colour()).max() <= 1  # overlap region


def test_overlay_rejects_bad_input() -> None:
    with pytest.raises(HeatmapError, match="coords but"):
        overlay_heatmap(_thumb(), DS, COORDS, PS, SCORES[:2])
    with pytest.raises(HeatmapError, match="uint8"):
        overlay_heatmap(_thumb().astype(np.float32), DS, COORDS, PS, SCORES)
    with pytest.raises(HeatmapError, match="colormap"):
        overlay_heatmap(_thumb(), DS, COORDS, PS, SCORES, cmap="no-such-map")


def test_render_heatmap_writes_png(tmp_path: Path) -> None:
    import cv2

    out = tmp_path / "sub" / "hm.png"
    blended = render_heatmap(_thumb(), DS, COORDS, PS, SCORES, out, title="slide A", normalize="minmax")
    np.testing.assert_array_equal(blended, overlay_heatmap(_thumb(), DS, COORDS, PS, SCORES, normalize="minmax"))
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] >= 75 and img.shape[1] > 100  # thumbnail + colour bar
    assert not list(tmp_path.rglob("*.tmp"))
    # the top colour appears in the PNG (painted tile or colour bar)
    rgb = img[..., ::-1].reshape(-1, 3).astype(int)
    assert (np.abs(rgb - _top_colour()).max(1) <= 3).any()


def test_write_tile_scores_csv_and_geojson(tmp_path: Path) -> None:
    csv_p, gj_p = tmp_path / "t.csv", tmp_path / "t.geojson"
    write_tile_scores(csv_p, gj_p, COORDS, PS, SCORES, "slideA")
    with open(csv_p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "x", "y", "width", "height", "score"]
    assert [(r["slide_id"], int(r["x"]), int(r["y"]), int(r["width"]), int(r["height"])) for r in rows] == [
        ("slideA", 0, 0, 100, 100), ("slideA", 200, 100, 100, 100), ("slideA", 300, 200, 100, 100)]
    np.testing.assert_allclose([float(r["score"]) for r in rows], SCORES)

    doc = json.loads(gj_p.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    f1 = doc["features"][1]
    assert f1["geometry"]["type"] == "Polygon"
    ring = f1["geometry"]["coordinates"][0]
    assert ring == [[200, 100], [300, 100], [300, 200], [200, 200], [200, 100]]  # closed, level-0 pixels
    props = f1["properties"]
    assert props["objectType"] == "tile"
    assert props["measurements"]["score"] == pytest.approx(0.7)
    assert props["measurements"]["score_normalized"] == pytest.approx(1.0)
    assert props["classification"]["name"] == "attention 10"
    assert doc["features"][2]["properties"]["classification"]["name"] == "attention 01"
    assert all(len(f["properties"]["classification"]["color"]) == 3 for f in doc["features"])

    only_csv = tmp_path / "only.csv"
    write_tile_scores(only_csv, None, COORDS, PS, SCORES, "s")
    assert only_csv.exists() and not (tmp_path / "only.geojson").exists()
    with pytest.raises(HeatmapError, match="coords but"):
        write_tile_scores(only_csv, None, COORDS, PS, SCORES[:1], "s")


class _ToyAttention:
    """Stands in for an aggregator: attention = softmax of the first feature."""

    training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def __call__(self, x, mask=None):
        import torch

        class Out:
            attention = torch.softmax(x[..., 0], dim=1)  # [B, N]

        return Out()


def test_attention_scores_with_toy_and_real_model() -> None:
    import torch

    feats = np.zeros((5, 3), np.float32)
    feats[3, 0] = 4.0
    s = attention_scores(_ToyAttention(), feats)
    assert s.shape == (5,) and int(np.argmax(s)) == 3 and s.sum() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(HeatmapError, match=r"\[N, D\]"):
        attention_scores(_ToyAttention(), np.zeros((0, 3), np.float32))

    models = pytest.importorskip("wsi_ncmi.models")
    torch.manual_seed(0)
    model = models.create_model("abmil", in_dim=8, num_classes=2)
    model.train()
    x = torch.randn(7, 8)
    s = attention_scores(model, x)
    assert model.training  # mode restored
    assert s.shape == (7,) and s.sum() == pytest.approx(1.0, abs=1e-5)
    model.eval()
    with torch.no_grad():
        ref = model(x[None], None).attention[0].numpy()
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_svs(tmp_path_factory) -> Path:
    from preprocessing.synthetic import write_svs

    d = tmp_path_factory.mktemp("svs")
    rgb = np.full((512, 768, 3), 235, np.uint8)
    rgb[100:300, 200:500] = (150, 60, 140)
    write_svs(d / "a.svs", rgb, mpp=0.5, magnification=20, downsamples=(1, 4))
    write_svs(d / "nompp.svs", rgb, mpp=None, downsamples=(1, 4))
    return d


def test_read_thumbnail_modes(tiny_svs: Path) -> None:
    rgb, ds = read_thumbnail(tiny_svs / "a.svs", max_side=192)
    assert rgb.dtype == np.uint8 and max(rgb.shape[:2]) == 192 and ds == pytest.approx(4.0)
    rgb, ds = read_thumbnail(tiny_svs / "a.svs", level=1)
    assert rgb.shape == (128, 192, 3) and ds == pytest.approx(4.0)
    rgb, ds = read_thumbnail(tiny_svs / "a.svs", mpp=1.0)  # 2x coarser than the slide's 0.5
    assert rgb.shape == (256, 384, 3) and ds == pytest.approx(2.0)
    assert abs(int(rgb[100, 175, 0]) - 150) < 25  # tissue at level-0 (350, 200)
    with pytest.raises(HeatmapError, match="no mpp"):
        read_thumbnail(tiny_svs / "nompp.svs", mpp=1.0)
    with pytest.raises(HeatmapError, match="levels"):
        read_thumbnail(tiny_svs / "a.svs", level=5)
    bad = tiny_svs / "bad.svs"
    bad.write_bytes(b"not a slide")
    with pytest.raises(HeatmapError, match="cannot open"):
        read_thumbnail(bad)


def test_slide_heatmap_from_bag_and_slide(tiny_svs: Path, tmp_path: Path) -> None:
    """A bag whose first feature marks the tissue tiles: a toy model's attention peaks there, and the
    PNG / CSV / GeoJSON for the slide are written with the bag's level-0 tile geometry."""
    from wsi_ncmi.data.bags import read_bag, write_bag
    from wsi_ncmi.evaluation.heatmap import bag_patch_size_level0, slide_heatmap

    coords = np.array([[x, y] for y in range(0, 512, 128) for x in range(0, 768, 128)], np.int64)  # [24, 2]
    feats = np.zeros((len(coords), 4), np.float32)
    hot = 1 * 6 + 2  # tile at level-0 (256, 128), inside the painted tissue
    feats[hot, 0] = 5.0
    bag = write_bag(tmp_path / "a.h5", feats, coords, attrs={"slide_id": "a"},
                    coords_attrs={"patch_size": 64, "patch_level": 0, "patch_size_level0": 128})
    assert bag_patch_size_level0(read_bag(bag)) == 128.0
    res = slide_heatmap(_ToyAttention(), bag, tiny_svs / "a.svs", tmp_path / "a.png", level=1,
                        csv_path=tmp_path / "a.csv", geojson_path=tmp_path / "a.geojson")
    assert res.slide_id == "a" and int(np.argmax(res.scores)) == hot
    assert res.png.is_file() and res.csv.is_file() and res.geojson.is_file()
    doc = json.loads(res.geojson.read_text())
    top = max(doc["features"], key=lambda f: f["properties"]["measurements"]["score"])
    assert top["geometry"]["coordinates"][0][0] == [256, 128]
    assert top["geometry"]["coordinates"][0][2] == [384, 256]


def test_slide_heatmap_rejects_dim_mismatch(tiny_svs: Path, tmp_path: Path) -> None:
    from wsi_ncmi.data.bags import write_bag
    from wsi_ncmi.evaluation.heatmap import slide_heatmap

    models = pytest.importorskip("wsi_ncmi.models")
    bag = write_bag(tmp_path / "b.h5", np.zeros((3, 5), np.float32), np.zeros((3, 2), np.int64),
                    coords_attrs={"patch_size_level0": 64})
    with pytest.raises(HeatmapError, match="dim 5 but the model expects 8"):
        slide_heatmap(models.create_model("abmil", in_dim=8, num_classes=2), bag, tiny_svs / "a.svs",
                      tmp_path / "b.png")


def test_heatmap_cli_reports_missing_files(tmp_path: Path, capsys) -> None:
    from wsi_ncmi.commands.heatmap_cli import main

    rc = main(["--ckpt", str(tmp_path / "none.ckpt"), "--slide", "x.svs", "--bag", "x.h5", "--out", "o.png"])
    assert rc == 2 and "--ckpt" in capsys.readouterr().err
