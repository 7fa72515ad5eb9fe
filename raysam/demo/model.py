"""The colour-similarity demo model: an ONNX encoder/decoder pair that is NOT Segment Anything.

It follows the model contract of :mod:`raysam.sam.contract` exactly, so the generator, the
pipeline and the tests can run offline without downloading SAM weights. Its masks are regions
of similar colour around the prompt point, which is enough to recover uniform fields on
synthetic imagery through SAM's automatic mask generator (point grid, predicted-IoU and
stability filters, box NMS).

Encoder: un-normalises the image, average-pools it 4x4 to 256x256 colour (0..255) and
space-to-depths that into the ``[1, 48, 64, 64]`` embedding (48 = 3 colours x 4 x 4).

Decoder, per prompt (only the first point of each prompt is used; ``point_labels`` is
accepted and ignored, every prompt is treated as one foreground point):

1. depth-to-space the embedding back to 256x256 colour and read the colour under the point
   (the mean of its 3x3 neighbours of similar colour, so one noisy pixel does not set it);
2. colour distance ``d`` (Euclidean, 0..255 RGB) of every low-res pixel to that colour;
3. a constrained flood fill computing, for every pixel, the *bottleneck distance* ``g``: the
   smallest, over 8-connected paths from the point, of the largest ``d`` on the path.
   Unrolled min/max-pool steps, coarse to fine (64, 128, then 256 pixels a side), so a region
   never jumps over a road or joins a separate field of the same colour;
4. token ``k`` keeps ``g < TOLERANCES[k]`` (token 0 medium, tokens 1..3 tight/medium/loose);
   its logits are ``LOGIT_SCALE * (TOLERANCES[k] - g)`` inside (positive, larger for more
   similar colours, so clean fields are stable and noisy ones less so), a sub-pixel edge
   estimate on the one-pixel ring around it (see :func:`_logits`) and ``-LOGIT_CLIP`` beyond;
5. ``iou_predictions`` is a plausibility score in [0, 1]: high for compact, homogeneous
   regions of field size; low for thin (roads), tiny, image-spanning or mixed-colour ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from raysam.sam import contract

OPSET = 17  # the opset segment_anything's own ONNX export uses
IR_VERSION = 8  # highest IR version of opset 17; pinned so the bytes do not depend on onnx
PRODUCER = "raysam.demo.model"
LICENCE = "MIT"  # the project's licence (pyproject.toml); the demo model has no weights
DESCRIPTION = (
    "Colour-similarity demo model, NOT Segment Anything: masks are regions of similar colour "
    "grown from the prompt point (first point only, labels ignored). For offline demos and "
    "tests on synthetic imagery; it has no learned weights."
)

POOL_PX = contract.IMAGE_SIZE // contract.LOW_RES_SIZE  # 4: image pixels per low-res pixel
EMBED_CHANNELS = 3 * (contract.LOW_RES_SIZE // contract.EMBEDDING_SIDE) ** 2  # 48
# Colour tolerances (0..255 RGB distance) of token 0 (single mask) and tokens 1..3 (multimask).
TOLERANCES = (24.0, 12.0, 24.0, 40.0)
LOGIT_SCALE = 0.5  # logits per unit of colour distance below the tolerance
LOGIT_CLIP = 16.0
RING_SCALE = 2 * LOGIT_CLIP  # logits per unit of estimated field fraction on the ring
# Unrolled flood-fill steps per level (low-res side 64, 128, 256); 40 coarse steps reach
# 640 image pixels from the point, the finer levels only recover each field's rim.
FILL_STEPS = {64: 40, 128: 8, 256: 6}
_FLOAT, _INT64, _BOOL = 1, 7, 9  # onnx.TensorProto.FLOAT / INT64 / BOOL element types
SEED_SIMILAR = 16.0  # neighbours of the seed closer than this set its colour
FAR = 1000.0  # a bottleneck distance larger than any colour distance (max is 441.7)
# iou_predictions = SCORE_MAX * product of soft factors, each clipped to [0, 1]:
SCORE_MAX = 0.98
COMPACT_RAMP = (0.3, 0.7)  # fraction of the region surviving a 3x3 erosion
AREA_RAMP_PX = (8.0, 64.0)  # low-res pixels: tiny regions score low
SPRAWL_RAMP = (0.5, 0.25)  # fraction of the low-res image: large regions score low
HOMOGENEITY_RAMP = (30.0, 5.0)  # mean colour distance inside the region: 0 at 30, 1 at 5


def build_demo_model(out_dir: str | Path) -> Path:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``manifest.json`` into ``out_dir``.

    The bytes are deterministic: every build writes the same files (same sha256).

    Args:
        out_dir: the model directory to create (parents too); existing files are replaced.

    Returns:
        The model directory as a :class:`~pathlib.Path`.
    """
    onnx = _import_onnx()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = {}
    for role, model in (("encoder", encoder_model()), ("decoder", decoder_model())):
        onnx.checker.check_model(model, full_check=True)
        data = model.SerializeToString(deterministic=True)
        name = contract.ENCODER_FILE if role == "encoder" else contract.DECODER_FILE
        (out / name).write_bytes(data)
        entries[role] = _file_entry(name, data, model)
    manifest = _manifest(entries, onnx.__version__)
    (out / contract.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def encoder_model():
    """The encoder as an ``onnx.ModelProto`` (see the module docstring)."""
    onnx = _import_onnx()
    g = _GraphBuilder()
    side = contract.IMAGE_SIZE
    std = g.const(np.reshape(contract.PIXEL_STD, (1, 3, 1, 1)))
    mean = g.const(np.reshape(contract.PIXEL_MEAN, (1, 3, 1, 1)))
    rgb = g.op("Add", g.op("Mul", "image", std), mean)
    colour = g.op("AveragePool", rgb, kernel_shape=[POOL_PX, POOL_PX], strides=[POOL_PX, POOL_PX])
    block = contract.LOW_RES_SIZE // contract.EMBEDDING_SIDE
    g.op("SpaceToDepth", colour, blocksize=block, out="image_embeddings")
    inputs = [_value_info(onnx, "image", [1, 3, side, side])]
    emb = contract.EMBEDDING_SIDE
    outputs = [_value_info(onnx, "image_embeddings", [1, EMBED_CHANNELS, emb, emb])]
    return g.model("raysam_demo_encoder", inputs, outputs)


def decoder_model():
    """The decoder as an ``onnx.ModelProto`` (see the module docstring)."""
    onnx = _import_onnx()
    g = _GraphBuilder()
    colour = g.op("DepthToSpace", "image_embeddings", blocksize=4, mode="DCR")
    seed_index = _seed_index(g)
    dist = _colour_distance(g, colour, seed_index)
    bottleneck = _bottleneck_distance(g, dist, seed_index)
    tol = g.const(np.reshape(TOLERANCES, (1, 4, 1, 1)))
    inside = g.op("Less", bottleneck, tol)  # [B, 4, 256, 256] bool
    _logits(g, inside, bottleneck, dist, tol, out="low_res_masks")
    _score(g, g.op("Cast", inside, to=_FLOAT), dist, out="iou_predictions")
    emb, low = contract.EMBEDDING_SIDE, contract.LOW_RES_SIZE
    inputs = [
        _value_info(onnx, "image_embeddings", [1, EMBED_CHANNELS, emb, emb]),
        _value_info(onnx, "point_coords", ["B", "N", 2]),
        _value_info(onnx, "point_labels", ["B", "N"]),
    ]
    outputs = [
        _value_info(onnx, "iou_predictions", ["B", contract.NUM_MASK_TOKENS]),
        _value_info(onnx, "low_res_masks", ["B", contract.NUM_MASK_TOKENS, low, low]),
    ]
    return g.model("raysam_demo_decoder", inputs, outputs)


def _seed_index(g: _GraphBuilder) -> str:
    """Flat low-res pixel index [B] (int64) under the first point of each prompt."""
    first_xy = g.op("Gather", "point_coords", g.const(0, np.int64), axis=1)  # [B, 2]
    low = contract.LOW_RES_SIZE
    px = g.op("Floor", g.op("Div", first_xy, g.const(float(POOL_PX))))
    px = g.op("Cast", g.op("Clip", px, g.const(0.0), g.const(low - 1.0)), to=_INT64)
    x = g.op("Gather", px, g.const(0, np.int64), axis=1)
    y = g.op("Gather", px, g.const(1, np.int64), axis=1)
    return g.op("Add", g.op("Mul", y, g.const(low, np.int64)), x)


def _colour_distance(g: _GraphBuilder, colour: str, seed_index: str) -> str:
    """Euclidean RGB distance [B, 1, 256, 256] of every low-res pixel to the seed's colour."""
    seed_rgb = g.op("Reshape", _seed_colour(g, colour, seed_index), g.const([-1, 3, 1, 1], np.int64))
    diff = g.op("Sub", colour, seed_rgb)
    sq = g.op("ReduceSum", g.op("Mul", diff, diff), g.const([1], np.int64), keepdims=1)
    return g.op("Sqrt", sq)


def _seed_colour(g: _GraphBuilder, colour: str, seed_index: str) -> str:
    """Seed colour [B, 3]: mean of the 3x3 neighbours within ``SEED_SIMILAR`` of the seed pixel.

    Denoises the seed without mixing in a road or the next field when the point is near an edge.
    """
    low = contract.LOW_RES_SIZE
    flat = g.op("Reshape", colour, g.const([3, low * low], np.int64))
    offsets = np.array([dy * low + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]).reshape(1, 9)
    seed_column = g.op("Unsqueeze", seed_index, g.const([1], np.int64))  # [B, 1]
    index = g.op("Add", seed_column, g.const(offsets, np.int64))
    index = g.op("Clip", index, g.const(0, np.int64), g.const(low * low - 1, np.int64))
    patch = g.op("Gather", flat, index, axis=1)  # [3, B, 9]
    centre = g.op("Gather", patch, g.const([4], np.int64), axis=2)  # [3, B, 1]
    diff = g.op("Sub", patch, centre)
    sq = g.op("ReduceSum", g.op("Mul", diff, diff), g.const([0], np.int64), keepdims=1)  # [1, B, 9]
    weight = g.op("Cast", g.op("Less", sq, g.const(SEED_SIMILAR**2)), to=_FLOAT)
    total = g.op("ReduceSum", g.op("Mul", patch, weight), g.const([2], np.int64), keepdims=0)
    count = g.op("ReduceSum", weight, g.const([2], np.int64), keepdims=0)  # [1, B], >= 1
    return g.op("Transpose", g.op("Div", total, count), perm=[1, 0])


def _seed_map(g: _GraphBuilder, seed_index: str) -> str:
    """One-hot float map [B, 1, 256, 256] of each prompt's seed pixel."""
    low = contract.LOW_RES_SIZE
    count = g.op("Range", g.const(0, np.int64), g.const(low * low, np.int64), g.const(1, np.int64))
    pixels = g.op("Unsqueeze", count, g.const([0], np.int64))  # [1, 256 * 256]
    hit = g.op("Equal", pixels, g.op("Unsqueeze", seed_index, g.const([1], np.int64)))
    onehot = g.op("Cast", hit, to=_FLOAT)
    return g.op("Reshape", onehot, g.const([-1, 1, low, low], np.int64))


def _bottleneck_distance(g: _GraphBuilder, dist: str, seed_index: str) -> str:
    """Minimax path distance [B, 1, 256, 256] from each seed, by a coarse-to-fine fill.

    Works on ``r = -g`` so dilation is a max-pool. At a coarse level a block costs the worst
    distance inside it (a road stays a barrier) and the seed's block is forced to 0; each finer
    level starts from the coarser result, which is a lower bound of ``r``, and refines it.
    """
    seed = _seed_map(g, seed_index)
    low = contract.LOW_RES_SIZE
    r = None
    for side, steps in FILL_STEPS.items():
        factor = low // side
        cost, seed_level = dist, seed
        if factor > 1:
            pool = dict(kernel_shape=[factor, factor], strides=[factor, factor])
            cost, seed_level = g.op("MaxPool", dist, **pool), g.op("MaxPool", seed, **pool)
        floor = g.op("Mul", g.op("Sub", seed_level, g.const(1.0)), g.const(FAR))  # 0 / -FAR
        neg_cost = g.op("Neg", cost)
        r = floor if r is None else g.op("Max", g.op("Min", _upsample2(g, r), neg_cost), floor)
        for _ in range(steps):
            r = g.op("Max", g.op("Min", _pool3(g, r), neg_cost), floor)
    return g.op("Neg", r)


def _logits(g: _GraphBuilder, inside: str, bottleneck: str, dist: str, tol: str, out: str) -> str:
    """Mask logits [B, 4, 256, 256] with a sub-pixel boundary.

    Inside the region: ``LOGIT_SCALE * (tol - g)``. On the one-pixel ring around it: the
    pixel's estimated field fraction ``p = 1 - d / max(d over its 3x3 neighbourhood)`` (a
    mixed pixel's distance is the outside's contrast times its outside fraction) mapped to
    ``RING_SCALE * (p - 1/2)``, so the bilinearly upsampled logits cross 0 near the true edge.
    Everywhere else ``-LOGIT_CLIP``.
    """
    low, high = g.const(-LOGIT_CLIP), g.const(LOGIT_CLIP)
    similar = g.op("Clip", g.op("Mul", g.op("Sub", tol, bottleneck), g.const(LOGIT_SCALE)), low, high)
    contrast = g.op("Max", _pool3(g, dist), g.const(1e-3))
    fraction = g.op("Sub", g.const(1.0), g.op("Div", dist, contrast))  # [B, 1, 256, 256]
    ring_logit = g.op("Mul", g.op("Sub", fraction, g.const(0.5)), g.const(RING_SCALE))
    ring_logit = g.op("Clip", ring_logit, low, high)
    ring = g.op("Cast", _pool3(g, g.op("Cast", inside, to=_FLOAT)), to=_BOOL)
    outside = g.op("Where", ring, ring_logit, low)
    return g.op("Where", inside, similar, outside, out=out)


def _pool3(g: _GraphBuilder, x: str) -> str:
    """3x3 max-pool, stride 1, same size (a dilation)."""
    return g.op("MaxPool", x, kernel_shape=[3, 3], pads=[1, 1, 1, 1])


def _upsample2(g: _GraphBuilder, x: str) -> str:
    """Nearest-neighbour 2x upsampling of a [B, 1, h, w] map (tile, then depth-to-space)."""
    tiled = g.op("Tile", x, g.const([1, 4, 1, 1], np.int64))
    return g.op("DepthToSpace", tiled, blocksize=2, mode="DCR")


def _ramp(g: _GraphBuilder, x: str, zero_at: float, one_at: float) -> str:
    """Linear ramp of ``x``: 0 at ``zero_at``, 1 at ``one_at``, clipped to [0, 1]."""
    scaled = g.op("Div", g.op("Sub", x, g.const(zero_at)), g.const(one_at - zero_at))
    return g.op("Clip", scaled, g.const(0.0), g.const(1.0))


def _score(g: _GraphBuilder, masks: str, dist: str, out: str) -> str:
    """Plausibility score [B, 4] of each token's region (see the module docstring)."""
    axes = g.const([2, 3], np.int64)
    area = g.op("ReduceSum", masks, axes, keepdims=0)
    eroded = g.op("Neg", _pool3(g, g.op("Neg", masks)))
    denom = g.op("Max", area, g.const(1.0))
    compact = g.op("Div", g.op("ReduceSum", eroded, axes, keepdims=0), denom)
    mean_dist = g.op("Div", g.op("ReduceSum", g.op("Mul", masks, dist), axes, keepdims=0), denom)
    low_px = float(contract.LOW_RES_SIZE**2)
    factors = [
        _ramp(g, compact, *COMPACT_RAMP),
        _ramp(g, area, *AREA_RAMP_PX),
        _ramp(g, g.op("Div", area, g.const(low_px)), *SPRAWL_RAMP),
        _ramp(g, mean_dist, *HOMOGENEITY_RAMP),
    ]
    score = g.const(SCORE_MAX)
    for factor in factors:
        score = g.op("Mul", score, factor)
    return g.op("Identity", score, out=out)


class _GraphBuilder:
    """Accumulates ONNX nodes and initializers with deterministic names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        """Add one node with a single output and return the output's name."""
        from onnx import helper

        name = self._name(op_type.lower())
        output = out or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attrs))
        return output

    def const(self, value, dtype=np.float32) -> str:
        """Add an initializer holding ``value`` as ``dtype`` and return its name."""
        from onnx import numpy_helper

        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def model(self, graph_name: str, inputs: list, outputs: list):
        """Wrap the nodes into a ``ModelProto`` at :data:`OPSET`, IR :data:`IR_VERSION`."""
        from onnx import helper

        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            ir_version=IR_VERSION,
        )
        model.doc_string = DESCRIPTION
        return model


