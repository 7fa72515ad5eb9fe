"""Cross-chip merge on synthetic scenes with known objects (raysam.merge).

A "perfect chip segmenter" cuts known objects to each chip window (full masks where the chip
holds the object, border-cut partials where it does not), adds chip-local sloppy duplicates and
noise blobs; the merge must return every object once, whole. A dense O(n^2) reference merge
written here from the rules (not from the module) checks the fast one on random data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pytest

from raysam.errors import ConfigError, DataError
from raysam.merge import (
    MergeParams,
    cell_keys,
    connected_components,
    group_keys,
    mask_intersections_px,
    merge_cell,
    merge_grouped,
    merge_masks,
    owner_cells,
)
from raysam.records import RECORD_SCHEMA, MaskTable, pack_crop, to_mask_table, unpack_crop

# --------------------------------------------------------------------------- scene generator


@dataclass
class Scene:
    """A synthetic date group: chips, objects of known shape, and the records they yield."""

    chip_size: int
    step_px: int
    grid_hw_px: tuple[int, int]
    windows: list[tuple[tuple[int, int], tuple[int, int, int, int]]]
    objects: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (box_xyxy, mask)
    noise: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    def table(self) -> MaskTable:
        """All records as one MaskTable (uids are the record positions)."""
        r = self.records
        return MaskTable(
            mask_uid=np.arange(len(r)),
            chip_id=[x["chip_id"] for x in r],
            chip_window_px=[x["window"] for x in r],
            box_xyxy=[x["box"] for x in r],
            predicted_iou=[x["piou"] for x in r],
            stability_score=[0.95] * len(r),
            area=[int(x["mask"].sum()) for x in r],
            mask_bits=[np.packbits(x["mask"], axis=1) for x in r],
        )

    def sources(self) -> list[str]:
        return [x["source"] for x in self.records]


def make_windows(n_chips: tuple[int, int], chip_size: int, step_px: int) -> list:
    return [((r, c), (c * step_px, r * step_px, chip_size, chip_size))
            for r in range(n_chips[0]) for c in range(n_chips[1])]


def random_shape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A rectangle, ellipse or thick L filling its (h, w) box."""
    kind = rng.integers(3)
    if kind == 0:
        return np.ones((h, w), bool)
    if kind == 1:
        yy, xx = np.mgrid[0:h, 0:w]
        m = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0
        m[h // 2, :] = True  # touch all four box sides
        m[:, w // 2] = True
        return m
    m = np.ones((h, w), bool)
    m[: h // 2, w // 2 :] = False
    return m


def _try_place(rng, scene, occ, h, w, margin) -> tuple[int, int] | None:
    """Top-left of an (h, w) object strictly inside a random chip (not on an inner border)."""
    _, (cx, cy, cw, ch) = scene.windows[rng.integers(len(scene.windows))]
    gh, gw = scene.grid_hw_px
    lo_x, lo_y = cx + (0 if cx == 0 else 1), cy + (0 if cy == 0 else 1)
    hi_x = cx + cw - w - (0 if cx + cw >= gw else 1)
    hi_y = cy + ch - h - (0 if cy + ch >= gh else 1)
    if hi_x < lo_x or hi_y < lo_y:
        return None
    x, y = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
    if occ is not None and occ[max(y - margin, 0): y + h + margin, max(x - margin, 0): x + w + margin].any():
        return None
    return x, y


def place_objects(rng, scene, sizes, occ, margin=0, into=None, tries=40) -> None:
    """Place objects of the given sizes (disjoint when ``occ`` is given)."""
    into = scene.objects if into is None else into
    for size in sizes:
        h = int(size)
        w = max(2, int(size * rng.uniform(0.5, 1.0)))
        if rng.random() < 0.5:
            h, w = w, h
        for _ in range(tries):
            pos = _try_place(rng, scene, occ, h, w, margin)
            if pos is None:
                continue
            mask = random_shape(rng, h, w)
            if occ is not None:
                occ[pos[1]: pos[1] + h, pos[0]: pos[0] + w] |= mask
            into.append((np.array([pos[0], pos[1], pos[0] + w - 1, pos[1] + h - 1]), mask))
            break


def _clip(box, mask, window):
    """The object as seen by one chip: mask cut to the window, tight box; None if absent."""
    cx, cy, cw, ch = window
    x0, y0, x1, y1 = max(box[0], cx), max(box[1], cy), min(box[2], cx + cw - 1), min(box[3], cy + ch - 1)
    if x1 < x0 or y1 < y0:
        return None
    sub = mask[y0 - box[1]: y1 - box[1] + 1, x0 - box[0]: x1 - box[0] + 1]
    rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
    if rows.size == 0:
        return None
    sub = sub[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    return np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1], y0 + rows[-1]]), sub


def _dilate(box, mask, window):
    """4-neighbour dilation by one pixel, cut to the window."""
    m = np.pad(mask, 1)
    grown = m.copy()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    return _clip(box + np.array([-1, -1, 1, 1]), grown, window)


def _shift(box, mask, window, rng):
    """The same shape one pixel off, if it stays inside the window."""
    d = [(1, 0), (-1, 0), (0, 1), (0, -1)][rng.integers(4)]
    moved = box + np.array([d[0], d[1], d[0], d[1]])
    cx, cy, cw, ch = window
    if moved[0] < cx or moved[1] < cy or moved[2] >= cx + cw or moved[3] >= cy + ch:
        return None
    return moved, mask


def segment_chips(rng, scene, dup_fraction) -> None:
    """Each object as every chip sees it, sloppy duplicates of some whole ones, then noise."""
    wins = np.array([w for _, w in scene.windows])
    for k, (box, mask) in enumerate(scene.objects):
        for c in _chips_meeting(wins, box):
            chip_id, window = scene.windows[c]
            seen = _clip(box, mask, window)
            if seen is None:
                continue
            scene.records.append(dict(chip_id=chip_id, window=window, box=seen[0], mask=seen[1],
                                      piou=rng.uniform(0.9, 1.0), source=f"obj{k}"))
            if seen[1].shape == mask.shape and rng.random() < dup_fraction:
                dup = _dilate(box, mask, window) if rng.random() < 0.5 else _shift(box, mask, window, rng)
                if dup is not None:  # scored lower than any true mask, as SAM scores sloppy ones
                    scene.records.append(dict(chip_id=chip_id, window=window, box=dup[0], mask=dup[1],
                                              piou=rng.uniform(0.8, 0.89), source=f"dup{k}"))
    for k, (box, mask) in enumerate(scene.noise):  # seen by one chip only
        chip_id, window = next(scene.windows[c] for c in _chips_meeting(wins, box)
                               if _clip(box, mask, scene.windows[c][1])[1].shape == mask.shape)
        scene.records.append(dict(chip_id=chip_id, window=window, box=box, mask=mask,
                                  piou=rng.uniform(0.9, 1.0), source=f"noise{k}"))


def _chips_meeting(wins: np.ndarray, box: np.ndarray) -> np.ndarray:
    return np.flatnonzero((wins[:, 0] <= box[2]) & (wins[:, 0] + wins[:, 2] > box[0])
                          & (wins[:, 1] <= box[3]) & (wins[:, 1] + wins[:, 3] > box[1]))


def make_scene(seed: int, n_chips=(4, 4), chip_size=1024, overlap=0.5, n_objects=200,
               size_px=(12, 400), n_large=4, n_noise=20, dup_fraction=0.2, disjoint=True) -> Scene:
    """Objects of log-uniform sizes (plus a few larger than the chip overlap), segmented per chip."""
    rng = np.random.default_rng(seed)
    step = int(chip_size * (1 - overlap))
    grid_hw = (step * (n_chips[0] - 1) + chip_size, step * (n_chips[1] - 1) + chip_size)
    scene = Scene(chip_size, step, grid_hw, make_windows(n_chips, chip_size, step))
    occ = np.zeros(grid_hw, bool) if disjoint else None
    large = rng.uniform(chip_size - step + 8, chip_size * 0.7, n_large) if n_large else []
    sizes = np.exp(rng.uniform(np.log(size_px[0]), np.log(size_px[1]), n_objects - n_large))
    place_objects(rng, scene, sorted([*large, *sizes], reverse=True), occ)
    noise_occ = occ if occ is not None else np.zeros(grid_hw, bool)
    for box, mask in scene.objects:
        noise_occ[box[1]: box[3] + 1, box[0]: box[2] + 1] |= True
    place_objects(rng, scene, rng.integers(4, 10, n_noise), noise_occ, margin=3, into=scene.noise)
    segment_chips(rng, scene, dup_fraction)
    return scene


# --------------------------------------------------------------------------- dense helpers


def dense(table: MaskTable, i: int, hw: tuple[int, int]) -> np.ndarray:
    """Record i painted on an (H, W) canvas (independent of raysam's unpacking)."""
    x0, y0, x1, y1 = table.box_xyxy[i]
    out = np.zeros(hw, bool)
    crop = np.unpackbits(table.mask_bits[i], axis=1)[:, : x1 - x0 + 1].astype(bool)
    out[y0: y1 + 1, x0: x1 + 1] = crop
    return out


def pair_iou(table: MaskTable, a: int, b: int) -> float:
    """Mask IoU of two records, on a canvas over their union box."""
    bx = table.box_xyxy
    ox, oy = min(bx[a, 0], bx[b, 0]), min(bx[a, 1], bx[b, 1])
    hw = (max(bx[a, 3], bx[b, 3]) - oy + 1, max(bx[a, 2], bx[b, 2]) - ox + 1)
    shifted = MaskTable.take(table, [a, b])
    boxes = shifted.box_xyxy - [ox, oy, ox, oy]
    ma = _paint(shifted.mask_bits[0], boxes[0], hw)
    mb = _paint(shifted.mask_bits[1], boxes[1], hw)
    return (ma & mb).sum() / (ma | mb).sum()


def _paint(bits, box, hw):
    out = np.zeros(hw, bool)
    x0, y0, x1, y1 = box
    out[y0: y1 + 1, x0: x1 + 1] = np.unpackbits(bits, axis=1)[:, : x1 - x0 + 1].astype(bool)
    return out


def max_pair_iou(table: MaskTable, keep: np.ndarray) -> float:
    """Largest mask IoU among kept records whose boxes overlap (brute force)."""
    b = table.box_xyxy[keep]
    ov = ((b[:, None, 0] <= b[None, :, 2]) & (b[None, :, 0] <= b[:, None, 2])
          & (b[:, None, 1] <= b[None, :, 3]) & (b[None, :, 1] <= b[:, None, 3]))
    ii, jj = np.nonzero(np.triu(ov, 1))
    return max((pair_iou(table, keep[a], keep[c]) for a, c in zip(ii, jj)), default=0.0)


def reference_merge(table: MaskTable, hw, thr=0.5, mode="mask", cthr=0.9, drop=True, prefer_interior=True):
    """The merge's rules, spelled out densely and O(n^2)."""
    n = len(table)
    if mode == "mask":
        m = np.stack([dense(table, i, hw).ravel() for i in range(n)]).astype(np.float32)
    else:
        m = np.zeros((n, hw[0] * hw[1]), np.float32)
        for i, (x0, y0, x1, y1) in enumerate(table.box_xyxy):
            canvas = np.zeros(hw, np.float32)
            canvas[y0: y1 + 1, x0: x1 + 1] = 1
            m[i] = canvas.ravel()
    inter = (m @ m.T).astype(np.float64)
    size = np.diag(inter).copy()
    iou = inter / (size[:, None] + size[None, :] - inter)
    touch = np.array([_touches(table.box_xyxy[i], table.chip_window_px[i], hw) for i in range(n)])
    order = sorted(range(n), key=lambda i: ((touch[i] if prefer_interior else 0), size[i],
                                            -float(table.predicted_iou[i]), table.mask_uid[i]))
    kept: list[int] = []
    for i in order:
        if all(iou[i, k] <= thr for k in kept):
            kept.append(i)
    out = []
    for i in kept:
        contained = any(inter[i, k] / size[i] >= cthr and tuple(table.chip_id[k]) != tuple(table.chip_id[i])
                        for k in kept if k != i)
        if not (drop and touch[i] and contained):
            out.append(i)
    return np.array(sorted(out), np.int64)


def _touches(box, window, hw) -> bool:
    cx, cy, cw, ch = window
    return bool((cx > 0 and box[0] == cx) or (cy > 0 and box[1] == cy)
                or (cx + cw < hw[1] and box[2] == cx + cw - 1) or (cy + ch < hw[0] and box[3] == cy + ch - 1))


def single_chip_table(records: list[tuple[tuple[int, int], tuple, np.ndarray, np.ndarray, float]]) -> MaskTable:
    """Table from (chip_id, window, box_xyxy, mask crop, predicted_iou) tuples."""
    return MaskTable(np.arange(len(records)), [r[0] for r in records], [r[1] for r in records],
                     [r[2] for r in records], [r[4] for r in records], [0.95] * len(records),
                     [int(r[3].sum()) for r in records], [np.packbits(r[3], axis=1) for r in records])


# --------------------------------------------------------------------------- the scene


@pytest.fixture(scope="module")
def scene() -> Scene:
    return make_scene(seed=7)


def test_scene_has_what_the_merge_must_handle(scene):
    sources = scene.sources()
    assert len(scene.objects) >= 180
    assert max(max(m.shape) for _, m in scene.objects) > scene.chip_size - scene.step_px  # wider than the overlap
    assert sum(s.startswith("dup") for s in sources) >= 20
    partials = sum(r["mask"].shape != scene.objects[int(r["source"][3:])][1].shape
                   for r in scene.records if r["source"].startswith("obj"))
    assert partials >= 50


def test_every_object_once_and_whole(scene):
    table = scene.table()
    keep = merge_masks(table, 0.5, "mask", grid_hw_px=scene.grid_hw_px)
    kept_sources = [scene.sources()[i] for i in keep]
    assert sorted(kept_sources) == sorted([f"obj{k}" for k in range(len(scene.objects))]
                                          + [f"noise{k}" for k in range(len(scene.noise))])
    for i in keep:
        src = scene.sources()[i]
        pool = scene.objects if src.startswith("obj") else scene.noise
        truth_box, truth = pool[int(src.removeprefix("obj").removeprefix("noise"))]
        assert np.array_equal(table.box_xyxy[i], truth_box)  # the whole object, not a partial
        x0, y0, x1, y1 = truth_box
        got = np.unpackbits(table.mask_bits[i], axis=1)[:, : x1 - x0 + 1].astype(bool)
        assert (got & truth).sum() / (got | truth).sum() >= 0.95


def test_no_two_kept_masks_overlap_above_threshold(scene):
    table = scene.table()
    for thr in (0.3, 0.5):
        keep = merge_masks(table, thr, grid_hw_px=scene.grid_hw_px)
        assert max_pair_iou(table, keep) <= thr


def test_farmvibes_order_keeps_large_partials(scene):
    """Sorting by size alone (FarmVibes) lets a big border-cut partial beat its whole object."""
    table = scene.table()
    keep = merge_masks(table, grid_hw_px=scene.grid_hw_px, prefer_interior=False)
    sizes = table.area
    partial_wins = [i for i in keep if scene.sources()[i].startswith("obj")
                    and sizes[i] < scene.objects[int(scene.sources()[i][3:])][1].sum()]
    assert partial_wins


# --------------------------------------------------------------------------- reference agreement


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mode", ["mask", "box"])
def test_matches_dense_reference_on_random_overlaps(seed, mode):
    scene = make_scene(seed, n_chips=(3, 3), chip_size=64, n_objects=40, size_px=(4, 40), n_large=2,
                       n_noise=5, dup_fraction=0.5, disjoint=False)
    table = scene.table()
    assert 80 <= len(table) <= 400
    for thr, prefer in ((0.5, True), (0.3, False), (0.7, True)):
        got = merge_masks(table, thr, mode, grid_hw_px=scene.grid_hw_px, prefer_interior=prefer)
        want = reference_merge(table, scene.grid_hw_px, thr, mode, prefer_interior=prefer)
        assert np.array_equal(got, want)
        if mode == "mask":
            assert max_pair_iou(table, got) <= thr


# --------------------------------------------------------------------------- mask vs box IoU

W64 = (0, 0, 64, 64)


def test_mask_intersections_count_the_shared_pixels_of_each_pair():
    """Random masks whose boxes start and end on every side of a 64-px word boundary, some far
    apart: each pair's count equals the AND of the two masks painted on the grid."""
    rng = np.random.default_rng(3)
    hw = (160, 400)
    records = []
    for _ in range(60):
        w, h = int(rng.integers(1, 200)), int(rng.integers(1, 60))
        x0 = int(rng.choice([0, 1, 62, 63, 64, 65, 127, 128, 190])) + int(rng.integers(0, 3))
        y0 = int(rng.integers(0, hw[0] - h))
        x1 = min(x0 + w, hw[1]) - 1
        crop = rng.random((h, x1 - x0 + 1)) < rng.uniform(0.2, 0.9)
        crop[0, 0] = crop[-1, -1] = True  # the box stays tight
        records.append(((0, len(records)), (0, 0, hw[1], hw[0]), (x0, y0, x1, y0 + h - 1), crop, 0.9))
    table = single_chip_table(records)
    i, j = np.triu_indices(len(records), 1)
    painted = [_paint(table.mask_bits[r], table.box_xyxy[r], hw) for r in range(len(records))]
    want = [int((painted[a] & painted[b]).sum()) for a, b in zip(i, j)]
    got = mask_intersections_px(table, i, j)
    assert got.tolist() == want
    assert sum(want) > 10_000 and want.count(0) > 100  # overlaps of every size, and disjoint pairs
    assert mask_intersections_px(table, i[:0], j[:0]).size == 0


def _components_by_search(n: int, edges: list[tuple[int, int]]) -> list[int]:
    """Smallest member of each node's component, by depth-first search."""
    neighbours = [[] for _ in range(n)]
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    label = [-1] * n
    for start in range(n):
        if label[start] < 0:
            stack = [start]
            label[start] = start
            while stack:
                node = stack.pop()
                for other in neighbours[node]:
                    if label[other] < 0:
                        label[other] = start
                        stack.append(other)
    return label


@pytest.mark.parametrize("seed", range(6))
def test_connected_components_match_a_graph_search(seed):
    """Random sparse graphs, a long path whose nodes alternate between the two ends of the index
    range, a star and isolated nodes: each node is labelled with its component's smallest member."""
    rng = np.random.default_rng(seed)
    n = 400
    edges = [tuple(map(int, e)) for e in rng.integers(0, n, (int(rng.integers(50, 500)), 2))]
    order = [k // 2 if k % 2 == 0 else n - 1 - k // 2 for k in range(n)]  # 0, 399, 1, 398, ...
    path = list(zip(order[100:300], order[101:301]))
    star = [(399 - seed, leaf) for leaf in range(300 + seed, 310)]
    for graph in (edges, path, star, [], edges + path + star):
        i = np.array([a for a, _ in graph], np.int64)
        j = np.array([b for _, b in graph], np.int64)
        assert connected_components(n, i, j).tolist() == _components_by_search(n, graph)


def test_l_shaped_neighbours_box_mode_suppresses_mask_mode_keeps():
    l_field = np.ones((20, 20), bool)
    l_field[:15, 5:] = False  # an L wrapping the square below
    square = np.ones((15, 15), bool)
    table = single_chip_table([((0, 0), W64, (10, 10, 29, 29), l_field, 0.95),
                               ((0, 1), W64, (15, 10, 29, 24), square, 0.95)])
    assert list(merge_masks(table, 0.5, "mask")) == [0, 1]
    assert list(merge_masks(table, 0.5, "box")) == [1]  # the smaller box wins


def test_duplicate_with_stray_pixel_mask_mode_suppresses_box_mode_keeps():
    square = np.ones((20, 20), bool)
    stray = np.zeros((20, 61), bool)
    stray[:, :20] = True
    stray[10, 60] = True  # one far pixel triples the box: box IoU 0.33, mask IoU 0.998
    window = (0, 0, 96, 64)
    table = single_chip_table([((0, 0), window, (1, 5, 20, 24), square, 0.9),
                               ((0, 1), window, (1, 5, 61, 24), stray, 0.99)])
    assert list(merge_masks(table, 0.5, "mask", grid_hw_px=(64, 96))) == [0]
    assert list(merge_masks(table, 0.5, "box", grid_hw_px=(64, 96))) == [0, 1]


def test_same_chip_pairs_are_compared():
    """In-chip box NMS can leave two masks with mask IoU > 0.5: the merge still separates them."""
    a = np.ones((20, 20), bool)
    b = np.ones((20, 30), bool)  # box IoU 0.67 <= chip_nms_thr 0.7, mask IoU 0.67 > 0.5
    table = single_chip_table([((0, 0), W64, (5, 5, 24, 24), a, 0.9), ((0, 0), W64, (5, 5, 34, 24), b, 0.9)])
    assert list(merge_masks(table, 0.5)) == [0]


# --------------------------------------------------------------------------- border containment

CHIP_A, CHIP_B = ((0, 0), (0, 0, 64, 64)), ((0, 1), (32, 0, 64, 64))  # grid 64 x 96


def test_small_partial_is_dropped_when_contained_in_another_chips_mask():
    full = np.ones((20, 40), bool)  # x 5..44: whole inside chip A (x 0..63)
    partial = np.ones((20, 13), bool)  # chip B (x 32..95) sees x 32..44: cut at its left edge
    table = single_chip_table([(*CHIP_A, (5, 10, 44, 29), full, 0.9),
                               (*CHIP_B, (32, 10, 44, 29), partial, 0.99)])
    assert list(merge_masks(table, 0.5, grid_hw_px=(64, 96))) == [0]  # IoU 0.33: NMS keeps both
    assert list(merge_masks(table, 0.5, grid_hw_px=(64, 96), drop_border_contained=False)) == [0, 1]
    assert list(merge_masks(table, 0.5, grid_hw_px=(64, 96), containment_thr=1.0)) == [0]


def test_large_partial_loses_to_the_whole_object():
    full = np.ones((20, 30), bool)  # x 25..54 in chip A
    partial = np.ones((20, 23), bool)  # chip B sees x 32..54: 77 % of the object
    table = single_chip_table([(*CHIP_A, (25, 10, 54, 29), full, 0.9),
                               (*CHIP_B, (32, 10, 54, 29), partial, 0.99)])
    assert list(merge_masks(table, 0.5, grid_hw_px=(64, 96))) == [0]
    assert list(merge_masks(table, 0.5, grid_hw_px=(64, 96), prefer_interior=False)) == [1]


def test_grid_edge_is_not_a_chip_border():
    """A mask on the grid's outer edge stays even if another chip's mask contains it."""
    top, bottom = ((0, 0), (0, 0, 64, 64)), ((1, 0), (0, 32, 64, 64))  # grid 96 x 64
    small = np.ones((10, 10), bool)
    big = np.ones((26, 21), bool)
    on_edge = single_chip_table([(*top, (0, 40, 9, 49), small, 0.9), (*bottom, (0, 35, 20, 60), big, 0.9)])
    assert list(merge_masks(on_edge, 0.5, grid_hw_px=(96, 64))) == [0, 1]
    # The same masks on an inner chip edge (chips moved right, grid widened): the small one goes.
    top2, bottom2 = ((0, 1), (32, 0, 64, 64)), ((1, 1), (32, 32, 64, 64))
    inner = single_chip_table([(*top2, (32, 40, 41, 49), small, 0.9), (*bottom2, (32, 35, 52, 60), big, 0.9)])
    assert list(merge_masks(inner, 0.5, grid_hw_px=(96, 128))) == [1]


# --------------------------------------------------------------------------- grouping


def chain_records(n: int, x_start: int, y: int, chip: int = 64, step: int = 32) -> list:
    """Equal rectangles 8 px apart with falling scores: NMS keeps every other one."""
    out = []
    for k in range(n):
        x = x_start + 8 * k
        col, row = (x - 1) // step, (y - 1) // step
        window = (col * step, row * step, chip, chip)
        out.append(((row, col), window, (x, y, x + 29, y + 11), np.ones((12, 30), bool), 0.99 - 0.001 * k))
    return out


def test_fixed_halo_is_not_exact_but_merge_grouped_is():
    table = single_chip_table(chain_records(60, x_start=13, y=20))  # regions start at odd links
    grid_hw = (96, 13 + 8 * 60 + 64)
    glob = merge_masks(table, grid_hw_px=grid_hw)
    assert list(glob) == list(range(0, 60, 2))  # the chain alternates
    cell_px, halo = 64, 64
    rec, cells = cell_keys(table.box_xyxy, cell_px, halo, grid_hw)
    naive, unresolved = set(), []
    for cell in np.unique(cells, axis=0):
        members = rec[np.all(cells == cell, axis=1)]
        group = table.take(members)
        result = merge_cell(group, cell, cell_px, halo, grid_hw)
        assert set(result.kept_uids.tolist()) <= set(glob.tolist())  # what a cell decides is final
        assert not set(result.dropped_uids.tolist()) & set(glob.tolist())
        unresolved += result.unresolved_uids.tolist()
        owned = np.all(owner_cells(group.box_xyxy, cell_px) == cell, axis=1)
        local = merge_masks(group, grid_hw_px=grid_hw)
        naive |= set(group.mask_uid[np.intersect1d(np.flatnonzero(owned), local)].tolist())
    assert unresolved  # the chain is longer than the halo ...
    assert naive != set(glob.tolist())  # ... and trusting the local merge would be wrong
    assert np.array_equal(merge_grouped(table, cell_px, halo, grid_hw), glob)
    assert np.array_equal(merge_grouped(table, cell_px, 300, grid_hw), glob)  # ends in one global merge


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_merge_grouped_equals_global_merge(seed):
    scene = make_scene(seed, n_chips=(8, 8), chip_size=64, n_objects=260, size_px=(4, 48), n_large=6,
                       n_noise=30, dup_fraction=0.4, disjoint=seed != 13)
    base = scene.table()
    chain = single_chip_table(chain_records(25, x_start=40, y=100))
    table = MaskTable.concat([base, MaskTable(chain.mask_uid + len(base), *[
        getattr(chain, f) for f in ("chip_id", "chip_window_px", "box_xyxy", "predicted_iou",
                                    "stability_score", "area", "mask_bits")])])
    assert 300 <= len(table) <= 3000
    for mode, cells in (("mask", (40, 96)), ("box", (64,))):
        glob = merge_masks(table, iou_mode=mode, grid_hw_px=scene.grid_hw_px)
        for cell_px in cells:
            got = merge_grouped(table, cell_px, grid_hw_px=scene.grid_hw_px, iou_mode=mode)
            assert np.array_equal(got, glob), (mode, cell_px)


def test_cell_keys_cover_exactly_the_cells_whose_region_meets_the_box():
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 500, 200)
    y0 = rng.integers(0, 500, 200)
    boxes = np.stack([x0, y0, x0 + rng.integers(0, 64, 200), y0 + rng.integers(0, 64, 200)], 1)
    cell, halo = 48, 64
    rec, cells = cell_keys(boxes, cell, halo)
    for i, b in enumerate(boxes):
        got = {tuple(c) for c in cells[rec == i]}
        want = {(r, c) for r in range(0, 20) for c in range(0, 20)
                if c * cell - halo <= b[2] and b[0] < (c + 1) * cell + halo
                and r * cell - halo <= b[3] and b[1] < (r + 1) * cell + halo}
        assert got == want
        assert (b[1] // cell, b[0] // cell) in got
        assert set(group_keys(b, cell, halo)) == want


# --------------------------------------------------------------------------- table and errors


def test_to_mask_table_reads_record_rows():
    crop = np.zeros((3, 10), bool)
    crop[1, 2:9] = True
    crop[0, 0] = crop[2, 9] = True
    rows = pa.table({"date_group_id": ["g"], "chip_row": [0], "chip_col": [1], "mask_index": [0],
                     "uid": ["00000_00001_00000"], "box_xyxy": [[40, 5, 49, 7]], "chip_window": [[32, 0, 64, 64]],
                     "predicted_iou": [0.9], "stability_score": [0.97], "area": [9], "point_xy": [[41.0, 6.0]],
                     "prompt_round": [0], "mask_bits": [pack_crop(crop)]}, schema=RECORD_SCHEMA)
    table = to_mask_table(rows)
    assert table.chip_id.tolist() == [[0, 1]] and table.box_xyxy.tolist() == [[40, 5, 49, 7]]
    assert np.array_equal(unpack_crop(table.mask_bits[0], table.box_xyxy[0]), crop)
    with pytest.raises(DataError, match="lacks columns \\['area'\\]"):
        to_mask_table(rows.drop_columns(["area"]))


def test_from_chip_shifts_boxes_by_the_window_offset():
    table = MaskTable.from_chip((2, 3), (1536, 1024, 1024, 1024), [[0, 0, 9, 4]], [0.9], [0.9], [50],
                                [np.packbits(np.ones((5, 10), bool), axis=1)])
    assert table.box_xyxy.tolist() == [[1536, 1024, 1545, 1028]]
    assert table.mask_uid.tolist() == ["00002_00003_00000"]


@pytest.mark.parametrize("kwargs, message", [
    ({"mask_nms_thr": 0.0}, "mask_nms_thr=0.0 is out of range: use a value in \\(0, 1\\]"),
    ({"mask_nms_thr": 1.5}, "mask_nms_thr=1.5 is out of range"),
    ({"iou_mode": "pixel"}, "iou_mode='pixel' is unknown: use 'mask' or 'box'"),
    ({"containment_thr": 0}, "containment_thr=0 is out of range"),
    ({"border_px": 0}, "border_px=0 must be a positive integer"),
])
def test_bad_parameters_name_the_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MergeParams(**kwargs)


def test_bad_grouping_parameters_name_the_fix():
    table = single_chip_table(chain_records(3, 5, 20))
    with pytest.raises(ConfigError, match="halo_px=32 is narrower than a chip \\(64 px\\): use halo_px >= 64"):
        merge_grouped(table, 64, halo_px=32)
    with pytest.raises(ConfigError, match="cell_px=0 must be a positive integer"):
        merge_grouped(table, 0)


def test_bad_records_name_the_fix():
    ok = dict(mask_uid=[0], chip_id=[(0, 0)], chip_window_px=[(0, 0, 64, 64)], box_xyxy=[(1, 1, 10, 5)],
              predicted_iou=[0.9], stability_score=[0.9], area=[50],
              mask_bits=[np.packbits(np.ones((5, 10), bool), axis=1)])
    with pytest.raises(DataError, match="outside their chip window"):
        MaskTable(**{**ok, "chip_window_px": [(32, 0, 64, 64)]})
    with pytest.raises(DataError, match="differ in length"):
        MaskTable(**{**ok, "area": [50, 50]})
    with pytest.raises(DataError, match="mask_bits shapes do not match their boxes"):
        MaskTable(**{**ok, "mask_bits": [np.packbits(np.ones((4, 10), bool), axis=1)]})
    with pytest.raises(DataError, match="not unique"):
        MaskTable.concat([MaskTable(**ok), MaskTable(**ok)])


def test_empty_table_merges_to_nothing():
    assert merge_masks(MaskTable.empty()).size == 0
    assert merge_grouped(MaskTable.empty(), 64).size == 0
