"""`--compact-weights`: store a graph's weights in fewer bytes without changing one bit of what it
computes.

Two lossless rewrites of an exported `.onnx` file:
- A float32 weight whose every value is exactly a float16 (all of them, when the checkpoint was saved
  in fp16 and loaded into fp32, as published SD checkpoints usually are) is stored as float16 and
  cast back to float32 by a `Cast` node. Both runtimes fold the cast when they load the graph, so the
  graph computes in float32 on the very same values: half the file, same results.
- An embedding table (a `Gather` from a weight of many rows) whose rows are almost all zero (a token
  table where only a small vocabulary was ever trained) is stored as its non-zero rows plus one zero
  row, reached through a per-token index map: `table[ids]` becomes `rows[map[ids]]`, equal for every
  id, negative ones included.

Both keep the graph's inputs and outputs, so the manifest and the runtime do not change.

`--strip-names` (`strip_names`): the exporter names every node and intermediate tensor after the
module path it came from ("/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul"),
and records their shapes as value_info. In a small model that text outweighs the weights (tiny-sd1's
UNet: 0.6 MB of weights in a 1.6 MB file). Stripping drops node names, doc strings and value_info
and renames intermediate tensors to `v0`, `v1`, ... in graph order; inputs, outputs and weights keep
their names, and the nodes, their order and their attributes are untouched, so the graph computes
exactly the same. The cost: ONNX Runtime's error messages then name no node. Used for the small
committed sets, where bytes matter; a real checkpoint's graph keeps its names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_ELEMENTS = 16  # smaller weights are not worth a node
TABLE_MIN_ROWS = 1024
TABLE_MAX_USED = 0.05  # compact a table when at most this share of its rows is non-zero


def compact_graph(path: Path, weights: bool = True, names: bool = False) -> Path:
    """Rewrite `path` in place (graphs without external data only): compact weights and/or strip
    names; returns it."""
    model = onnx.load(str(path))
    if weights:
        _compact_tables(model.graph)
        _fp16_storage(model.graph)
    if names:
        strip_names(model)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))
    return path


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _compact_tables(graph: onnx.GraphProto) -> None:
    inits = _initializers(graph)
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    new_nodes = []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or axis != 0 or len(table.dims) != 2 or table.dims[0] < TABLE_MIN_ROWS or consumers[table.name] != 1:
            new_nodes.append(node)
            continue
        values = numpy_helper.to_array(table)
        # by bits: a row of -0.0 is not a zero row
        used = np.flatnonzero(np.ascontiguousarray(values).view(np.uint8).reshape(values.shape[0], -1).any(axis=1))
        if len(used) > TABLE_MAX_USED * values.shape[0]:
            new_nodes.append(node)
            continue
        index = np.zeros(values.shape[0], dtype=np.uint8 if len(used) < 255 else np.int32)
        index[used] = np.arange(1, len(used) + 1)
        rows = np.concatenate([np.zeros_like(values[:1]), values[used]])
        map_name, rows_name, ids_name = f"{table.name}.row_map", f"{table.name}.rows", f"{table.name}.row_ids"
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(index, map_name), numpy_helper.from_array(rows, rows_name)])
        mapped = f"{ids_name}.narrow"
        new_nodes.append(helper.make_node("Gather", [map_name, node.input[1]], [mapped], name=f"{node.name}.map", axis=0))
        new_nodes.append(helper.make_node("Cast", [mapped], [ids_name], name=f"{node.name}.map_cast", to=onnx.TensorProto.INT64))
        new_nodes.append(helper.make_node("Gather", [rows_name, ids_name], list(node.output), name=node.name, axis=0))
    del graph.node[:]
    graph.node.extend(new_nodes)


def _fp16_storage(graph: onnx.GraphProto) -> None:
    casts = []
    for i, t in enumerate(list(graph.initializer)):
        if t.data_type != onnx.TensorProto.FLOAT or int(np.prod(t.dims)) < MIN_ELEMENTS:
            continue
        values = numpy_helper.to_array(t)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32).view(np.uint32), values.view(np.uint32)):
            continue  # not exactly representable: stays float32
        name = t.name
        stored = numpy_helper.from_array(half, f"{name}.fp16")
        graph.initializer[i].CopyFrom(stored)  # `t` is that same message: read its name first
        casts.append(helper.make_node("Cast", [stored.name], [name], name=f"{name}.cast", to=onnx.TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def strip_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop node names, doc strings and value_info; rename intermediate tensors `v0`, `v1`, ... in the
    order the nodes first mention them (deterministic). Graph inputs, outputs and initializers keep
    their names. Subgraphs (If, Loop, Scan bodies) are walked with the same renaming, their own
    inputs and outputs included, so references to outer values stay consistent."""
    graph = model.graph
    kept = {v.name for v in [*graph.input, *graph.output]} | {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in kept:
            return name  # "" is an omitted optional input or output
        if name not in renamed:
            renamed[name] = f"v{len(renamed)}"
        return renamed[name]

    def walk(g: onnx.GraphProto, top: bool) -> None:
        if not top:
            for v in [*g.input, *g.output]:
                v.name = rename(v.name)
            for t in g.initializer:
                t.name = rename(t.name)
        for node in g.node:
            node.name = ""
            node.doc_string = ""
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, False)
                for sub in a.graphs:
                    walk(sub, False)
        del g.value_info[:]
        g.doc_string = ""

    walk(graph, True)
    model.doc_string = ""
    return model