def _value_info(onnx, name: str, shape: list[int | str]):
    """A float32 graph input/output with symbolic dims given as strings."""
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _io_entries(values) -> list[dict]:
    """Manifest ``inputs``/``outputs`` list: name, shape (symbolic dims as str), dtype."""
    entries = []
    for value in values:
        dims = value.type.tensor_type.shape.dim
        shape = [d.dim_param if d.dim_param else d.dim_value for d in dims]
        entries.append({"name": value.name, "shape": shape, "dtype": "float32"})
    return entries


def _file_entry(name: str, data: bytes, model) -> dict:
    """Manifest entry of one ONNX file: file name, size, sha256 and its signature."""
    return {
        "file": name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "external_data": None,
        "inputs": _io_entries(model.graph.input),
        "outputs": _io_entries(model.graph.output),
    }


def _manifest(entries: dict, onnx_version: str) -> dict:
    """The model directory's ``manifest.json`` content (the fields of :mod:`raysam.export`'s)."""
    emb = contract.EMBEDDING_SIDE
    return {
        "format": contract.MANIFEST_FORMAT,
        "model_type": contract.DEMO_MODEL_TYPE,
        "family": "demo",
        "description": DESCRIPTION,
        "image_size": contract.IMAGE_SIZE,
        "embedding_shape": [1, EMBED_CHANNELS, emb, emb],
        "low_res_size": contract.LOW_RES_SIZE,
        "num_mask_tokens": contract.NUM_MASK_TOKENS,
        "mask_threshold": contract.MASK_THRESHOLD,
        "pixel_mean": list(contract.PIXEL_MEAN),
        "pixel_std": list(contract.PIXEL_STD),
        "encoder": entries["encoder"],
        "decoder": entries["decoder"],
        "opset": OPSET,
        "precision": "fp32",
        "io_dtype": "float32",
        "checkpoint": None,
        "licence": LICENCE,
        "tools": {"onnx": onnx_version},
    }


def _import_onnx():
    """Import :mod:`onnx` (a core dependency) with a clear message if it is missing."""
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - onnx is a declared dependency
        from raysam.errors import ModelError

        raise ModelError("building the demo model needs the onnx package; pip install onnx") from err
    return onnx
