"""Models with external data: loaded after every reference is checked, compressed, and written beside the output."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from onnx_ops import compress
from onnx_ops.errors import InvalidModelError
from onnx_ops.large import save_model
from onnx_ops.validate import Limits, iter_tensors, load_model

import models
from hostile import corpus

FAST = {"latency_runs": 3, "warmup_runs": 1}
PRUNE = {"steps": [{"kind": "prune", "sparsity": 0.5}], "evaluation": FAST}
INT8 = {"steps": [{"kind": "quantize", "mode": "dynamic"}], "evaluation": FAST}


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    """Save as onnx does for users: every tensor in `<name>.data` beside the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        onnx.ModelProto.FromString(model.SerializeToString()),  # onnx.save converts the model it is given
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def _ort(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feed(rows: int = 8, width: int = 64) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((rows, width)).astype(np.float32)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnx_ops.cli", *map(str, args)], capture_output=True, text=True)


# --- loading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [models.mlp, models.conv_net], ids=["initializers", "constant-nodes"])
def test_external_model_loads_with_the_same_tensors(tmp_path, build):
    model = build()
    path = _save_external(model, tmp_path / "m" / "m.onnx")
    assert any(uses_external_data(t) for _, t in iter_tensors(onnx.load(path, load_external_data=False)))
    loaded = load_model(path)
    assert not any(t.external_data for _, t in iter_tensors(loaded))
    expected = {label: numpy_helper.to_array(t) for label, t in iter_tensors(model)}
    got = {label: numpy_helper.to_array(t) for label, t in iter_tensors(loaded)}
    assert got.keys() == expected.keys()
    for label, array in expected.items():
        np.testing.assert_array_equal(got[label], array)


def test_data_file_in_a_subfolder_is_accepted(tmp_path):
    folder = tmp_path / "m"
    (folder / "weights").mkdir(parents=True)
    model, w = _linear_with_external_w(folder, "weights/w.bin")
    path = _write(folder, model)
    np.testing.assert_array_equal(numpy_helper.to_array(load_model(path).graph.initializer[0]), w)


def test_one_data_file_per_tensor_loads_with_few_open_files(tmp_path):
    # As onnx.save(all_tensors_to_one_file=False) and old exporters write big models: more files than a
    # process (here limited to 64) may hold open at once.
    n = 200
    nodes = [helper.make_node("Add", ["x" if i == 0 else f"h{i}", f"c{i}"], [f"h{i + 1}"]) for i in range(n)]
    inits = [numpy_helper.from_array(np.full(4, i, np.float32), f"c{i}") for i in range(n)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(f"h{n}", TensorProto.FLOAT, [4])],
        inits,
    )
    path = tmp_path / "m" / "chain.onnx"
    path.parent.mkdir()
    onnx.save(
        helper.make_model(graph), path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )
    assert len(list(path.parent.iterdir())) == n + 1
    script = (
        "import resource, sys, numpy as np\n"
        "from onnx import numpy_helper\n"
        "from onnx_ops.validate import load_model\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "model = load_model(sys.argv[1])\n"
        "print(sum(float(numpy_helper.to_array(t).sum()) for t in model.graph.initializer))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == 4 * sum(range(n))


# --- hostile references ----------------------------------------------------------------------------------------


def _linear_with_external_w(
    folder: Path, location: str, data_path: Path | None = None
) -> tuple[onnx.ModelProto, np.ndarray]:
    """models.linear() with W (64 x 32 float, 8192 bytes) written to `data_path` and referenced as `location`."""
    model = models.linear()
    w_proto = model.graph.initializer[0]
    w = numpy_helper.to_array(w_proto)
    target = data_path or folder / location
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(w.tobytes())
    _refer(w_proto, location, offset=0, length=w.nbytes)
    return model, w


def _refer(tensor: TensorProto, location: str, **entries: int) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in {"location": location, **{k: str(v) for k, v in entries.items()}}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _write(folder: Path, model: onnx.ModelProto) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _case_parent(folder: Path) -> tuple[onnx.ModelProto, str]:
    return _linear_with_external_w(folder, "../w.bin", folder.parent / "w.bin")[0], r"'W'.*no '\.\.'"


def _case_absolute(folder: Path) -> tuple[onnx.ModelProto, str]:
    target = folder / "w.bin"
    return _linear_with_external_w(folder, str(target), target)[0], "'W'.*not a relative name"


def _case_symlink(folder: Path) -> tuple[onnx.ModelProto, str]:
    outside = folder.parent / "outside" / "w.bin"
    model, _ = _linear_with_external_w(folder, "w.bin", outside)
    (folder / "w.bin").symlink_to(outside)
    return model, "'W'.*symbolic link"


def _case_symlinked_folder(folder: Path) -> tuple[onnx.ModelProto, str]:
    outside = folder.parent / "outside" / "w.bin"
    model, _ = _linear_with_external_w(folder, "sub/w.bin", outside)
    (folder / "sub").symlink_to(outside.parent, target_is_directory=True)
    return model, "'W'.*symbolic link"


def _case_hard_link(folder: Path) -> tuple[onnx.ModelProto, str]:
    model, _ = _linear_with_external_w(folder, "w.bin")
    os.link(folder / "w.bin", folder.parent / "elsewhere.bin")
    return model, "'W'.*2 hard links"


def _bad_range(offset: int, length: int, message: str) -> Callable[[Path], tuple[onnx.ModelProto, str]]:
    """W's reference given this offset and length into its 8192-byte file."""

    def build(folder: Path) -> tuple[onnx.ModelProto, str]:
        model, _ = _linear_with_external_w(folder, "w.bin")
        _refer(model.graph.initializer[0], "w.bin", offset=offset, length=length)
        return model, message

    return build


def _case_model_itself(folder: Path) -> tuple[onnx.ModelProto, str]:
    model, _ = _linear_with_external_w(folder, "m.onnx", folder / "unused.bin")
    _refer(model.graph.initializer[0], "m.onnx", offset=0)
    return model, "'W'.*the model file itself"


def _case_fifo(folder: Path) -> tuple[onnx.ModelProto, str]:
    model, _ = _linear_with_external_w(folder, "pipe", folder / "unused.bin")
    os.mkfifo(folder / "pipe")
    return model, "'W'.*not a regular file"


def _case_missing(folder: Path) -> tuple[onnx.ModelProto, str]:
    model, _ = _linear_with_external_w(folder, "w.bin")
    (folder / "w.bin").unlink()
    return model, "'W'.*does not exist in the model's folder"


def _case_unknown_key(folder: Path) -> tuple[onnx.ModelProto, str]:
    model, _ = _linear_with_external_w(folder, "w.bin")
    entry = model.graph.initializer[0].external_data.add()
    entry.key, entry.value = "basepath", "/"
    return model, "'W'.*unknown key 'basepath'"


def _case_function_default(folder: Path) -> tuple[onnx.ModelProto, str]:
    """A local function's attribute default (read by its Constant via ref_attr_name) is stored at ../w.bin."""
    model = onnx.ModelProto.FromString(corpus.ext_function_attribute_default())
    default = model.functions[0].attribute_proto[0].t
    (folder.parent / "w.bin").write_bytes(bytes(4 * math.prod(default.dims)))
    _refer(default, "../w.bin", offset=0, length=4 * math.prod(default.dims))
    return model, r"Weights \(attribute default\).*no '\.\.'"


HOSTILE = {
    "parent": _case_parent,
    "absolute": _case_absolute,
    "symlink": _case_symlink,
    "symlinked-folder": _case_symlinked_folder,
    "hard-link": _case_hard_link,
    "offset-past-end": _bad_range(8193, 8192, "'W'.*offset 8193 is past the end"),
    "length-past-end": _bad_range(8, 8192, "'W'.*ends past the end of its file"),
    "length-mismatch": _bad_range(0, 4096, "'W'.*length is 4096 bytes but .* need 8192 bytes"),
    "model-itself": _case_model_itself,
    "fifo": _case_fifo,
    "missing": _case_missing,
    "unknown-key": _case_unknown_key,
    "function-attribute-default": _case_function_default,
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_reference_is_refused_naming_the_tensor(tmp_path, name):
    folder = tmp_path / "m"
    folder.mkdir()
    model, message = HOSTILE[name](folder)
    path = _write(folder, model)
    with pytest.raises(InvalidModelError, match=message) as caught:
        load_model(path)
    assert str(tmp_path) not in str(caught.value)


def test_a_long_tensor_name_is_cut_in_the_message(tmp_path):
    folder = tmp_path / "m"
    model, _ = _linear_with_external_w(folder, "../w.bin", tmp_path / "w.bin")
    name = "W" * 100_000
    model.graph.initializer[0].name = name
    model.graph.node[0].input[1] = name
    with pytest.raises(InvalidModelError, match="no '..'") as caught:
        load_model(_write(folder, model))
    assert len(str(caught.value)) < 300


def test_external_data_counts_against_its_own_size_limit(tmp_path):
    folder = tmp_path / "m"
    model, _ = _linear_with_external_w(folder, "w.bin")
    path = _write(folder, model)
    size = path.stat().st_size
    load_model(path, Limits(max_model_bytes=size, max_external_bytes=8192))  # W (32 x 64 floats) fits
    model, _ = _linear_with_external_w(folder, "w.bin")
    path = _write(folder, model)
    with pytest.raises(InvalidModelError, match="'W'.*past the 4096 bytes allowed for a model's data files"):
        load_model(path, Limits(max_external_bytes=4096))


def test_service_limits_refuse_external_data_asking_for_a_bundle(tmp_path):
    folder = tmp_path / "m"
    model, _ = _linear_with_external_w(folder, "w.bin")
    with pytest.raises(InvalidModelError, match="'W' refers to external data.*bundle"):
        load_model(_write(folder, model), Limits(allow_external_data=False))


def test_a_model_proto_with_external_references_asks_for_its_path(tmp_path):
    model, _ = _linear_with_external_w(tmp_path, "w.bin")
    with pytest.raises(InvalidModelError, match="'W' refers to external data.*give the path"):
        compress(model, PRUNE)


# --- compressing and writing -----------------------------------------------------------------------------------


def test_library_prunes_an_external_model_like_the_self_contained_one(tmp_path):
    model = models.mlp()
    single = tmp_path / "single.onnx"
    onnx.save(model, single)
    external = _save_external(model, tmp_path / "ext" / "m.onnx")
    from_external = compress(external, PRUNE)
    from_single = compress(single, PRUNE)
    assert from_external.report.before.parameters == from_single.report.before.parameters
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    assert from_external.save(out, external_data=True) is True
    assert (out.parent / "small.onnx.data").is_file()
    saved = onnx.load(out, load_external_data=False)
    locations = {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"small.onnx.data"}
    want = _ort_bytes(from_single.model).run(None, _feed())
    got = _ort(out).run(None, _feed())
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
    assert load_model(out).graph.initializer  # our own output passes our own checks


def test_library_quantizes_an_external_model(tmp_path):
    external = _save_external(models.mlp(), tmp_path / "m.onnx")
    result = compress(external, INT8)
    (before,) = _ort(external).run(None, _feed())
    (after,) = _ort_bytes(result.model).run(None, _feed())
    assert _cosine(before, after) > 0.99
    assert result.report.agreement.outputs[0].cosine > 0.99


def test_cli_compresses_an_external_model_and_writes_external_data_on_request(tmp_path):
    model = models.mlp()
    external = _save_external(model, tmp_path / "in" / "m.onnx")
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    proc = _cli("compress", external, "-o", out, "--plan", json.dumps(PRUNE), "--external-data")
    assert proc.returncode == 0, proc.stderr
    assert (out.parent / "small.onnx.data").is_file()
    assert any(uses_external_data(t) for t in onnx.load(out, load_external_data=False).graph.initializer)
    single = tmp_path / "single.onnx"
    onnx.save(model, single)
    want = _ort_bytes(compress(single, PRUNE).model).run(None, _feed())
    for a, b in zip(want, _ort(out).run(None, _feed()), strict=True):
        np.testing.assert_array_equal(a, b)

    int8 = tmp_path / "out" / "int8.onnx"
    proc = _cli("compress", external, "-o", int8, "--plan", json.dumps(INT8))
    assert proc.returncode == 0, proc.stderr
    assert not (int8.parent / "int8.onnx.data").exists()  # small enough for one file
    assert _cli("inspect", external).returncode == 0
    (before,) = _ort(external).run(None, _feed())
    (after,) = _ort(int8).run(None, _feed())
    assert _cosine(before, after) > 0.99


def test_cli_refuses_a_hostile_reference_without_a_path_in_the_message(tmp_path):
    folder = tmp_path / "m"
    model, _ = _linear_with_external_w(folder, "../w.bin", tmp_path / "w.bin")
    proc = _cli("compress", _write(folder, model), "-o", tmp_path / "o.onnx", "--plan", json.dumps(PRUNE))
    assert proc.returncode == 2
    assert "error (invalid_model): tensor 'W': external data location '../w.bin'" in proc.stderr
    assert str(tmp_path) not in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_save_model_overwrites_its_data_file_and_stays_single_when_small(tmp_path):
    model = models.mlp()
    path = tmp_path / "m.onnx"
    assert save_model(model, path, external_data=True) is True
    first = (tmp_path / "m.onnx.data").stat().st_size
    assert save_model(model, path, external_data=True) is True
    assert (tmp_path / "m.onnx.data").stat().st_size == first  # replaced, not appended to
    want = _ort_bytes(model).run(None, _feed())
    for a, b in zip(want, _ort(path).run(None, _feed()), strict=True):
        np.testing.assert_array_equal(a, b)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not to be touched")
    (tmp_path / "m.onnx.data").unlink()
    (tmp_path / "m.onnx.data").symlink_to(outside)  # a link planted where the data file goes is replaced
    save_model(model, path, external_data=True)
    assert not (tmp_path / "m.onnx.data").is_symlink()
    assert outside.read_bytes() == b"not to be touched"
    outside.unlink()
    single = tmp_path / "single.onnx"
    assert save_model(model, single) is False
    assert not (tmp_path / "single.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "single.onnx"]  # no temp left


def _ort_bytes(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
