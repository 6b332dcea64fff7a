"""The sparse MoE text MLP of Qwen3-VL-MoE (30B-A3B, 235B-A22B): HF `Qwen3VLMoeTextSparseMoeBlock`.

Router (HF `Qwen3VLMoeTextTopKRouter`): logits = x @ Wg^T in the compute dtype (HF F.linear) -> softmax over
all E experts in fp32 (HF `softmax(dtype=float)`) -> TopK(k) -> divide by their sum (5.x always renormalizes:
`norm_topk_prob` is gone from its config class) -> back to the compute dtype. Expert e: down_e(act(x @ G_e) * (x @ U_e)) times the
routing weight; a token's k results are summed in top-k order (HF's default `grouped_mm` experts: reshape to
[N, k, C] and sum).

Weights are the checkpoint's tensors, one initializer each, in the release layout (converted at export when
the checkpoint holds HF's in-memory layout): gate_up [E, C, 2I] (gate columns first, then up), down [E, I, C].

Grouped experts without a grouped-GEMM op. The A = N*k token-expert assignments are sorted by expert (a
counting sort: one-hot, CumSum) and cut into tiles: a tile is T rows of one expert. With H the number of
experts hit, T = ceil(A / H) (the mean load) when A > E, so the last tile of each expert is padded, the
padding is at most about A rows and there are at most 2H tiles; when A <= E (decode steps), T = the largest
load, so each expert hit has exactly one tile and is read once. An ONNX Loop runs
n_iter = ceil(tiles / TILES_PER_ITERATION) times over blocks of G = ceil(tiles / n_iter) consecutive tiles
(fewer than n_iter padding tiles in all). Each iteration gathers the block's G expert slices ([G, C, 2I],
[G, I, C]) and its rows ([G, T, C]), runs two batched MatMuls, scales by the routing weights and writes
each assignment's row of an [A, C] buffer (ScatterND; padding rows go to a spare row A). Then [A, C] ->
[N, k, C] -> sum over k.
- decode (N = 1): T = 1 and one tile per selected expert: a single iteration reads exactly the k selected
  experts' weights, nothing else (no dense all-expert compute); a batch of decode tokens reads each expert
  it hits once (plus fewer than n_iter padding tiles);
- prefill: each hit expert is read once per tile (tiles <= 2H), never once per token; at most
  ceil(2H / TILES_PER_ITERATION) iterations.
Every data-dependent extent (T, G, tile count) is computed outside the Loop: TensorRT-RTX 1.7 fails to build
a Loop whose body makes data-dependent shapes, and one nested in an If (docs/graphs.md, "MoE block", which
also says what a grouped-GEMM plugin would add).

Shapes: n [B, S, C] -> [B, S, C]; x [N, C] (N = B*S); ids / weights [A] token-major (assignment a is token
a // k); gate_up [E, C, 2I], down [E, I, C]; the loop's tables [n_iter, G, T] (assignment per slot) and
[n_iter, G] (expert per tile).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from . import plugin_ops
from .layers import activation, cast, linear, reshape, to_compute
from .onnx_graph import ELEM, GraphBuilder
from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from .weights import CheckpointWeights

TILES_PER_ITERATION = 16  # G max: bounds the gathered weight slices per iteration (16 x 9.4 MB at 30B-A3B, bf16)


def sparse_moe_block(g: GraphBuilder, w: CheckpointWeights, n: str, key: str, spec: ModelSpec,
                     tiles_per_iteration: int = TILES_PER_ITERATION) -> str:
    """HF Qwen3VLMoeTextSparseMoeBlock on n [B, S, C] -> [B, S, C] (compute dtype)."""
    moe, c = spec.text.moe, spec.text.hidden_size
    x = reshape(g, n, [-1, c])  # [N, C]
    ids, weights = router(g, w, x, key, moe.num_experts_per_tok)
    if g.formats.experts != "dense":
        with g.scope("experts"):
            y = quantized_experts(g, w, x, ids, weights, key, spec)  # [N, C]
        return g.op("Reshape", [y, g.op("Shape", [n])])  # [B, S, C]
    gate_up, down = (g.weight(f"{key}.experts.{name}", t) for name, t in
                     zip(("gate_up_proj", "down_proj"), release_layout(w, key, spec)))
    with g.scope("experts"):
        table, experts, n_iter = _tiles(g, ids, moe.num_experts, tiles_per_iteration)
        y = _expert_loop(g, x, weights, table, experts, n_iter, gate_up, down, spec)  # [A, C]
        y = reshape(g, y, [-1, moe.num_experts_per_tok, c])  # [N, k, C]
        y = g.op("ReduceSum", [y, g.const([1], "int64")], keepdims=0)  # [N, C], HF grouped_mm: view + sum(dim=1)
    return g.op("Reshape", [y, g.op("Shape", [n])])  # [B, S, C]


def quantized_experts(g: GraphBuilder, w: CheckpointWeights, x: str, ids: str, weights: str, key: str,
                      spec: ModelSpec) -> str:
    """The experts on FP8/INT4 stacked weights (export/moe_quant.py) as one `qwen_vl::MoEExperts` node whose
    model-local function is DequantizeLinear + the Loop below (export/plugin_ops.py): x [N, C] -> [N, C].
    TensorRT with libqwen_vl_plugins.so runs the plugin (reads only the selected experts' quantized bytes);
    ONNX Runtime and TensorRT without it run the body (dequantizes every expert, then reads the selected)."""
    from . import moe_quant

    if spec.text.hidden_act != "silu":
        raise CheckpointError(f"quantized MoE experts support hidden_act silu, not {spec.text.hidden_act!r}")
    gate_up, down = moe_quant.quantized_experts(w, key, spec, g.formats, g.dtype,
                                                lambda: release_layout(w, key, spec))
    gu_q, gu_s = moe_quant.store(g, f"{key}.experts.gate_up_proj", gate_up)
    dn_q, dn_s = moe_quant.store(g, f"{key}.experts.down_proj", down)
    if ("int32", ids) not in g.memo:
        g.memo[("int32", ids)] = g.op("Cast", [ids], to=TensorProto.INT32)
    name = g._node_name("MoEExperts")
    y = f"{name}/output_0"
    g.nodes.append(plugin_ops.make_moe_experts_node(
        x, g.memo[("int32", ids)], weights, gu_q, gu_s, dn_q, dn_s, y, spec.text.moe.num_experts_per_tok,
        gate_up.block, down.block, name=name))
    if (plugin_ops.DOMAIN, "MoEExperts") not in g.functions:
        g.add_function(moe_experts_function(spec, g.dtype))
    return y


def moe_experts_function(spec, dtype: str) -> onnx.FunctionProto:
    """MoEExperts' reference body for this model (its E, k, C, I, activation and graph dtype): DequantizeLinear of
    the stacked experts ([E, K, N], axis 1, block sizes from the node's attributes), then the dense MoE block's
    tiling and expert Loop (export/moe.py)."""
    b = plugin_ops.ModelBody(dtype)
    moe, c = spec.text.moe, spec.text.hidden_size
    gate_up, down = (plugin_ops.block_dequantize(b, q, f"{q}_scale", f"{q}_block_size")
                     for q in ("gate_up", "down"))
    table, experts, n_iter = _tiles(b, b.op("Cast", ["ids"], to=TensorProto.INT64), moe.num_experts,
                                    TILES_PER_ITERATION)
    y = _expert_loop(b, "x", "weights", table, experts, n_iter, gate_up, down, spec)  # [A, C]
    y = b.op("Reshape", [y, b.const([-1, moe.num_experts_per_tok, c])])  # [N, k, C]
    b.nodes.append(helper.make_node("ReduceSum", [y, b.const([1])], ["y"], keepdims=0))  # [N, C]
    return plugin_ops.function("MoEExperts", ["x", "ids", "weights", "gate_up", "gate_up_scale", "down", "down_scale"],
                               ["y"], b, "Routed experts on stacked FP8/INT4 weights (plugins/README.md)")


def router(g: GraphBuilder, w: CheckpointWeights, x: str, key: str, k: int):
    """-> ids [A] int64, weights [A] (compute dtype); assignment a = (token a // k, choice a % k)."""
    logits = linear(g, w, x, f"{key}.gate", False)  # [N, E] in the compute dtype, as HF's F.linear
    with g.scope("gate"):
        probs = g.op("Softmax", [cast(g, logits, "float32") if g.dtype != "float32" else logits], axis=-1)
        top_w, top_i = g.op("TopK", [probs, g.const([k], "int64")], n_out=2, axis=-1, largest=1, sorted=1)
        top_w = g.op("Div", [top_w, g.op("ReduceSum", [top_w, g.const([-1], "int64")], keepdims=1)])  # [N, k]
        top_w = to_compute(g, top_w)  # HF: router_top_value.to(router_logits.dtype)
        return reshape(g, top_i, [-1]), reshape(g, top_w, [-1])


def release_layout(w: CheckpointWeights, key: str, spec: ModelSpec):
    """(gate_up [E, C, 2I], down [E, I, C]) torch tensors, whichever of the two layouts the checkpoint holds.

    HF's loader (`Transpose(1, 2, check_dims=True)`) keeps a tensor whose shape equals its in-memory parameter
    ([E, 2I, C] / [E, C, I], what save_pretrained writes) and transposes any other. Testing the in-memory
    shape first reads a checkpoint as HF does, also when 2I == C or I == C makes the layouts look alike."""
    moe, c = spec.text.moe, spec.text.hidden_size
    e, i = moe.num_experts, moe.moe_intermediate_size
    out = []
    for name, in_memory, release in (("gate_up_proj", (e, 2 * i, c), (e, c, 2 * i)),
                                     ("down_proj", (e, c, i), (e, i, c))):
        t = w.get(f"{key}.experts.{name}")
        if tuple(t.shape) == in_memory:
            t = t.transpose(1, 2)
        elif tuple(t.shape) != release:
            raise CheckpointError(f"{w.dir}: {key}.experts.{name} has shape {list(t.shape)}; expected "
                                  f"{list(release)} (release layout) or {list(in_memory)} (transformers 5.x layout)")
        out.append(t)
    return out


def _i64(g: GraphBuilder, value) -> str:
    return g.const(value, "int64")


def _ceil_div(g: GraphBuilder, a: str, b: str) -> str:
    return g.op("Div", [g.op("Sub", [g.op("Add", [a, b]), _i64(g, 1)]), b])


def _tiles(g: GraphBuilder, ids: str, e: int, max_group: int):
    """Sort the A assignments by expert into tiles of T rows of one expert, G tiles per loop iteration.

    -> table [n_iter, G, T] int64 (assignment in each slot; A = padding), experts [n_iter, G] int64, n_iter."""
    a = g.op("Size", [ids])  # 0-D A
    one_hot = g.op("Cast", [g.op("Equal", [g.op("Unsqueeze", [ids, _i64(g, [1])]), _i64(g, list(range(e)))])],
                   to=TensorProto.INT64)  # [A, E]
    counts = g.op("ReduceSum", [one_hot, _i64(g, [0])], keepdims=0)  # [E] assignments per expert
    rank = g.op("Sub", [g.op("ReduceSum", [g.op("Mul", [g.op("CumSum", [one_hot, _i64(g, 0)]), one_hot]),
                                           _i64(g, [1])], keepdims=0), _i64(g, 1)])  # [A] rank within its expert
    hit = g.op("ReduceSum", [g.op("Cast", [g.op("Greater", [counts, _i64(g, 0)])], to=TensorProto.INT64),
                             _i64(g, [0])], keepdims=0)  # 0-D H
    # T: the largest load when A <= E (decode, memory-bound: one tile per expert hit, each read once), else the
    # mean load of a hit expert (prefill, compute-bound: at most about A padding rows, at most 2H tiles)
    rows = g.op("Where", [g.op("LessOrEqual", [a, _i64(g, e)]), g.op("ReduceMax", [counts, _i64(g, [0])], keepdims=0),
                          _ceil_div(g, a, hit)])  # 0-D T
    tiles = _ceil_div(g, counts, rows)  # [E] tiles per expert (0 if not hit)
    tile_end = g.op("CumSum", [tiles, _i64(g, 0)])  # [E]
    n_tiles = g.op("ReduceSum", [tiles, _i64(g, [0])], keepdims=0)  # 0-D
    n_iter = _ceil_div(g, n_tiles, _i64(g, max_group))
    group = _ceil_div(g, n_tiles, n_iter)  # 0-D G <= max_group; fewer than n_iter padding tiles
    n_slots = g.op("Mul", [g.op("Mul", [n_iter, group]), rows])
    tile = g.op("Add", [g.op("Gather", [g.op("Sub", [tile_end, tiles]), ids], axis=0), g.op("Div", [rank, rows])])
    slot = g.op("Add", [g.op("Mul", [tile, rows]), g.op("Mod", [rank, rows])])  # [A] distinct
    table = g.op("ScatterElements", [
        g.op("Expand", [g.op("Unsqueeze", [a, _i64(g, [0])]), g.op("Unsqueeze", [n_slots, _i64(g, [0])])]),
        slot, g.op("Range", [_i64(g, 0), a, _i64(g, 1)])], axis=0)  # [n_slots], unfilled slots hold A
    dims = g.op("Concat", [g.op("Unsqueeze", [v, _i64(g, [0])]) for v in (n_iter, group, rows)], axis=0)
    # expert of tile t = number of experts whose tiles end at or before t; padding tiles repeat the last one
    t = g.op("Min", [g.op("Range", [_i64(g, 0), g.op("Mul", [n_iter, group]), _i64(g, 1)]),
                     g.op("Sub", [n_tiles, _i64(g, 1)])])
    experts = g.op("ReduceSum", [g.op("Cast", [g.op("LessOrEqual", [
        g.op("Unsqueeze", [tile_end, _i64(g, [0])]), g.op("Unsqueeze", [t, _i64(g, [1])])])], to=TensorProto.INT64),
        _i64(g, [1])], keepdims=0)  # [n_iter * G]
    # allowzero: the dims are computed, a 0 in them is a size (TensorRT warns on placeholder semantics)
    experts = g.op("Reshape", [experts, g.op("Slice", [dims, _i64(g, [0]), _i64(g, [2])])], allowzero=1)
    return g.op("Reshape", [table, dims], allowzero=1), experts, n_iter


def _expert_loop(g: GraphBuilder, x, weights, table, experts, n_iter, gate_up, down, spec: ModelSpec) -> str:
    """Loop over the [n_iter] blocks of tiles; -> [A, C] weighted expert outputs, one row per assignment."""
    k, c, elem = spec.text.moe.num_experts_per_tok, spec.text.hidden_size, ELEM[g.dtype]
    x_pad = g.op("Concat", [x, g.op("ConstantOfShape", [_i64(g, [1, c])],
                                    value=helper.make_tensor("zero", elem, [1], [0]))], axis=0)  # [N + 1, C]
    w_pad = g.op("Pad", [weights, _i64(g, [0, 1])])  # [A + 1]: padding slots (assignment A) weigh 0
    names = {v: f"{table}/loop/{v}" for v in ("iter", "cond_in", "acc_in")}
    outer, g.nodes = g.nodes, []
    try:
        slots = g.op("Gather", [table, names["iter"]], axis=0)  # [G, T] assignments
        tile_experts = g.op("Gather", [experts, names["iter"]], axis=0)  # [G]
        rows = g.op("Gather", [x_pad, g.op("Div", [slots, _i64(g, k)])], axis=0)  # [G, T, C]; A // k = N: zero row
        y = _expert_mlp(g, rows, g.op("Gather", [gate_up, tile_experts], axis=0),  # [G, C, 2I]: only these
                        g.op("Gather", [down, tile_experts], axis=0), spec)  # [G, T, C]
        y = g.op("Mul", [y, g.op("Unsqueeze", [g.op("Gather", [w_pad, slots], axis=0), _i64(g, [2])])])
        acc = g.op("ScatterND", [names["acc_in"], g.op("Unsqueeze", [slots, _i64(g, [2])]), y])  # row A: spare
        cond = g.op("Identity", [names["cond_in"]])
        body_nodes = g.nodes
    finally:
        g.nodes = outer
    body = helper.make_graph(
        body_nodes, "expert_tiles",
        [helper.make_tensor_value_info(names["iter"], TensorProto.INT64, []),
         helper.make_tensor_value_info(names["cond_in"], TensorProto.BOOL, []),
         helper.make_tensor_value_info(names["acc_in"], elem, ["moe_assignments_1", c])],
        [helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
         helper.make_tensor_value_info(acc, elem, ["moe_assignments_1", c])])
    acc0 = g.op("ConstantOfShape", [g.op("Concat", [g.op("Shape", [w_pad]), _i64(g, [c])], axis=0)],
                value=helper.make_tensor("zero", elem, [1], [0]))  # [A + 1, C]
    out = g.op("Loop", [n_iter, g.const(True, "bool"), acc0], body=body)
    return g.op("Slice", [out, _i64(g, [0]), g.op("Shape", [weights]), _i64(g, [0])])  # [A, C]


def _expert_mlp(g: GraphBuilder, x: str, gate_up: str, down: str, spec: ModelSpec) -> str:
    """down(act(gate) * up) with gate/up the two halves of x @ gate_up: [.., C] -> [.., C]."""
    i = spec.text.moe.moe_intermediate_size
    h = g.op("MatMul", [x, gate_up])  # [.., 2I]
    gate = g.op("Slice", [h, _i64(g, [0]), _i64(g, [i]), _i64(g, [-1])])
    up = g.op("Slice", [h, _i64(g, [i]), _i64(g, [2 * i]), _i64(g, [-1])])
    return g.op("MatMul", [g.op("Mul", [activation(g, gate, spec.text.hidden_act), up]), down])
