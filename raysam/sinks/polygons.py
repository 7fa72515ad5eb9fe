"""Mask crops to polygons: vectorise on the target grid, measure in metres, reproject to EPSG:4326."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio import features


def mask_to_polygon_utm(mask: np.ndarray, box_xyxy: Sequence[int], grid_transform: Affine) -> shapely.Geometry:
    """Vectorise a boolean mask crop whose top-left pixel is (box x0, y0) on the target grid.

    Args:
        mask: bool array (h, w), the mask cropped to its inclusive box.
        box_xyxy: inclusive [x0, y0, x1, y1] in target-grid pixels.
        grid_transform: the target grid's affine transform (pixel -> CRS metres).

    Returns:
        A valid Polygon or MultiPolygon in the grid CRS (pixel-edge exact, holes kept).
    """
    x0, y0 = int(box_xyxy[0]), int(box_xyxy[1])
    crop_transform = grid_transform @ Affine.translation(x0, y0)
    parts = [
        shapely.geometry.shape(geom)
        for geom, value in features.shapes(mask.astype(np.uint8), mask=mask, transform=crop_transform, connectivity=4)
        if value == 1
    ]
    geom = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    return geom if geom.is_valid else shapely.make_valid(geom)


class ToWgs84:
    """Reprojects geometries from one grid CRS to EPSG:4326 (x = lon, y = lat)."""

    def __init__(self, crs_epsg: int):
        self._transformer = Transformer.from_crs(crs_epsg, 4326, always_xy=True)

    def __call__(self, geom: shapely.Geometry) -> shapely.Geometry:
        return shapely.transform(geom, lambda xy: np.column_stack(self._transformer.transform(xy[:, 0], xy[:, 1])))


def polygon_columns(box_xyxy: np.ndarray, mask_bits: list, grid_transform: Affine, grid_epsg: int) -> dict[str, np.ndarray]:
    """Polygons of mask crops and their measures, for the polygon outputs.

    Args:
        box_xyxy: int (n, 4) inclusive boxes in target-grid pixels.
        mask_bits: n packed crops (:func:`raysam.records.pack_crop`).
        grid_transform: the target grid's affine.
        grid_epsg: the target grid's (UTM) CRS, where area and perimeter are measured.

    Returns:
        ``geometry`` (EPSG:4326 WKB, object), ``area_m2``, ``perimeter_m`` and the lon/lat bounds
        ``bbox_xmin``, ``bbox_ymin``, ``bbox_xmax``, ``bbox_ymax`` (float64), one per mask.
    """
    from raysam.records import unpack_crop

    n = len(mask_bits)
    geoms_wkb = np.empty(n, object)
    area_m2, perimeter_m, bounds = np.zeros(n), np.zeros(n), np.zeros((n, 4))
    to_wgs84 = ToWgs84(grid_epsg) if n else None
    for k in range(n):
        box = box_xyxy[k]
        utm = mask_to_polygon_utm(unpack_crop(mask_bits[k], box), box, grid_transform)
        area_m2[k], perimeter_m[k] = utm.area, utm.length
        lonlat = to_wgs84(utm)
        geoms_wkb[k] = shapely.to_wkb(lonlat)
        bounds[k] = lonlat.bounds
    return {"geometry": geoms_wkb, "area_m2": area_m2, "perimeter_m": perimeter_m,
            "bbox_xmin": bounds[:, 0], "bbox_ymin": bounds[:, 1], "bbox_xmax": bounds[:, 2], "bbox_ymax": bounds[:, 3]}
