"""Tiny ONNX models built with onnx.helper for the tests; each passes the full checker."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _finish(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def linear(k: int = 64, n: int = 32, seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """y = x @ W + b."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    b = rng.standard_normal(n).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        [_init("W", w), _init("b", b)],
    )
    return _finish(graph)


def low_rank_linear(k: int = 64, n: int = 64, rank: int = 8, seed: int = 0) -> onnx.ModelProto:
    """y = x @ W with W of exactly the given rank."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n))).astype(np.float32) / k
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "low_rank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [_init("W", w)],
    )
    return _finish(graph)


def mlp(sizes: tuple[int, ...] = (64, 128, 128, 10), seed: int = 0, gemm: bool = False) -> onnx.ModelProto:
    """A ReLU MLP of MatMul+Add (or Gemm with transB=1) layers ending in logits."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (k, n) in enumerate(itertools.pairwise(sizes)):
        w = rng.standard_normal((k, n)).astype(np.float32) * np.sqrt(2.0 / k)
        b = rng.standard_normal(n).astype(np.float32) * 0.05
        out = "logits" if i == len(sizes) - 2 else f"h{i}"
        pre = out if i == len(sizes) - 2 else f"z{i}"
        if gemm:
            inits += [_init(f"W{i}", w.T), _init(f"b{i}", b)]
            nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [pre], name=f"fc{i}", transB=1))
        else:
            inits += [_init(f"W{i}", w), _init(f"b{i}", b)]
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [pre], name=f"bias{i}"))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    return _finish(graph)


