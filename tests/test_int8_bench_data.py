"""The static int8 benchmark's detector cases: calibrated on other inputs than evaluated, scored on boxes."""

from __future__ import annotations

import numpy as np
import pytest

from bench import int8_recovery, tasks


def _disjoint(calibration: np.ndarray, evaluation: list[np.ndarray]) -> bool:
    evaluated = {sample.tobytes() for sample in evaluation}
    return len(calibration) >= 2 and not any(sample.tobytes() in evaluated for sample in calibration)


@pytest.mark.realmodel
@pytest.mark.parametrize("key", ["rapidocr_det", "ddddocr_det"])
def test_detector_cases_calibrate_on_other_inputs_than_they_evaluate(key: str) -> None:
    case = int8_recovery.CASES[key]()
    (name,) = case.calibration
    assert _disjoint(case.calibration[name], [feed[name] for feed in case.evaluation])


@pytest.mark.realmodel
def test_detector_task_calibrates_on_other_pages() -> None:
    task = tasks.ocr_det()
    assert _disjoint(task.calibration["x"], list(task.evaluation["x"]))


def test_text_boxes_and_box_f1_against_a_reference_map() -> None:
    ref = np.zeros((1, 1, 40, 40), np.float32)
    ref[0, 0, 5:10, 5:30] = 0.9  # two text regions
    ref[0, 0, 20:26, 8:20] = 0.9
    ref[0, 0, 35, 35] = 0.9  # a speck: not a box
    same = int8_recovery._box_f1(lambda out: int8_recovery._text_boxes(out[0, 0]), [[ref]], [[ref]])
    assert int8_recovery._text_boxes(ref[0, 0]).tolist() == [[5, 5, 30, 10], [8, 20, 20, 26]]
    assert same == (100.0, 100.0)
    lost = ref.copy()
    lost[0, 0, 20:26, 8:20] = 0.1  # the second region falls under the threshold
    f1, iou = int8_recovery._box_f1(lambda out: int8_recovery._text_boxes(out[0, 0]), [[lost]], [[ref]])
    assert f1 == pytest.approx(100.0 * 2 / 3) and iou == 100.0


def test_noise_floor_row_scores_fp32_against_itself_under_one_grey_level(tmp_path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
    )  # fmt: skip
    path = tmp_path / "relu.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    feeds = [{"x": np.linspace(-1, 1, 64, dtype=np.float32)[None]}]

    def agreement(outs: list, ref: list) -> float:  # share of the 64 decisions (> 0.5) that stay
        return 100.0 * float(np.mean([(o[0] > 0.5) == (r[0] > 0.5) for o, r in zip(outs, ref, strict=True)]))

    case = int8_recovery.Case("relu", path, {"x": feeds[0]["x"][None]}, feeds, {"x": [1, 64]}, "agree %", agreement)
    assert [row["variant"] for row in int8_recovery.measure(case, [])] == ["fp32"]
    case.grey_level = 0.2  # decisions near 0.5 flip, the others stay
    rows = list(int8_recovery.measure(case, []))
    assert [row["variant"] for row in rows] == ["fp32", "fp32, noise 1 grey"]
    assert rows[0]["score"] == 100.0 and 50.0 < rows[1]["score"] < 100.0
