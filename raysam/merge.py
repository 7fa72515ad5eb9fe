"""Cross-chip merge of MaskRecords (the seed's ``combine_sam_masks``), exact under grouping.

All records of one date group live in the target grid's pixel frame. The merge is FarmVibes'
``select_masks`` cross-chip part with two fixes, in two steps:

1. **NMS across chips** with ``mask_nms_thr``, preferring smaller masks (as SAM and FarmVibes
   do). Masks are compared by **mask IoU** on the shared grid (``iou_mode="mask"``, computed
   from the bit-packed crops over the boxes' intersection) or by box IoU (``"box"``, FarmVibes).
   The order is ``(touches_border, size, -predicted_iou, mask_uid)``: with ``prefer_interior``
   (the default) a mask cut by its chip's border ranks after the masks that were seen whole,
   so the full object from the chip that contains it wins over its cut-off partials (FarmVibes,
   sorting by size alone, kept the partial whenever it covered more than half of the object).
   **Same-chip pairs are compared too**: the chip stage's box NMS at ``chip_nms_thr`` = 0.7 can
   leave two masks of one chip whose *mask* IoU exceeds ``mask_nms_thr`` (nested or shifted
   masks with box IoU <= 0.7), and the invariant we promise is about every output pair:
   no two kept masks have IoU > ``mask_nms_thr``. FarmVibes did the same (one NMS group).
2. **Border-contained removal**: a kept mask that touches its own chip's border (within
   ``border_px`` of an edge that is not the grid's outer edge) and has at least
   ``containment_thr`` of its area inside a kept mask of *another* chip is dropped. "Kept"
   means kept by step 1, so step 2 has no order dependence.

Exactness of the spatial reduce. Call two records *linked* when one can influence the other's
fate: mask (or box) IoU > ``mask_nms_thr``, or one is a border-touching mask contained
(>= ``containment_thr``) in the other from another chip. Linked records have intersecting
boxes. Greedy NMS keeps a record iff no earlier *kept* linked record exists, and step 2 only
looks at linked records, so by induction over the order the merge restricted to a connected
component of the link graph equals the merge of that component alone. Components are the true
independent units; a fixed halo is *not* exact in general, because NMS decisions chain
(A suppresses B, so C, which B would have suppressed, survives) and a chain of records of equal
size ordered by predicted IoU can run across any number of chips.

:func:`merge_cell` therefore merges everything whose box meets the cell's region (the cell plus
a halo at least one chip wide), finds the components, and decides only the records it owns
(box top-left in the cell) whose component lies entirely inside the region: any record outside
the group has a box disjoint from the region, hence from every member, so the component is
complete and its local merge is the global one. Owned records of components that reach the
region's edge are returned as *unresolved*; :func:`merge_grouped` re-runs just those cells with
the halo doubled, and once the region covers the whole grid every component is complete, so the
result always equals :func:`merge_masks`. With masks confined to one chip, owned boxes always
fit in the region, and unresolved records only arise from link chains longer than the halo.

Pure numpy/shapely; no Ray. The pipeline shuffles records with :func:`cell_keys`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import shapely

from raysam.errors import ConfigError
from raysam.records import MaskTable, box_area_px, unpack_crop

IOU_MODES = ("mask", "box")
DEFAULT_MASK_NMS_THR = 0.5  # seed parameter mask_nms_thr
DEFAULT_CONTAINMENT_THR = 0.9  # share of a border mask's area inside another chip's mask
DEFAULT_BORDER_PX = 1  # a box within the outermost 1 px of its chip "touches" the border
WORD_PX = 64  # pixels per uint64 word of a grid-aligned mask bit plane
PAIR_WORDS_PER_CHUNK = 1 << 20  # words of each mask gathered at once by mask_intersections_px (8 MiB)


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class MergeParams:
    """Parameters of the cross-chip merge.

    Attributes:
        mask_nms_thr: IoU above which the later mask (in merge order) is suppressed, in (0, 1].
        iou_mode: ``"mask"`` (pixel IoU on the grid) or ``"box"`` (FarmVibes' box IoU).
        drop_border_contained: run step 2 (drop border masks contained in another chip's mask).
        containment_thr: share of a border mask's area that must lie in the other mask, (0, 1].
        border_px: a box reaching into the outermost ``border_px`` pixels of its chip touches it.
        prefer_interior: rank border-touching masks after whole ones (False = FarmVibes order).
    """

    mask_nms_thr: float = DEFAULT_MASK_NMS_THR
    iou_mode: str = "mask"
    drop_border_contained: bool = True
    containment_thr: float = DEFAULT_CONTAINMENT_THR
    border_px: int = DEFAULT_BORDER_PX
    prefer_interior: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_nms_thr <= 1.0:
            raise ConfigError(f"mask_nms_thr={self.mask_nms_thr} is out of range: use a value in (0, 1], e.g. 0.5")
        if self.iou_mode not in IOU_MODES:
            raise ConfigError(f"iou_mode={self.iou_mode!r} is unknown: use 'mask' or 'box'")
        if not 0.0 < self.containment_thr <= 1.0:
            raise ConfigError(f"containment_thr={self.containment_thr} is out of range: "
                              "use a value in (0, 1], e.g. 0.9")
        if not isinstance(self.border_px, (int, np.integer)) or self.border_px < 1:
            raise ConfigError(f"border_px={self.border_px!r} must be a positive integer, e.g. 1")


# --------------------------------------------------------------------------- global merge


def merge_masks(table: MaskTable, mask_nms_thr: float = DEFAULT_MASK_NMS_THR, iou_mode: str = "mask", *,
                drop_border_contained: bool = True, containment_thr: float = DEFAULT_CONTAINMENT_THR,
                border_px: int = DEFAULT_BORDER_PX, prefer_interior: bool = True,
                grid_hw_px: tuple[int, int] | None = None) -> np.ndarray:
    """Merge one date group's masks across chips (NMS, then border-contained removal).

    Args:
        table: the records, boxes in grid pixels.
        mask_nms_thr, iou_mode, drop_border_contained, containment_thr, border_px,
            prefer_interior: see :class:`MergeParams`.
        grid_hw_px: (height, width) of the target grid, to tell its outer edges from chip
            borders; default: the extent of the chip windows in ``table``.

    Returns:
        Sorted int64 indices into ``table`` of the kept records.
    """
    params = MergeParams(mask_nms_thr, iou_mode, drop_border_contained, containment_thr, border_px, prefer_interior)
    keep, _ = _merge(table, params, grid_hw_px or grid_extent_px(table))
    return np.flatnonzero(keep)


def grid_extent_px(table: MaskTable) -> tuple[int, int]:
    """(height, width) covered by the table's chip windows (the grid when all chips are present)."""
    if len(table) == 0:
        return (0, 0)
    w = table.chip_window_px
    return int((w[:, 1] + w[:, 3]).max()), int((w[:, 0] + w[:, 2]).max())


@dataclass(frozen=True)
class _Links:
    """Record pairs (i < j) that can influence each other, with their overlap metrics."""

    i: np.ndarray
    j: np.ndarray
    iou: np.ndarray
    frac_i_in_j: np.ndarray
    frac_j_in_i: np.ndarray
    suppress: np.ndarray  # iou > mask_nms_thr
    i_in_j: np.ndarray  # i touches its border, other chip, frac_i_in_j >= containment_thr
    j_in_i: np.ndarray


def _merge(table: MaskTable, params: MergeParams, grid_hw_px: tuple[int, int]) -> tuple[np.ndarray, _Links]:
    """Keep flags per record and the links they were decided on."""
    touch = touches_chip_border(table, grid_hw_px, params.border_px)
    links = _links(table, params, touch)
    order = _merge_order(table, params, touch)
    keep = _greedy_nms(order, links.i[links.suppress], links.j[links.suppress], len(table))
    if params.drop_border_contained:
        keep &= ~_contained_in_kept(keep, links)
    return keep, links


def touches_chip_border(table: MaskTable, grid_hw_px: tuple[int, int],
                        border_px: int = DEFAULT_BORDER_PX) -> np.ndarray:
    """Whether each box reaches within ``border_px`` of a chip edge that is not a grid edge."""
    b, w = table.box_xyxy, table.chip_window_px
    grid_h, grid_w = grid_hw_px
    right, bottom = w[:, 0] + w[:, 2], w[:, 1] + w[:, 3]
    left_t = (w[:, 0] > 0) & (b[:, 0] < w[:, 0] + border_px)
    top_t = (w[:, 1] > 0) & (b[:, 1] < w[:, 1] + border_px)
    right_t = (right < grid_w) & (b[:, 2] >= right - border_px)
    bottom_t = (bottom < grid_h) & (b[:, 3] >= bottom - border_px)
    return left_t | top_t | right_t | bottom_t


def _sizes(table: MaskTable, params: MergeParams) -> np.ndarray:
    """What NMS ranks and compares: mask area, or box area in box mode (as FarmVibes)."""
    return table.area if params.iou_mode == "mask" else box_area_px(table.box_xyxy)


def _merge_order(table: MaskTable, params: MergeParams, touch: np.ndarray) -> np.ndarray:
    """Record indices in merge order: (touch?, size, -predicted_iou, mask_uid) ascending."""
    _, uid_rank = np.unique(table.mask_uid, return_inverse=True)
    keys = [uid_rank, -table.predicted_iou.astype(np.float64), _sizes(table, params)]
    if params.prefer_interior:
        keys.append(touch.astype(np.int8))
    return np.lexsort(keys)


def _box_pairs(box_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs i < j of boxes sharing at least one pixel (STRtree), with that pixel count."""
    if len(box_xyxy) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    geoms = shapely.box(box_xyxy[:, 0], box_xyxy[:, 1], box_xyxy[:, 2] + 0.5, box_xyxy[:, 3] + 0.5)
    i, j = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    i, j = i[i < j], j[i < j]
    inter = _box_inter_px(box_xyxy[i], box_xyxy[j])
    ok = inter > 0
    return i[ok], j[ok], inter[ok]


def _box_inter_px(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    h = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _links(table: MaskTable, params: MergeParams, touch: np.ndarray) -> _Links:
    """The pairs that matter, pruned by box bounds before any pixel is unpacked."""
    i, j, inter_ub = _box_pairs(table.box_xyxy)
    size = _sizes(table, params)
    other_chip = np.any(table.chip_id[i] != table.chip_id[j], axis=1)
    if params.iou_mode == "mask":  # box overlap bounds the mask overlap
        inter_ub = np.minimum(inter_ub, np.minimum(size[i], size[j]))
        maybe = _link_flags(i, j, inter_ub, size, touch, other_chip, params)
        i, j, other_chip = i[maybe], j[maybe], other_chip[maybe]
        inter = mask_intersections_px(table, i, j)
    else:
        inter = inter_ub
    keep = _link_flags(i, j, inter, size, touch, other_chip, params)
    i, j, inter = i[keep], j[keep], inter[keep].astype(np.float64)
    other_chip = other_chip[keep]
    union = size[i] + size[j] - inter
    f_ij, f_ji = inter / size[i], inter / size[j]
    cthr, drop = params.containment_thr, params.drop_border_contained
    return _Links(i, j, inter / union, f_ij, f_ji, inter / union > params.mask_nms_thr,
                  drop & touch[i] & other_chip & (f_ij >= cthr), drop & touch[j] & other_chip & (f_ji >= cthr))


def _link_flags(i: np.ndarray, j: np.ndarray, inter: np.ndarray, size: np.ndarray, touch: np.ndarray,
                other_chip: np.ndarray, params: MergeParams) -> np.ndarray:
    """Pairs whose (upper-bound) intersection can reach a NMS or containment threshold."""
    inter = inter.astype(np.float64)
    link = inter / (size[i] + size[j] - inter) > params.mask_nms_thr
    if params.drop_border_contained:
        cthr = params.containment_thr
        contain = (touch[i] & (inter / size[i] >= cthr)) | (touch[j] & (inter / size[j] >= cthr))
        link |= other_chip & contain
    return link


def mask_intersections_px(table: MaskTable, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Shared pixel count of masks ``i[k]`` and ``j[k]``, vectorised over the pairs.

    The masks are re-packed into grid-aligned words (:func:`_aligned_words`), so two masks' words
    line up wherever their boxes overlap; a pair's count is the popcount of the AND of their words
    over the rows and word columns both boxes span. A mask's bits outside its box are zero, so the
    AND needs no edge masking. Pairs are taken by how many word columns they share, at most
    :data:`PAIR_WORDS_PER_CHUNK` words at a time.
    """
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    out = np.zeros(len(i), np.int64)
    if not len(i):
        return out
    words, first, n_cols = _aligned_words(table, np.concatenate([i, j]))
    box = table.box_xyxy  # int64 (MaskTable)
    col0, col1 = box[:, 0] // WORD_PX, box[:, 2] // WORD_PX
    y0, y1 = np.maximum(box[i, 1], box[j, 1]), np.minimum(box[i, 3], box[j, 3])
    c0, c1 = np.maximum(col0[i], col0[j]), np.minimum(col1[i], col1[j])
    rows, cols = y1 - y0 + 1, c1 - c0 + 1
    start_i = first[i] + (y0 - box[i, 1]) * n_cols[i] + c0 - col0[i]  # the window's first word
    start_j = first[j] + (y0 - box[j, 1]) * n_cols[j] + c0 - col0[j]
    overlap = (rows > 0) & (cols > 0)
    for n_words in np.unique(cols[overlap]).tolist():
        row_words = np.lib.stride_tricks.sliding_window_view(words, n_words)  # row r: words r .. r + n_words - 1
        same = np.flatnonzero(overlap & (cols == n_words))
        for k in np.array_split(same, max(1, int(rows[same].sum()) * n_words // PAIR_WORDS_PER_CHUNK)):
            n_rows = rows[k]
            row0 = np.cumsum(n_rows) - n_rows
            r = np.arange(int(n_rows.sum())) - np.repeat(row0, n_rows)  # row within its pair's window
            at_i = np.repeat(start_i[k], n_rows) + r * np.repeat(n_cols[i[k]], n_rows)
            at_j = np.repeat(start_j[k], n_rows) + r * np.repeat(n_cols[j[k]], n_rows)
            shared = np.bitwise_count(row_words[at_i] & row_words[at_j]).ravel()
            out[k] = np.add.reduceat(shared, row0 * n_words, dtype=np.int64)
    return out


def _aligned_words(table: MaskTable, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The masks ``records`` as grid-aligned bit planes: pixel ``(x, y)`` of mask ``r`` is bit
    ``x % 64`` of ``words[first[r] + (y - y0[r]) * n_cols[r] + x // 64 - x0[r] // 64]``, one row of
    ``n_cols[r]`` uint64 words per box row. Other masks take no words. About the size of the
    masks' own packed crops."""
    box = table.box_xyxy  # int64 (MaskTable)
    n_cols = box[:, 2] // WORD_PX - box[:, 0] // WORD_PX + 1
    used = np.zeros(len(box), bool)
    used[records] = True
    n_words = np.where(used, (box[:, 3] - box[:, 1] + 1) * n_cols, 0)
    first = np.cumsum(n_words) - n_words
    words = np.zeros(int(n_words.sum()), np.uint64)
    for r in np.flatnonzero(used).tolist():
        x0, _, x1, _ = box[r].tolist()
        crop = unpack_crop(table.mask_bits[r], box[r])
        lead = x0 % WORD_PX
        plane = np.zeros((crop.shape[0], int(n_cols[r]) * WORD_PX), bool)
        plane[:, lead : lead + x1 - x0 + 1] = crop
        words[first[r] : first[r] + n_words[r]] = np.packbits(plane, axis=1, bitorder="little").view("<u8").ravel()
    return words, first, n_cols


def _greedy_nms(order: np.ndarray, i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Keep flags of greedy NMS over ``order`` given the suppressing pairs (i, j)."""
    src, dst = np.concatenate([i, j]), np.concatenate([j, i])
    by_src = np.argsort(src, kind="stable")
    dst = dst[by_src]
    starts = np.searchsorted(src[by_src], np.arange(n + 1)).tolist()
    keep = np.zeros(n, bool)
    suppressed = np.zeros(n, bool)
    for r in order.tolist():
        if suppressed[r]:
            continue
        keep[r] = True
        suppressed[dst[starts[r] : starts[r + 1]]] = True
    return keep


def _contained_in_kept(keep: np.ndarray, links: _Links) -> np.ndarray:
    """Kept border masks with enough of their area inside a kept mask of another chip."""
    drop = np.zeros(len(keep), bool)
    drop[links.i[links.i_in_j & keep[links.j]]] = True
    drop[links.j[links.j_in_i & keep[links.i]]] = True
    return drop & keep


# --------------------------------------------------------------------------- spatial grouping


def owner_cells(box_xyxy: np.ndarray, cell_px: int) -> np.ndarray:
    """int64 (n, 2) (cell_row, cell_col) owning each record: the cell of its box's top-left."""
    box_xyxy = np.asarray(box_xyxy, np.int64).reshape(-1, 4)
    return np.stack([box_xyxy[:, 1] // cell_px, box_xyxy[:, 0] // cell_px], 1)


def cell_region_px(cell_rc: Sequence[int], cell_px: int, halo_px: int) -> tuple[int, int, int, int]:
    """Half-open region [x0, x1) x [y0, y1) of a cell grown by its halo, as (x0, y0, x1, y1)."""
    row, col = int(cell_rc[0]), int(cell_rc[1])
    return (col * cell_px - halo_px, row * cell_px - halo_px,
            (col + 1) * cell_px + halo_px, (row + 1) * cell_px + halo_px)


def cell_keys(box_xyxy: np.ndarray, cell_px: int, halo_px: int,
              grid_hw_px: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Replicate records into every cell whose region (cell + halo) their box meets.

    This is the shuffle key of the spatial reduce: group rows by cell and hand each group to
    :func:`merge_cell`. Every record lands in its owner cell and in the halos of its neighbours.

    Args:
        box_xyxy: (n, 4) inclusive boxes in grid pixels.
        cell_px: cell side in pixels (a multiple of the chip step keeps cells aligned to chips).
        halo_px: halo width in pixels (at least the chip size).
        grid_hw_px: if given, cells past the grid (which own nothing) are skipped.

    Returns:
        (record_index int64 (m,), cell_rc int64 (m, 2)), record indices ascending.
    """
    _check_cells(cell_px, halo_px)
    b = np.asarray(box_xyxy, np.int64).reshape(-1, 4)
    owner = b[:, :2] // cell_px  # (col, row): always among the keys
    lo = np.minimum(np.maximum((b[:, :2] - halo_px) // cell_px, 0), owner)
    hi = (b[:, 2:] + halo_px) // cell_px
    if grid_hw_px is not None:  # cells past the grid own nothing
        last = [max(grid_hw_px[1] - 1, 0) // cell_px, max(grid_hw_px[0] - 1, 0) // cell_px]
        hi = np.maximum(np.minimum(hi, last), owner)
    n_cols, n_rows = hi[:, 0] - lo[:, 0] + 1, hi[:, 1] - lo[:, 1] + 1
    rec = np.repeat(np.arange(len(b)), n_cols * n_rows)
    k = np.arange(len(rec)) - np.repeat(np.cumsum(n_cols * n_rows) - n_cols * n_rows, n_cols * n_rows)
    cols = lo[rec, 0] + k % n_cols[rec]
    rows = lo[rec, 1] + k // n_cols[rec]
    return rec, np.stack([rows, cols], 1)


def group_keys(box_xyxy: Sequence[int], cell_px: int, halo_px: int,
               grid_hw_px: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """The (cell_row, cell_col) keys one record is shuffled to (see :func:`cell_keys`)."""
    _, cells = cell_keys(np.asarray(box_xyxy).reshape(1, 4), cell_px, halo_px, grid_hw_px)
    return [(int(r), int(c)) for r, c in cells]


def _check_cells(cell_px: int, halo_px: int) -> None:
    if not isinstance(cell_px, (int, np.integer)) or cell_px < 1:
        raise ConfigError(f"cell_px={cell_px!r} must be a positive integer, e.g. 4 chips (4096)")
    if not isinstance(halo_px, (int, np.integer)) or halo_px < 0:
        raise ConfigError(f"halo_px={halo_px!r} must be a non-negative integer; use at least the chip size")


@dataclass(frozen=True)
class CellMergeResult:
    """What one cell decided about the records it owns.

    Attributes:
        cell_rc: (cell_row, cell_col).
        kept_uids: owned records kept by the merge (exact).
        dropped_uids: owned records removed by the merge (exact).
        unresolved_uids: owned records whose link component reaches the region's edge; decide
            them again with a wider halo (see :func:`merge_grouped`).
    """

    cell_rc: tuple[int, int]
    kept_uids: np.ndarray
    dropped_uids: np.ndarray
    unresolved_uids: np.ndarray


def merge_cell(table: MaskTable, cell_rc: Sequence[int], cell_px: int, halo_px: int,
               grid_hw_px: tuple[int, int], **params: object) -> CellMergeResult:
    """Merge one cell's group: all records whose box meets the cell's region (cell + halo).

    Args:
        table: every record with ``cell_rc`` among its :func:`cell_keys` (same ``halo_px``).
        cell_rc: the cell (row, col).
        cell_px, halo_px: as given to :func:`cell_keys`.
        grid_hw_px: the whole target grid's (height, width); not this group's extent.
        **params: :class:`MergeParams` fields.

    Returns:
        Decisions for the records the cell owns; exact where resolved (module docstring).
    """
    _check_cells(cell_px, halo_px)
    merge_params = MergeParams(**params)
    cell_rc = (int(cell_rc[0]), int(cell_rc[1]))
    keep, links = _merge(table, merge_params, grid_hw_px)
    closed = _closed_components(table.box_xyxy, links, cell_region_px(cell_rc, cell_px, halo_px))
    owned = np.all(owner_cells(table.box_xyxy, cell_px) == cell_rc, axis=1)
    uid = table.mask_uid
    return CellMergeResult(cell_rc, uid[owned & closed & keep], uid[owned & closed & ~keep], uid[owned & ~closed])


def _closed_components(box_xyxy: np.ndarray, links: _Links, region: tuple[int, int, int, int]) -> np.ndarray:
    """Per record: is every box of its link component inside the half-open region?"""
    x0, y0, x1, y1 = region
    b = box_xyxy
    inside = (b[:, 0] >= x0) & (b[:, 1] >= y0) & (b[:, 2] < x1) & (b[:, 3] < y1)
    linked = links.suppress | links.i_in_j | links.j_in_i
    label = connected_components(len(b), links.i[linked], links.j[linked])
    outside_count = np.bincount(label, weights=(~inside).astype(np.float64), minlength=len(b))
    return outside_count[label] == 0


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label (the smallest member index) of each of n nodes given edges (i, j).

    Vectorised over the edges: each round hooks every root that has an edge to a smaller root
    onto the smallest such root, then follows pointers until every node points at a root. A
    label only ever decreases, so a component's root is its smallest member, and each round
    leaves fewer roots until no edge joins two.
    """
    label = np.arange(n, dtype=np.int64)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while True:
        a, b = label[i], label[j]
        joins = a != b
        if not joins.any():
            return label
        np.minimum.at(label, np.maximum(a, b)[joins], np.minimum(a, b)[joins])
        while not np.array_equal(up := label[label], label):
            label = up


def merge_grouped(table: MaskTable, cell_px: int, halo_px: int | None = None,
                  grid_hw_px: tuple[int, int] | None = None, **params: object) -> np.ndarray:
    """The spatial reduce: per-cell merges, concatenated; equal to :func:`merge_masks`.

    Round 0 merges every cell with ``halo_px`` (:func:`merge_cells`); the few records left
    unresolved are decided by :func:`resolve_pending` with wider halos.

    Args:
        table: all records of one date group.
        cell_px: cell side in pixels.
        halo_px: halo in pixels; default and minimum: the largest chip window side.
        grid_hw_px: the target grid's (height, width); default: the chip windows' extent.
        **params: :class:`MergeParams` fields.

    Returns:
        Sorted int64 indices into ``table`` of the kept records.
    """
    if len(table) == 0:
        return np.zeros(0, np.int64)
    chip_side = int(table.chip_window_px[:, 2:].max())
    halo_px = chip_side if halo_px is None else halo_px
    if halo_px < chip_side:
        raise ConfigError(f"halo_px={halo_px} is narrower than a chip ({chip_side} px): use halo_px >= {chip_side}")
    grid_hw_px = grid_hw_px or grid_extent_px(table)
    results = merge_cells(table, cell_px, halo_px, grid_hw_px, **params)
    kept = [r.kept_uids for r in results]
    pending = np.concatenate([r.unresolved_uids for r in results])
    kept.append(resolve_pending(table, pending, cell_px, halo_px, grid_hw_px, **params))
    return np.flatnonzero(np.isin(table.mask_uid, np.concatenate(kept)))


def merge_cells(table: MaskTable, cell_px: int, halo_px: int, grid_hw_px: tuple[int, int],
                cells: np.ndarray | None = None, **params: object) -> list[CellMergeResult]:
    """One round of per-cell merges, run serially (Ray's groupby runs the same in parallel).

    Args:
        table: all records of the date group (every record meeting the cells' regions).
        cell_px, halo_px, grid_hw_px: as :func:`merge_cell`.
        cells: (k, 2) cells to merge; default: every cell that owns a record.
        **params: :class:`MergeParams` fields.
    """
    rec, keys = cell_keys(table.box_xyxy, cell_px, halo_px, grid_hw_px)
    wanted = np.unique(owner_cells(table.box_xyxy, cell_px) if cells is None else cells, axis=0)
    key_id, wanted_id = _cell_ids(keys), _cell_ids(wanted)
    sel = np.isin(key_id, wanted_id)
    rec, keys, key_id = rec[sel], keys[sel], key_id[sel]
    by_cell = np.argsort(key_id, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(key_id[by_cell]) != 0, True])
    return [merge_cell(table.take(rec[by_cell[a:b]]), keys[by_cell[a]], cell_px, halo_px, grid_hw_px, **params)
            for a, b in zip(bounds[:-1], bounds[1:])]


def _cell_ids(cells_rc: np.ndarray) -> np.ndarray:
    return np.asarray(cells_rc, np.int64)[:, 0] * (1 << 32) + np.asarray(cells_rc, np.int64)[:, 1]


def resolve_pending(table: MaskTable, pending_uids: np.ndarray, cell_px: int, halo_px: int,
                    grid_hw_px: tuple[int, int], **params: object) -> np.ndarray:
    """Decide unresolved records: re-merge their cells with the halo doubled until none remain.

    Once the halo spans every box, one merge of the whole table decides the rest, so this
    always terminates with the global merge's decisions.

    Args:
        table: every record of the date group (not just the pending ones).
        pending_uids: ``unresolved_uids`` gathered from a round of :func:`merge_cell`.
        cell_px, halo_px, grid_hw_px: as in that round.
        **params: :class:`MergeParams` fields.

    Returns:
        The uids among ``pending_uids`` that the merge keeps.
    """
    pending = np.unique(np.asarray(pending_uids))
    kept: list[np.ndarray] = [pending[:0]]
    extent_px = int(table.box_xyxy.max()) + 1 if len(table) else 0
    while pending.size:
        halo_px *= 2
        if halo_px >= extent_px:  # every cell's region now holds every box
            keep = merge_masks(table, grid_hw_px=grid_hw_px, **params)
            kept.append(pending[np.isin(pending, table.mask_uid[keep])])
            break
        cells = owner_cells(table.box_xyxy[np.isin(table.mask_uid, pending)], cell_px)
        results = merge_cells(table, cell_px, halo_px, grid_hw_px, cells, **params)
        decided_kept = np.concatenate([r.kept_uids for r in results])
        kept.append(decided_kept[np.isin(decided_kept, pending)])
        still = np.concatenate([r.unresolved_uids for r in results])
        pending = still[np.isin(still, pending)]
    return np.concatenate(kept)