def conv_net(seed: int = 0, opset: int = 11, constant_weights: bool = True) -> onnx.ModelProto:
    """Conv-BN-ReLU x2, global pool, flatten, Gemm: like an exported CNN (old opset, Constant-node weights)."""
    rng = np.random.default_rng(seed)
    c1, c2, classes = 16, 32, 10
    w1 = rng.standard_normal((c1, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((c2, c1, 3, 3)).astype(np.float32) * 0.1
    fc = rng.standard_normal((classes, c2)).astype(np.float32) * 0.2
    nodes, inits = [], []

    def weight(name: str, array: np.ndarray) -> None:
        if constant_weights:
            nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [name],
                    name=f"const_{name}",
                    value=numpy_helper.from_array(array.astype(np.float32), name),
                )
            )
        else:
            inits.append(_init(name, array))

    for i, (w, c) in enumerate(((w1, c1), (w2, c2))):
        weight(f"conv{i}.W", w)
        inits += [
            _init(f"bn{i}.scale", 1 + 0.1 * rng.standard_normal(c)),
            _init(f"bn{i}.bias", 0.1 * rng.standard_normal(c)),
            _init(f"bn{i}.mean", 0.1 * rng.standard_normal(c)),
            _init(f"bn{i}.var", 1 + 0.1 * rng.random(c)),
        ]
        src = "image" if i == 0 else f"act{i - 1}"
        nodes += [
            helper.make_node("Conv", [src, f"conv{i}.W"], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization",
                [f"conv{i}", f"bn{i}.scale", f"bn{i}.bias", f"bn{i}.mean", f"bn{i}.var"],
                [f"bn{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"bn{i}"], [f"act{i}"], name=f"relu{i}"),
        ]
    weight("fc.W", fc)
    inits.append(_init("fc.b", 0.1 * rng.standard_normal(classes)))
    nodes += [
        helper.make_node("GlobalAveragePool", ["act1"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    return _finish(graph, opset=opset)


def lstm(seed: int = 0, hidden: int = 32, features: int = 16) -> onnx.ModelProto:
    """LSTM over [seq, batch, features] followed by a MatMul head on the last hidden state."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((1, 4 * hidden, features)).astype(np.float32) * 0.2
    r = rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.2
    b = np.zeros((1, 8 * hidden), np.float32)
    head = rng.standard_normal((hidden, 5)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h"], name="lstm", hidden_size=hidden),
        helper.make_node("Squeeze", ["h", "axes0"], ["h2"], name="squeeze"),
        helper.make_node("MatMul", ["h2", "head"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [
            _init("W", w),
            _init("R", r),
            _init("B", b),
            _init("head", head),
            numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        ],
    )
    return _finish(graph)


def residual_mlp(seed: int = 0, width: int = 64, inner: int = 128) -> onnx.ModelProto:
    """x -> fc_in -> relu -> h; h + fc_b(relu(fc_a(h))) -> fc_out.

    fc_a is structurally prunable; fc_in and fc_b feed the residual Add.
    """
    rng = np.random.default_rng(seed)

    def w(k: int, n: int) -> np.ndarray:
        return rng.standard_normal((k, n)) * np.sqrt(2.0 / k)

    nodes = [
        helper.make_node("MatMul", ["x", "W_in"], ["h0"], name="fc_in"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu_in"),
        helper.make_node("MatMul", ["h", "W_a"], ["a0"], name="fc_a"),
        helper.make_node("Add", ["a0", "b_a"], ["a1"], name="bias_a"),
        helper.make_node("Relu", ["a1"], ["a"], name="relu_a"),
        helper.make_node("MatMul", ["a", "W_b"], ["r"], name="fc_b"),
        helper.make_node("Add", ["h", "r"], ["s"], name="residual"),
        helper.make_node("MatMul", ["s", "W_out"], ["logits"], name="fc_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [
            _init("W_in", w(32, width)),
            _init("W_a", w(width, inner)),
            _init("b_a", 0.05 * rng.standard_normal(inner)),
            _init("W_b", w(inner, width)),
            _init("W_out", w(width, 10)),
        ],
    )
    return _finish(graph)


def conv_pool_net(seed: int = 0) -> onnx.ModelProto:
    """Opset-17 CNN: Conv(+B), SiLU, MaxPool, Conv, Add[1,C,1,1], Clip, depthwise Conv, Relu, pool, Gemm.

    conv_a is prunable (its chain ends in conv_b), conv_b too (through the depthwise conv_dw to fc); conv_dw is not.
    """
    rng = np.random.default_rng(seed)
    ca, cb, classes = 16, 32, 10
    nodes = [
        helper.make_node("Conv", ["image", "Wa", "Ba"], ["ya"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["ya"], ["sa"], name="sig_a"),
        helper.make_node("Mul", ["ya", "sa"], ["silu_a"], name="silu_a"),
        helper.make_node("MaxPool", ["silu_a"], ["pa"], name="pool_a", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pa", "Wb"], ["yb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["yb", "Bb"], ["zb"], name="bias_b"),
        helper.make_node("Clip", ["zb", "lo", "hi"], ["cb"], name="clip_b"),
        helper.make_node("Conv", ["cb", "Wdw"], ["ydw"], name="conv_dw", group=cb, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ydw"], ["rdw"], name="relu_dw"),
        helper.make_node("GlobalAveragePool", ["rdw"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "Wfc", "Bfc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_pool_net",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [
            _init("Wa", 0.3 * rng.standard_normal((ca, 3, 3, 3))),
            _init("Ba", 0.1 * rng.standard_normal(ca)),
            _init("Wb", 0.1 * rng.standard_normal((cb, ca, 3, 3))),
            _init("Bb", 0.1 * rng.standard_normal((1, cb, 1, 1))),
            _init("lo", np.array(0.0)),
            _init("hi", np.array(6.0)),
            _init("Wdw", 0.3 * rng.standard_normal((cb, 1, 3, 3))),
            _init("Wfc", 0.2 * rng.standard_normal((cb, classes))),
            _init("Bfc", 0.1 * rng.standard_normal(classes)),
        ],
    )
    return _finish(graph)


def gelu_bn_mlp(seed: int = 0, sizes: tuple[int, int, int] = (32, 64, 10)) -> onnx.ModelProto:
    """MatMul, BatchNormalization, GELU as Div/Erf/Add/Mul with scalar constants, Dropout, MatMul+Add."""
    rng = np.random.default_rng(seed)
    k, h, n = sizes
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["z"], name="fc1"),
        helper.make_node("BatchNormalization", ["z", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["zn"], name="bn"),
        helper.make_node("Div", ["zn", "sqrt2"], ["d"], name="gelu_div"),
        helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
        helper.make_node("Mul", ["zn", "e1"], ["m"], name="gelu_mul"),
        helper.make_node("Mul", ["m", "half"], ["g"], name="gelu_half"),
        helper.make_node("Dropout", ["g"], ["dr", "dr_mask"], name="dropout"),  # unused mask output
        helper.make_node("MatMul", ["dr", "W2"], ["y0"], name="fc2"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="bias2"),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu_bn_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [
            _init("W1", rng.standard_normal((k, h)) / np.sqrt(k)),
            _init("bn.scale", 1 + 0.1 * rng.standard_normal(h)),
            _init("bn.bias", 0.1 * rng.standard_normal(h)),
            _init("bn.mean", 0.1 * rng.standard_normal(h)),
            _init("bn.var", 1 + 0.1 * rng.random(h)),
            _init("sqrt2", np.array(np.sqrt(2.0))),
            _init("one", np.array(1.0)),
            _init("half", np.array(0.5)),
            _init("W2", rng.standard_normal((h, n)) / np.sqrt(h)),
            _init("b2", 0.1 * rng.standard_normal(n)),
        ],
    )
    return _finish(graph)


def _matrix(rng: np.random.Generator, k: int, n: int, spectrum: str | int = "flat") -> np.ndarray:
    """A k x n weight: "flat" Gaussian, "decay" (singular values exp(-i/8)), or an int: exactly that rank."""
    if isinstance(spectrum, int):
        return rng.standard_normal((k, spectrum)) @ rng.standard_normal((spectrum, n)) / np.sqrt(k * spectrum)
    if spectrum == "flat":
        return rng.standard_normal((k, n)) / np.sqrt(k)
    m = min(k, n)
    u, v = np.linalg.qr(rng.standard_normal((k, m)))[0], np.linalg.qr(rng.standard_normal((n, m)))[0]
    return (u * np.exp(-np.arange(m) / 8.0)) @ v.T


def gemm(
    k: int = 64,
    n: int = 48,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: str = "row",
    spectrum: str | int = 8,
    batch: int = 4,
    seed: int = 0,
) -> onnx.ModelProto:
    """y = alpha * A' @ B' + beta * C, with A [batch, k] (or [k, batch] when trans_a) and constant B, C.

    bias: "row" (C [n]), "scalar" (C [1]), "full" (C [batch, n]) or "none" (no C input).
    """
    rng = np.random.default_rng(seed)
    w = _matrix(rng, k, n, spectrum)
    inits = [_init("B", w.T if trans_b else w)]
    shapes = {"row": [n], "scalar": [1], "full": [batch, n]}
    inputs = ["A", "B"]
    if bias != "none":
        inits.append(_init("C", rng.standard_normal(shapes[bias])))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [k, batch] if trans_a else [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        inits,
    )
    return _finish(graph)


def left_matmul(m: int = 48, k: int = 64, spectrum: str | int = 8, seed: int = 0) -> onnx.ModelProto:
    """y = W @ x with the constant W [m, k] on the LEFT and x [N, k, 5] (broadcast over N)."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")],
        "left_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m, 5])],
        [_init("W", _matrix(rng, m, k, spectrum))],
    )
    return _finish(graph)


def transformer_ffn(hidden: int = 64, ffn: int = 256, spectrum: str | int = "decay", seed: int = 0) -> onnx.ModelProto:
    """A transformer feed-forward block on [batch, seq, hidden]: MatMul+Add, Relu, MatMul+Add."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="ffn.fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="ffn.bias1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="ffn.relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="ffn.fc2"),
        helper.make_node("Add", ["h3", "b2"], ["y"], name="ffn.bias2"),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer_ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [
            _init("W1", _matrix(rng, hidden, ffn, spectrum) * 4),
            _init("b1", 0.1 * rng.standard_normal(ffn)),
            _init("W2", _matrix(rng, ffn, hidden, spectrum) * 4),
            _init("b2", 0.1 * rng.standard_normal(hidden)),
        ],
    )
    return _finish(graph)


def shared_weight(k: int = 64, spectrum: str | int = 8, seed: int = 0) -> onnx.ModelProto:
    """y = (x @ W) @ W: one square weight used by two MatMuls (as in ALBERT's shared layers)."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm0"),
            helper.make_node("MatMul", ["h", "W"], ["y"], name="mm1"),
        ],
        "shared_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", k])],
        [_init("W", _matrix(rng, k, k, spectrum))],
    )
    return _finish(graph)


