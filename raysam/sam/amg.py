"""Automatic mask generation for one chip, following ``SamAutomaticMaskGenerator``.

``generate`` → ``_generate_masks`` (crops, then NMS across crops preferring smaller crops)
→ ``_process_crop`` (encode once, decode point batches ahead in threads, NMS in the
crop, back to image frame) → ``_process_batch`` (candidates, IoU filter, upsample
survivors, stability filter, threshold, boxes, crop-edge filter, bit-pack). Masks are
upsampled only inside the region where their low-res logits can exceed the lowest
threshold, so the work per mask scales with the mask's box, not with the chip.

With ``prompts="coverage"`` each crop's grid pass is followed by up to
``coverage_max_rounds`` rounds of prompts placed in the valid pixels that no kept mask covers
(:mod:`raysam.sam.coverage`); their masks are filtered like the grid's, and NMS runs over
all of them together.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from raysam.errors import ConfigError, DataError
from raysam.records import unpack_crop
from raysam.sam import contract
from raysam.sam.coverage import TRIED_FRACTION, mark_tried, place_prompts
from raysam.sam.masks import (
    CompactMasks,
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    batched_nms,
    box_area,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    stability_from_counts,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from raysam.sam.model import SamModel
from raysam.sam.params import AmgParams
from raysam.sam.upsample import AxisRuns, postprocess_taps, upsample_thresholded_batch

T = TypeVar("T")
R = TypeVar("R")


class AutomaticMaskGenerator:
    """SAM's automatic mask generator on an ONNX :class:`SamModel`.

    Args:
        model: The loaded model.
        params: An :class:`AmgParams`; or give its fields as keyword arguments.
    """

    def __init__(self, model: SamModel, params: AmgParams | None = None, **kwargs: Any) -> None:
        self.model = model
        unknown = sorted(set(kwargs) - set(AmgParams.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"unknown mask generator parameter(s) {', '.join(unknown)}: use "
                f"{', '.join(AmgParams.__dataclass_fields__)}"
            )
        base = _as_dict(params) if params is not None else {}
        self.params = AmgParams(**{**base, **kwargs}) if kwargs or params is None else params
        p = self.params
        self.point_grids = (
            list(p.point_grids) if p.point_grids is not None
            else build_all_layer_point_grids(
                p.points_per_side, p.n_crop_layers, p.crop_n_points_downscale_factor)
        )
        self.mask_threshold = model.mask_threshold

    def generate(self, image: np.ndarray, valid: np.ndarray | None = None) -> list[dict[str, Any]]:
        """Masks of an HxWx3 uint8 image as ``SamAutomaticMaskGenerator.generate`` returns
        them with ``output_mode="binary_mask"``, in the same order.

        In coverage mode each record also has ``prompt_round`` (0 for the grid); ``valid``
        is as in :meth:`generate_compact`.
        """
        compact = self.generate_compact(image, valid)
        with_round = self.params.prompts == "coverage"
        return [_record(compact, i, with_round) for i in range(len(compact))]

    def generate_compact(self, image: np.ndarray, valid: np.ndarray | None = None) -> CompactMasks:
        """Masks of an HxWx3 uint8 image as packed bits in their boxes (no dense masks).

        Args:
            image: HxWx3 uint8 RGB.
            valid: Optional bool (H, W): pixels worth a mask (data, not cloud, inside the
                AOI). Coverage prompts go only there; None means all valid. The grid does
                not use it (grid mode is SAM's generator).
        """
        _check_image(image)
        if self.params.prompts == "coverage":
            valid = _check_valid(valid, image.shape[:2])
        data, n_prompts = self._generate_masks(image, valid)
        return CompactMasks.from_mask_data(data, image.shape[:2], n_prompts)

    def _generate_masks(self, image: np.ndarray, valid: np.ndarray | None) -> tuple[MaskData, int]:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_size, self.params.n_crop_layers, self.params.crop_overlap_ratio)
        data, n_prompts = MaskData(), 0
        for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
            crop_data, crop_prompts = self._process_crop(image, crop_box, layer_idx, orig_size, valid)
            data.cat(crop_data)
            n_prompts += crop_prompts
        # Remove duplicates between crops, preferring masks from smaller crops.
        if len(crop_boxes) > 1 and len(data):
            crop_areas = box_area(np.asarray(data["crop_boxes"], np.int64))
            scores = np.float32(1.0) / crop_areas.astype(np.float32)
            keep = batched_nms(data["boxes"], scores, np.zeros(len(data)), self.params.chip_nms_thr)
            data.filter(keep)
        return data, n_prompts

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer_idx: int, orig_size: tuple[int, int],
        valid: np.ndarray | None,
    ) -> tuple[MaskData, int]:
        x0, y0, x1, y1 = crop_box
        cropped = np.ascontiguousarray(image[y0:y1, x0:x1, :])
        crop_hw = cropped.shape[:2]
        encoder_input, input_hw = self.model.preprocess(cropped)
        embeddings = self.model.encode(encoder_input)
        taps = self._crop_taps(input_hw, crop_hw)

        def decode(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            coords = self.model.apply_coords(points, crop_hw)[:, None, :]
            return self.model.decode_kept(embeddings, coords, np.ones(coords.shape[:2], np.float32),
                                          self._has_candidate)

        def decode_round(points_for_image: np.ndarray, prompt_round: int) -> MaskData:
            """Decode points in batches (the next ones ahead, in threads); filter each batch."""
            batches = [points for (points,) in batch_iterator(self.params.points_per_batch, points_for_image)]
            data = MaskData()
            for points, decoded in zip(batches, prefetched(decode, batches, self.model.decode_workers)):
                batch = self._process_batch(points, decoded, crop_hw, taps, crop_box, orig_size)
                batch["rounds"] = np.full(len(batch), prompt_round, np.int32)
                data.cat(batch)
            return data

        grid_points = self.point_grids[layer_idx] * np.array(crop_hw)[None, ::-1]
        data, n_prompts = decode_round(grid_points, 0), len(grid_points)
        if self.params.prompts == "coverage":
            n_prompts += self._coverage_rounds(data, decode_round, valid[y0:y1, x0:x1])
        if not len(data):
            return _empty_data(), n_prompts
        # Remove duplicates within this crop.
        keep = batched_nms(data["boxes"], data["iou_preds"], np.zeros(len(data)),
                           self.params.chip_nms_thr)
        data.filter(keep)
        # Return to the original image frame.
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = np.tile(np.asarray(crop_box, np.int64), (len(data), 1))
        return data, n_prompts

    def _coverage_rounds(
        self, data: MaskData, decode_round: Callable[[np.ndarray, int], MaskData], valid: np.ndarray
    ) -> int:
        """Prompt what no kept mask covers, round after round; add the masks to ``data``.

        Returns:
            The number of prompts decoded.
        """
        p = self.params
        tried = np.zeros(valid.shape, bool)
        used = 0
        for prompt_round in range(1, p.coverage_max_rounds + 1):
            free = valid & ~tried & ~self._covered(data, valid.shape)
            # What is left of the budget, spread over the rounds left: a later round sees what
            # the earlier ones found, and its deepest holes beat this round's shallow ones.
            share = -(-(p.coverage_max_points - used) // (p.coverage_max_rounds - prompt_round + 1))
            prompts = place_prompts(free, p.coverage_min_area_px, share)
            if not len(prompts):
                break
            data.cat(decode_round(prompts.points_xy, prompt_round))
            mark_tried(tried, prompts, TRIED_FRACTION)
            used += len(prompts)
        return used

    def _covered(self, data: MaskData, crop_hw: tuple[int, int]) -> np.ndarray:
        """bool (h, w): pixels of the crop covered by a mask that NMS would keep now."""
        covered = np.zeros(crop_hw, bool)
        if not len(data):
            return covered
        keep = batched_nms(data["boxes"], data["iou_preds"], np.zeros(len(data)), self.params.chip_nms_thr)
        for i in keep:
            x0, y0, x1, y1 = (int(v) for v in data["boxes"][i])
            covered[y0 : y1 + 1, x0 : x1 + 1] |= unpack_crop(data["bits"][i], data["boxes"][i])
        return covered

    def _crop_taps(self, input_hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[AxisRuns, AxisRuns]:
        """Per-axis upsampling operators from low-res logits to this crop's pixels."""
        size, low = self.model.image_size, contract.LOW_RES_SIZE
        return (AxisRuns.from_taps(postprocess_taps(low, size, input_hw[0], crop_hw[0])),
                AxisRuns.from_taps(postprocess_taps(low, size, input_hw[1], crop_hw[1])))

    @property
    def _tokens(self) -> slice:
        """The mask tokens whose masks are candidates: SAM's three multimask ones, or token 0."""
        return slice(1, contract.NUM_MASK_TOKENS) if self.params.multimask else slice(0, 1)

    def _has_candidate(self, iou: np.ndarray) -> np.ndarray:
        """(B,) bool: prompts with a candidate that passes the predicted-IoU filter."""
        if self.params.pred_iou_thresh <= 0.0:
            return np.ones(len(iou), bool)
        return (iou[:, self._tokens] > self.params.pred_iou_thresh).any(axis=1)

    def _process_batch(
        self,
        points: np.ndarray,
        decoded: tuple[np.ndarray, np.ndarray, np.ndarray],
        crop_hw: tuple[int, int],
        taps: tuple[AxisRuns, AxisRuns],
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> MaskData:
        p = self.params
        iou, low_res, rows = decoded  # logits only of the prompts ``rows`` (the others have no candidate)
        n_tok = len(range(contract.NUM_MASK_TOKENS)[self._tokens])
        logits: list[np.ndarray | None] = [None] * (len(iou) * n_tok)
        for row, masks in zip(rows, low_res[:, self._tokens]):
            logits[row * n_tok : (row + 1) * n_tok] = list(masks)  # views, no copies
        data = MaskData(
            logits=logits,
            iou_preds=iou[:, self._tokens].reshape(-1).astype(np.float32),
            points=np.repeat(points, n_tok, axis=0),
        )
        # Filter by predicted IoU before any upsampling.
        if p.pred_iou_thresh > 0.0:
            data.filter(data["iou_preds"] > p.pred_iou_thresh)
        abs_max = max(float(low_res.max()), -float(low_res.min())) if low_res.size else 0.0
        self._upsample(data, taps, abs_max=abs_max)
        if p.stability_score_thresh > 0.0:
            data.filter(data["stability_score"] >= p.stability_score_thresh)
        self._boxes_and_bits(data)
        # Filter boxes that touch crop boundaries.
        orig_box = [0, 0, orig_size[1], orig_size[0]]
        data.filter(~is_box_near_crop_edge(data["boxes"], crop_box, orig_box))
        del data["regions"], data["origins"]
        return data

    def _upsample(self, data: MaskData, taps: tuple[AxisRuns, AxisRuns], abs_max: float) -> None:
        """Add stability scores and the thresholded mask inside each mask's live region."""
        offset = self.params.stability_score_offset
        thresholds = (self.mask_threshold - offset, self.mask_threshold, self.mask_threshold + offset)
        regions = upsample_thresholded_batch(data["logits"], taps[0], taps[1], thresholds, mask_index=1,
                                             abs_max=abs_max)
        counts = np.array([r.counts for r in regions], np.int64).reshape(-1, 3)
        data["stability_score"] = stability_from_counts(counts[:, 2], counts[:, 0])
        data["regions"] = [r.mask for r in regions]
        data["origins"] = np.array([r.origin for r in regions], np.int64).reshape(-1, 2)
        del data["logits"]

    def _boxes_and_bits(self, data: MaskData) -> None:
        """Inclusive boxes (crop frame), areas and packed bits of each thresholded region."""
        boxes, areas, bits = [], [], []
        for region, (oy, ox) in zip(data["regions"], data["origins"]):
            box = batched_mask_to_box(region) if region.size else np.zeros(4, np.int64)
            area = int(np.count_nonzero(region))
            if area:
                bits.append(np.packbits(region[box[1] : box[3] + 1, box[0] : box[2] + 1], axis=1))
                box = box + np.array([ox, oy, ox, oy])
            else:
                box, bits_empty = np.zeros(4, np.int64), np.zeros((1, 1), np.uint8)
                bits.append(bits_empty)
            boxes.append(box)
            areas.append(area)
        data["boxes"] = np.array(boxes, np.int64).reshape(-1, 4)
        data["areas"] = np.array(areas, np.int64)
        data["bits"] = bits


def prefetched(fn: Callable[[T], R], items: Sequence[T], workers: int = 1) -> Iterator[R]:
    """Yield ``fn(item)`` for each item in order, computing up to ``workers`` ahead in threads.

    The decoder (onnxruntime, which releases the GIL; or a GPU) works on the next batches
    while the caller post-processes batch k. At most ``workers + 1`` results are alive at once.
    """
    if len(items) < 2:
        yield from (fn(item) for item in items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raysam-decode") as pool:
        pending = deque(pool.submit(fn, item) for item in items[:workers])
        for item in items[workers:]:
            ready = pending.popleft().result()
            pending.append(pool.submit(fn, item))
            yield ready
        while pending:
            yield pending.popleft().result()


def _empty_data() -> MaskData:
    return MaskData(
        iou_preds=np.zeros(0, np.float32), points=np.zeros((0, 2)),
        stability_score=np.zeros(0, np.float32), boxes=np.zeros((0, 4), np.int64),
        areas=np.zeros(0, np.int64), bits=[], crop_boxes=np.zeros((0, 4), np.int64),
        rounds=np.zeros(0, np.int32),
    )


def _record(masks: CompactMasks, i: int, with_round: bool) -> dict[str, Any]:
    """One SAM-style annotation dict (binary_mask output mode), plus ``prompt_round`` if asked."""
    record = {
        "segmentation": masks.dense_mask(i),
        "area": int(masks.area[i]),
        "bbox": box_xyxy_to_xywh(masks.box_xyxy[i].astype(np.int64)).tolist(),
        "predicted_iou": float(masks.predicted_iou[i]),
        "point_coords": [masks.point_coords[i].astype(np.float64).tolist()],
        "stability_score": float(masks.stability_score[i]),
        "crop_box": box_xyxy_to_xywh(masks.crop_box_xyxy[i].astype(np.int64)).tolist(),
    }
    if with_round:
        record["prompt_round"] = int(masks.prompt_round[i])
    return record


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise DataError(f"image must be an HxWx3 uint8 array, got shape {shape}: pass RGB pixels")
    if image.dtype != np.uint8:
        raise DataError(f"image must be uint8 (0..255), got {image.dtype}: scale it to uint8 first")
    if min(image.shape[:2]) == 0:
        raise DataError(f"image is empty (shape {image.shape}): pass a non-empty chip")


def _check_valid(valid: Any, image_hw: tuple[int, int]) -> np.ndarray:
    """The valid mask as bool (H, W); all valid when None."""
    if valid is None:
        return np.ones(image_hw, bool)
    shape = getattr(valid, "shape", None)
    if not isinstance(valid, np.ndarray) or valid.dtype != bool or valid.shape != tuple(image_hw):
        raise DataError(
            f"valid must be a bool array of the image's shape {tuple(image_hw)}, got "
            f"{getattr(valid, 'dtype', type(valid).__name__)} {shape}: pass the chip's valid-pixel mask"
        )
    return valid


def _as_dict(params: AmgParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}
