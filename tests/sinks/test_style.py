"""GIS-friendly rasters: the labels' QGIS style, band descriptions, a georeferenced quicklook."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image

from raysam.sinks.style import (
    PALETTE_MAX_IDS, QUICKLOOK_BAND_DESCRIPTIONS, RANGE_CLASSES, georeferencing, label_colour, label_style_qml,
    quicklook_transform, s2_band_description)


def _style(tmp_path, max_label_id: int):
    path = tmp_path / "labels.qml"  # QGIS applies it to labels.tif and labels.vrt
    path.write_text(label_style_qml(max_label_id))
    return path


def test_label_style_gives_each_id_its_own_colour_and_neighbours_differ(tmp_path):
    path = _style(tmp_path, 5000)
    renderer = ET.parse(path).getroot().find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [int(e.get("value")) for e in entries] == list(range(1, 5001))  # 0 (no mask) is not drawn
    colours = [e.get("color") for e in entries]
    assert all(len(c) == 7 and c.startswith("#") for c in colours)
    assert all(a != b for a, b in zip(colours, colours[1:]))  # consecutive ids: different colours
    assert len(set(colours)) > 4000  # and hardly any repeats at all
    assert path.stat().st_size < 5000 * 80


def test_label_style_of_a_state_sized_group_stays_small(tmp_path):
    path = _style(tmp_path, 1_000_000)
    assert path.stat().st_size < 30_000
    shader = ET.parse(path).getroot().find("pipe/rasterrenderer/rastershader/colorrampshader")
    assert shader.get("colorRampType") == "DISCRETE"
    values = [int(i.get("value")) for i in shader.findall("item")]
    assert len(values) == RANGE_CLASSES and values[-1] == 1_000_000 and values == sorted(values)
    assert PALETTE_MAX_IDS < 1_000_000


def test_label_colours_are_deterministic():
    assert label_colour(1) == label_colour(1) != label_colour(2)
    assert label_colour(PALETTE_MAX_IDS).startswith("#")


def test_band_descriptions_name_the_band_and_how_to_read_it():
    assert s2_band_description("B04") == "B04 red: L2A digital number; reflectance = DN * scale + offset"
    assert s2_band_description("B8A") == "B8A nir08: L2A digital number; reflectance = DN * scale + offset"
    assert s2_band_description("SCL") == "SCL: L2A scene classification (categorical)"


def test_quicklook_transform_covers_the_grid_at_the_image_size():
    grid = (10.0, 0.0, 500_000.0, 0.0, -10.0, 4_600_000.0)
    t = quicklook_transform(grid, (800, 1000), (200, 250))  # a 4x smaller image
    assert tuple(t)[:6] == (40.0, 0.0, 500_000.0, 0.0, -40.0, 4_600_000.0)
    assert (t.c + 250 * t.a, t.f + 200 * t.e) == (510_000.0, 4_592_000.0)  # same lower-right corner


def test_world_file_and_aux_xml_georeference_a_png_for_gdal(tmp_path):
    png = tmp_path / "quicklook.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(png)
    transform = Affine(40.0, 0.0, 500_000.0, 0.0, -40.0, 4_600_000.0)
    world_text, aux_text = georeferencing(transform, "EPSG:32615")
    world, aux = tmp_path / "quicklook.pgw", tmp_path / "quicklook.png.aux.xml"
    world.write_text(world_text)
    aux.write_text(aux_text)
    # A world file holds A, D, B, E and the centre of the upper-left pixel.
    assert [float(v) for v in world.read_text().split()] == [40.0, 0.0, 0.0, -40.0, 500_020.0, 4_599_980.0]
    with rasterio.open(png) as src:
        assert src.crs.to_epsg() == 32615
        assert src.transform == transform
        assert src.xy(19, 29) == pytest.approx((500_000 + 29.5 * 40, 4_600_000 - 19.5 * 40))
        assert src.descriptions == QUICKLOOK_BAND_DESCRIPTIONS
