"""What makes the rasters read well in a GIS: band descriptions, a QGIS style for the labels,
and a georeferenced quicklook. Pure functions of small inputs; each writes one small file.

Labels are uint32, and GDAL's GeoTIFF keeps a colour table only for 8- and 16-bit bands, so the
colours live in a QGIS style beside the raster (``labels.qml``: QGIS applies a ``.qml`` of the
same name when it opens ``labels.tif`` or ``labels.vrt``). Up to :data:`PALETTE_MAX_IDS` ids
every id gets its own colour (QGIS "Paletted/Unique values", about 60 bytes per id, so at most
~4 MB); a larger group (a state has about a million masks) gets a pseudocolour style of
:data:`RANGE_CLASSES` colours over id ranges (~15 kB), where neighbouring masks may share a colour.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from xml.sax.saxutils import quoteattr

from affine import Affine
from pyproj import CRS

from raysam.items import BAND_ALIASES

PALETTE_MAX_IDS = 65_535  # ids listed one by one in labels.qml (~60 bytes each)
RANGE_CLASSES = 255  # colour classes over id ranges above PALETTE_MAX_IDS
GOLDEN = 0.618033988749895  # hue step: consecutive ids get far-apart hues

LABEL_BAND_DESCRIPTION = "mask id (0 = no mask); label_id in masks.parquet"
QUICKLOOK_BAND_DESCRIPTIONS = (
    "red (B04, 2-98 % stretch; mask outlines yellow)",
    "green (B03, 2-98 % stretch; mask outlines yellow)",
    "blue (B02, 2-98 % stretch; mask outlines yellow)",
)
_COMMON_NAMES = {band: name for name, band in BAND_ALIASES.items() if len(name) > 1}


def s2_band_description(band_id: str) -> str:
    """The band description of an s2 raster: ``B04 red: L2A digital number; reflectance = DN * scale + offset``."""
    if band_id == "SCL":
        return "SCL: L2A scene classification (categorical)"
    common = _COMMON_NAMES.get(band_id)
    name = f"{band_id} {common}" if common else band_id
    return f"{name}: L2A digital number; reflectance = DN * scale + offset"


def label_colour(label_id: int) -> str:
    """A bright colour for an id, as ``#rrggbb``; consecutive ids get clearly different hues."""
    hue = (label_id * GOLDEN) % 1.0
    saturation = (0.55, 0.75, 0.95)[label_id % 3]
    value = (0.95, 0.8)[(label_id // 3) % 2]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def label_style_qml(max_label_id: int) -> str:
    """The QGIS style (``labels.qml``) of a label raster with ids 1..``max_label_id`` (0: no masks)."""
    renderer = _palette(max_label_id) if max_label_id <= PALETTE_MAX_IDS else _ranges(max_label_id)
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.34.0" styleCategories="Symbology">\n <pipe>\n'
        f"{renderer}"
        '  <brightnesscontrast brightness="0" contrast="0" gamma="1"/>\n'
        '  <huesaturation colorizeOn="0" saturation="0" grayscaleMode="0" invertColors="0"/>\n'
        '  <rasterresampler maxOversampling="2"/>\n'
        " </pipe>\n <blendMode>0</blendMode>\n</qgis>\n"
    )


def _palette(max_label_id: int) -> str:
    """QGIS "Paletted/Unique values": one colour per id; 0 (no mask) is not listed, so not drawn."""
    entries = "".join(f'    <paletteEntry value="{i}" color="{label_colour(i)}" alpha="255" label="{i}"/>\n'
                      for i in range(1, max_label_id + 1))
    return ('  <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
            "   <rasterTransparency/>\n   <colorPalette>\n"
            f"{entries}   </colorPalette>\n  </rasterrenderer>\n")


def _ranges(max_label_id: int) -> str:
    """QGIS "Singleband pseudocolor", discrete: :data:`RANGE_CLASSES` colours over equal id ranges."""
    step = -(-max_label_id // RANGE_CLASSES)
    items = "".join(
        f'      <item value="{min(k * step, max_label_id)}" color="{label_colour(k)}" alpha="255" '
        f'label={quoteattr(f"ids {(k - 1) * step + 1}-{min(k * step, max_label_id)}")}/>\n'
        for k in range(1, RANGE_CLASSES + 1))
    return (f'  <rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" alphaBand="-1" '
            f'classificationMin="1" classificationMax="{max_label_id}">\n'
            "   <rasterTransparency/>\n   <rastershader>\n"
            f'    <colorrampshader colorRampType="DISCRETE" classificationMode="1" clip="1" '
            f'minimumValue="1" maximumValue="{max_label_id}">\n'
            f"{items}    </colorrampshader>\n   </rastershader>\n  </rasterrenderer>\n")


def georeferencing(transform: Affine, crs: str,
                   band_descriptions: Sequence[str] = QUICKLOOK_BAND_DESCRIPTIONS) -> tuple[str, str]:
    """What georeferences a PNG: its world file (``.pgw``) and a GDAL ``.png.aux.xml`` (CRS, band names).

    GDAL (so QGIS and rasterio) takes the pixel grid from the world file and the CRS from the
    ``.aux.xml``; tools that only read world files still place the image.

    Args:
        transform: the image's affine transform (pixel corner -> ``crs``), as rasterio's.
        crs: its CRS (``EPSG:32615``).
        band_descriptions: one per band.

    Returns:
        The texts of the world file and of the ``.aux.xml``.
    """
    t = transform
    centre_x, centre_y = t.c + (t.a + t.b) / 2, t.f + (t.d + t.e) / 2  # a world file names the upper-left pixel's centre
    world = "".join(f"{v!r}\n" for v in (t.a, t.d, t.b, t.e, centre_x, centre_y))
    bands = "".join(f'  <PAMRasterBand band="{i}">\n    <Description>{_xml_text(d)}</Description>\n'
                    "  </PAMRasterBand>\n" for i, d in enumerate(band_descriptions, start=1))
    aux = (f'<PAMDataset>\n  <SRS dataAxisToSRSAxisMapping="1,2">{_xml_text(CRS.from_user_input(crs).to_wkt())}'
           f"</SRS>\n{bands}</PAMDataset>\n")
    return world, aux


def quicklook_transform(grid_transform: Sequence[float], grid_shape: tuple[int, int],
                        image_shape: tuple[int, int]) -> Affine:
    """The affine of an image that shows the whole grid (rows, cols) at ``image_shape`` (rows, cols)."""
    a, b, c, d, e, f = grid_transform[:6]
    sx, sy = grid_shape[1] / image_shape[1], grid_shape[0] / image_shape[0]
    return Affine(a * sx, b * sy, c, d * sx, e * sy, f)


def _xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
