"""A small real classifier for accuracy tests: an sklearn MLP trained on the bundled digits data, as ONNX.

``load_digits`` ships with scikit-learn (1,797 8x8 images, 10 classes), so nothing is downloaded. The
model is trained once per test session (about 1 s) and converted with skl2onnx without ZipMap, so its
outputs are ``label`` (int64 [N]) and ``probabilities`` (float [N, 10]).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import numpy as np
import onnx


@dataclasses.dataclass(frozen=True)
class Digits:
    """The trained classifier as ONNX plus the data it was trained and is tested on."""

    model: onnx.ModelProto
    x_train: np.ndarray  # float32 [n, 64], pixels scaled to [0, 1]
    y_train: np.ndarray  # int64 [n]
    x_test: np.ndarray
    y_test: np.ndarray
    sklearn_accuracy: float

    def feeds(self, x: np.ndarray) -> list[dict[str, np.ndarray]]:
        """One feed dict per sample (a batch of one), as calibration data is given to passes."""
        name = self.model.graph.input[0].name
        return [{name: row[None, :]} for row in x]


@functools.cache
def digits(hidden: tuple[int, ...] = (128, 64), seed: int = 0) -> Digits:
    """Train (once per session) an MLPClassifier on 75% of digits; the other 25% is held out."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=300, random_state=seed)
    # One BLAS thread: with other test processes on the machine, more threads made fitting 14x slower.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    model = to_onnx(clf, x_train[:1], options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.checker.check_model(model, full_check=True)
    return Digits(
        model, x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), float(clf.score(x_test, y_test))
    )