def tiny_encoder(
    vocab: int = 512, hidden: int = 64, ffn: int = 256, seed: int = 0, decoder_seq: int | None = None
) -> onnx.ModelProto:
    """A one-layer transformer encoder on token ids: embedding Gather, self-attention, FFN, LayerNorms, a Gemm pooler.

    Outputs the hidden states [batch, seq, hidden] and a pooled embedding [batch, hidden] (mean over the sequence,
    then a Gemm with transB and a bias, as exporters write a pooler or classifier head). With decoder_seq, a
    decoder on that many tokens instead: a causal mask of -3.4e38 (as PyTorch exports write it) on the attention
    scores and an untied language-model head, whose logits [batch, seq, vocab] replace the pooled output.
    """
    rng = np.random.default_rng(seed)

    def dense(k: int, n: int) -> np.ndarray:
        return rng.standard_normal((k, n)) / np.sqrt(k)

    def matmul_add(x: str, w: str, out: str) -> list[onnx.NodeProto]:
        return [helper.make_node("MatMul", [x, w], [f"{out}_mm"], name=f"{out}.matmul"),
                helper.make_node("Add", [f"{out}_mm", f"{w}_b"], [out], name=f"{out}.bias")]  # fmt: skip

    def layer_norm(x: str, out: str) -> onnx.NodeProto:
        return helper.make_node("LayerNormalization", [x, "ln_g", "ln_b"], [out], name=f"{out}.ln", axis=-1)

    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["emb"], name="embeddings", axis=0),
        layer_norm("emb", "x0"),
        *matmul_add("x0", "Wq", "q"), *matmul_add("x0", "Wk", "k"), *matmul_add("x0", "Wv", "v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="attn.kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores_raw"], name="attn.scores"),
        helper.make_node("Mul", ["scores_raw", "attn_scale"], ["scores_unmasked" if decoder_seq else "scores"],
                         name="attn.scale"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="attn.softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="attn.context"),
        *matmul_add("ctx", "Wo", "attn_out"),
        helper.make_node("Add", ["x0", "attn_out"], ["res1"], name="attn.residual"),
        layer_norm("res1", "x1"),
        *matmul_add("x1", "W1", "ffn_h"),
        helper.make_node("Relu", ["ffn_h"], ["ffn_a"], name="ffn.relu"),
        *matmul_add("ffn_a", "W2", "ffn_out"),
        helper.make_node("Add", ["x1", "ffn_out"], ["res2"], name="ffn.residual"),
        layer_norm("res2", "hidden"),
        helper.make_node("ReduceMean", ["hidden"], ["mean"], name="pool.mean", axes=[1], keepdims=0),
        helper.make_node("Gemm", ["mean", "Wp", "Wp_b"], ["pooled"], name="pooler", transB=1, alpha=0.5),
    ]  # fmt: skip
    seq: int | str = "seq"
    last = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", hidden])
    extra = []
    if decoder_seq:
        seq = decoder_seq
        nodes = [*nodes[:-2], helper.make_node("MatMul", ["hidden", "W_lm"], ["logits"], name="lm_head")]
        at = next(i for i, n in enumerate(nodes) if n.name == "attn.scale") + 1
        nodes.insert(at, helper.make_node("Add", ["scores_unmasked", "causal"], ["scores"], name="attn.mask"))
        last = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, vocab])
        mask = np.triu(np.full((seq, seq), np.finfo(np.float32).min), 1)
        extra = [_init("W_lm", rng.standard_normal((hidden, vocab)) / np.sqrt(hidden)), _init("causal", mask)]
    weights = {"Wq": (hidden, hidden), "Wk": (hidden, hidden), "Wv": (hidden, hidden), "Wo": (hidden, hidden),
               "W1": (hidden, ffn), "W2": (ffn, hidden)}  # fmt: skip
    inits = [_init("embed", rng.standard_normal((vocab, hidden))), _init("ln_g", 1 + 0.1 * rng.standard_normal(hidden)),
             _init("ln_b", 0.1 * rng.standard_normal(hidden)), _init("attn_scale", np.array(hidden**-0.5)),
             _init("Wp", dense(hidden, hidden).T), _init("Wp_b", 0.1 * rng.standard_normal(hidden))]  # fmt: skip
    for name, (k, n) in weights.items():
        inits += [_init(name, dense(k, n)), _init(f"{name}_b", 0.1 * rng.standard_normal(n))]
    graph = helper.make_graph(
        nodes,
        "tiny_decoder" if decoder_seq else "tiny_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", seq, hidden]), last],
        [i for i in inits if not (decoder_seq and i.name.startswith("Wp"))] + extra,
    )
    return _finish(graph)
