#!/usr/bin/env python3
"""Makes Driftgate's sample models, their self-test cases and their data, byte for byte.

Every model is trained on a dataset that ships inside scikit-learn (nothing is downloaded),
exported to ONNX, and run once with onnxruntime to record self-test expectations. Training,
splits and shifts are seeded and single-threaded, so two runs write identical files; the list
of files and their sha256 goes to SHA256SUMS.

    pip install -r models/requirements.txt
    python3 models/make.py [--out DIR]
"""

import os

# Single-threaded BLAS before numpy loads: multi-threaded reductions are not bit-reproducible.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse
import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import skl2onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

SPLIT_SEED = 0
SHIFT_SEED = 1234
SELF_TEST_ROWS = 8
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
TOLERANCE = {"abs": 0.0001, "rel": 0.001}
KSERVE_TYPES = {
    np.dtype("float32"): "FP32",
    np.dtype("float64"): "FP64",
    np.dtype("int64"): "INT64",
    np.dtype("int32"): "INT32",
    np.dtype("bool"): "BOOL",
    np.dtype("uint8"): "UINT8",
}


def log(message):
    print(message, flush=True)


class Writer:
    """Writes files under the output directory and remembers them for SHA256SUMS."""

    def __init__(self, root):
        self.root = Path(root)
        self.written = {}

    def bytes(self, rel, data):
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written[rel] = hashlib.sha256(data).hexdigest()
        log(f"  wrote {rel} ({len(data)} bytes)")

    def json(self, rel, value):
        self.bytes(rel, (json.dumps(value, indent=1) + "\n").encode())

    def npy(self, rel, array):
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.bytes(rel, buf.getvalue())

    def csv(self, rel, array, header):
        lines = [",".join(header)]
        lines += [",".join("%.9g" % v for v in row) for row in array]
        self.bytes(rel, ("\n".join(lines) + "\n").encode())

    def sums(self):
        lines = [f"{digest}  {rel}" for rel, digest in sorted(self.written.items())]
        (self.root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
        log(f"  wrote SHA256SUMS ({len(lines)} files)")


# ---------------------------------------------------------------------------------------------
# Data


def split(X, y):
    return train_test_split(
        X.astype(np.float32), y.astype(np.int64),
        test_size=0.25, stratify=y, random_state=SPLIT_SEED,
    )


def shifts(X_train, X_hold, y_hold, important):
    """Shifted variants of the held-out split, for the drift detector to catch."""
    rng = np.random.default_rng(SHIFT_SEED)
    sigma = X_train.std(axis=0)
    noise = (X_hold + rng.normal(0.0, 0.5, X_hold.shape) * sigma).astype(np.float32)
    mean = X_hold.copy()
    mean[:, important] += sigma[important]
    # Class-prior shift: half the rows from one class, the rest as before, same length.
    dominant = int(np.bincount(y_hold).argmax())
    n = len(y_hold)
    from_dominant = rng.choice(np.flatnonzero(y_hold == dominant), n // 2, replace=True)
    from_rest = rng.choice(np.arange(n), n - n // 2, replace=True)
    rows = np.concatenate([from_dominant, from_rest])
    rng.shuffle(rows)
    return {
        "noise": noise,
        "mean": mean.astype(np.float32),
        "prior": (X_hold[rows], y_hold[rows]),
        "params": {
            "noise_sigma_fraction": 0.5,
            "mean_shift_sigmas": 1.0,
            "prior_dominant_class": dominant,
            "prior_dominant_share": 0.5,
        },
    }


def write_dataset(w, name, feature_names, class_names, X_tr, y_tr, X_ho, y_ho, important, how):
    base = f"data/{name}"
    w.npy(f"{base}/train.X.npy", X_tr)
    w.npy(f"{base}/train.y.npy", y_tr)
    w.npy(f"{base}/holdout.X.npy", X_ho)
    w.npy(f"{base}/holdout.y.npy", y_ho)
    w.csv(f"{base}/train.csv", X_tr, feature_names)
    w.csv(f"{base}/holdout.csv", X_ho, feature_names)
    s = shifts(X_tr, X_ho, y_ho, important)
    w.npy(f"{base}/shift-noise.X.npy", s["noise"])
    w.npy(f"{base}/shift-mean.X.npy", s["mean"])
    w.npy(f"{base}/shift-prior.X.npy", s["prior"][0])
    w.npy(f"{base}/shift-prior.y.npy", s["prior"][1])
    w.json(f"{base}/meta.json", {
        "dataset": name,
        "features": list(feature_names),
        "classes": list(class_names),
        "train_rows": int(len(y_tr)),
        "holdout_rows": int(len(y_ho)),
        "train_sigma": [round(float(v), 6) for v in X_tr.std(axis=0)],
        "most_important_feature": {"index": int(important), "name": feature_names[important], "how": how},
        "shifts": s["params"],
        "seeds": {"split": SPLIT_SEED, "shifts": SHIFT_SEED},
    })


def most_important(model, X, y):
    result = permutation_importance(model, X, y, n_repeats=5, random_state=0, n_jobs=1)
    return int(np.argmax(result.importances_mean))


# ---------------------------------------------------------------------------------------------
# Models


def sklearn_to_onnx(model, n_features, name):
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        target_opset=TARGET_OPSET,
        options={MLPClassifier: {"zipmap": False}, RandomForestClassifier: {"zipmap": False},
                 LogisticRegression: {"zipmap": False},
                 # Sub/Div instead of ai.onnx.ml Scaler, which tract does not implement.
                 StandardScaler: {"div": "div"}},
    )
    # Name the batch dimension, so every runtime sees the same symbol.
    for value in onx.graph.input:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    onx.producer_version = skl2onnx.__version__
    onx.graph.name = name  # skl2onnx picks a random UUID otherwise
    return onx


def train_cnn(X_train, y_train):
    """A small CNN trained with plain numpy: Conv3x3(1→8) → ReLU → MaxPool2 → Dense(128→10)."""
    rng = np.random.default_rng(7)
    W1 = (rng.normal(0, np.sqrt(2 / 9), (8, 9))).astype(np.float64)
    b1 = np.zeros(8)
    W2 = (rng.normal(0, np.sqrt(2 / 128), (128, 10))).astype(np.float64)
    b2 = np.zeros(10)

    def patches(images):  # [N,8,8] → [N,64,9], patch index dy*3+dx
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
        cols = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)]
        return np.stack(cols, axis=-1).reshape(len(images), 64, 9)

    def forward(images):
        P = patches(images)
        conv = (P @ W1.T + b1).transpose(0, 2, 1).reshape(-1, 8, 8, 8)  # [N,C,H,W]
        relu = np.maximum(conv, 0)
        blocks = relu.reshape(-1, 8, 4, 2, 4, 2)
        pooled = blocks.max(axis=(3, 5))
        flat = pooled.reshape(len(images), 128)
        logits = flat @ W2 + b2
        return P, conv, relu, blocks, pooled, flat, logits

    params = [W1, b1, W2, b2]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    lr, beta1, beta2, eps, t = 0.01, 0.9, 0.999, 1e-8, 0
    images_all = X_train.reshape(-1, 8, 8).astype(np.float64)
    for epoch in range(40):
        order = rng.permutation(len(images_all))
        for start in range(0, len(order), 64):
            idx = order[start:start + 64]
            images, labels = images_all[idx], y_train[idx]
            P, conv, relu, blocks, pooled, flat, logits = forward(images)
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            dlogits = probs
            dlogits[np.arange(len(idx)), labels] -= 1
            dlogits /= len(idx)
            dW2 = flat.T @ dlogits
            db2 = dlogits.sum(axis=0)
            dpooled = (dlogits @ W2.T).reshape(-1, 8, 4, 4)
            mask = blocks == pooled[:, :, :, None, :, None]
            drelu = (mask * dpooled[:, :, :, None, :, None]).reshape(-1, 8, 8, 8)
            dconv = drelu * (conv > 0)
            dconv_flat = dconv.reshape(-1, 8, 64).transpose(0, 2, 1)  # [N,64,8]
            dW1 = np.einsum("npc,npk->ck", dconv_flat, P)
            db1 = dconv_flat.sum(axis=(0, 1))
            t += 1
            for i, g in enumerate([dW1, db1, dW2, db2]):
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                mhat = m[i] / (1 - beta1 ** t)
                vhat = v[i] / (1 - beta2 ** t)
                params[i] -= lr * mhat / (np.sqrt(vhat) + eps)

    def predict_proba(X):
        logits = forward(X.reshape(-1, 8, 8).astype(np.float64))[-1]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    return [p.astype(np.float32) for p in params], predict_proba


def cnn_to_onnx(W1, b1, W2, b2):
    inits = [
        numpy_helper.from_array(W1.reshape(8, 1, 3, 3), "conv_w"),
        numpy_helper.from_array(b1, "conv_b"),
        numpy_helper.from_array(W2, "dense_w"),
        numpy_helper.from_array(b2, "dense_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "dense_w", "dense_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="driftgate models/make.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------
# Self-tests and metrics


def session(onx_bytes):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onx_bytes, options, providers=["CPUExecutionProvider"])


def tensor_json(name, array):
    array = np.asarray(array)
    datatype = KSERVE_TYPES[array.dtype]
    flat = array.reshape(-1)
    if array.dtype.kind == "f":
        data = [float(x) for x in flat]  # the exact value of each float32, as a double
    elif array.dtype.kind == "b":
        data = [bool(x) for x in flat]
    else:
        data = [int(x) for x in flat]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


ORT_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64"}


def describe(node_arg):
    """`name TYPE [N, 64]`: KServe type names, unnamed dimensions shown as the batch `N`."""
    dims = ", ".join("N" if d is None or isinstance(d, str) else str(d) for d in node_arg.shape)
    return f"{node_arg.name} {ORT_TYPES.get(node_arg.type, node_arg.type)} [{dims}]"


def export(w, metrics, rel, onx, input_name, X_hold, y_hold, source):
    data = onx.SerializeToString()
    w.bytes(rel, data)
    sess = session(data)
    outputs = [o.name for o in sess.get_outputs()]
    rows = X_hold[:SELF_TEST_ROWS]
    results = sess.run(outputs, {input_name: rows})
    w.json(rel.replace(".onnx", ".selftest.json"), {
        "inputs": [tensor_json(input_name, rows)],
        "outputs": [tensor_json(n, r) for n, r in zip(outputs, results)],
        "tolerance": TOLERANCE,
    })
    labels = sess.run(["label"], {input_name: X_hold})[0]
    accuracy = float((labels == y_hold).mean())
    inputs = [describe(i) for i in sess.get_inputs()]
    outs = [describe(o) for o in sess.get_outputs()]
    metrics[rel] = {
        "accuracy": round(accuracy, 4), "bytes": len(data),
        "inputs": inputs, "outputs": outs, "source": source,
    }
    log(f"  {rel}: held-out accuracy {accuracy:.4f}")


README_HEAD = """# Sample models

Real models trained on datasets that ship inside scikit-learn, exported to ONNX, with self-test
cases computed by onnxruntime and data for drift experiments. Everything here is written by
`make.py` (this file included) and reproduces byte for byte:

```sh
pip install -r models/requirements.txt
python3 models/make.py            # or --out DIR to compare; SHA256SUMS lists every file
```

## Models

Held-out accuracy is measured by `make.py` with onnxruntime on the 25 % held-out split.

| file | inputs | outputs | bytes | held-out accuracy | made from |
|---|---|---|---|---|---|
"""

README_TAIL = """
`digits-mlp/v3` is deliberately bad, for rollback scenarios: trained on labels where 40 % of the
rows of classes 1, 3 and 7 were relabelled as the next class, which lowers its accuracy and shifts its
predicted-class histogram, and with two 512-unit hidden layers, which makes it several times slower.

Input scales: the tabular models take raw feature values (`digits-mlp` takes the 8×8 pixel
intensities 0–16 as 64 features; scaling is inside the pipelines). `digits-cnn` takes the same digits
as `[N, 1, 8, 8]` images divided by 16.

## Self-test cases

`X.selftest.json` beside each `X.onnx`: 8 held-out rows and onnxruntime's outputs (1 thread), in the
Open Inference Protocol's JSON tensor form, plus the tolerance a runtime must meet:

```json
{"inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 64], "data": [...]}],
 "outputs": [{"name": "label", "datatype": "INT64", "shape": [8], "data": [...]}, ...],
 "tolerance": {"abs": 0.0001, "rel": 0.001}}
```

`fleetctl model sign --self-test X.selftest.json` checks these expectations against tract before it
signs, and the agent runs them before it activates a version.

## Data

`data/{digits,wine,cancer}/`: a stratified 75/25 split (seed 0) of each dataset.

| file | contents |
|---|---|
| `train.X.npy`, `train.y.npy` | training features (float32) and labels (int64) |
| `holdout.X.npy`, `holdout.y.npy` | held-out features and labels |
| `train.csv`, `holdout.csv` | the same features as CSV with a header row, no label column |
| `shift-noise.X.npy` | held-out features plus Gaussian noise of 0.5 σ per feature (σ from train) |
| `shift-mean.X.npy` | held-out features with the most important feature shifted by +1 σ |
| `shift-prior.X.npy`, `shift-prior.y.npy` | held-out rows resampled so half come from the most frequent class |
| `meta.json` | feature and class names, σ per feature, the most important feature and how it was chosen, shift parameters, seeds |

The most important feature is the one with the highest permutation importance (5 repeats) of the
dataset's reference model on the held-out split: `digits-mlp/v2` for digits, `wine-forest/v1`,
`cancer-logreg/v1`.

## Versions

"""


def write_readme(w, metrics, meta):
    rows = []
    for rel, m in metrics.items():
        rows.append(
            f"| `{rel}` | {'; '.join(m['inputs'])} | {'; '.join(m['outputs'])} | {m['bytes']} "
            f"| {m['accuracy']:.4f} | {m['source']} |"
        )
    important = "\n".join(
        f"- {name}: feature {i['index']} (`{i['name']}`)" for name, i in meta.items()
    )
    versions = (
        f"Made with numpy {np.__version__}, scikit-learn "
        f"{sklearn.__version__}, skl2onnx {skl2onnx.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {ort.__version__} (pinned in `requirements.txt`).\n\n"
        f"Most important features:\n{important}\n"
    )
    w.bytes("README.md", (README_HEAD + "\n".join(rows) + "\n" + README_TAIL + versions).encode())


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent),
                        help="output directory (default: this script's directory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    w = Writer(args.out)
    metrics = {}
    important = {}

    log("digits: 1797 images of 8x8 pixels, 10 classes")
    digits = load_digits()
    X_tr, X_ho, y_tr, y_ho = split(digits.data, digits.target)
    v1 = Pipeline([("scale", StandardScaler()),
                   ("mlp", MLPClassifier((32,), max_iter=400, random_state=1))]).fit(X_tr, y_tr)
    export(w, metrics, "digits-mlp/v1.onnx", sklearn_to_onnx(v1, 64, "digits_mlp_v1"), "input", X_ho, y_ho,
           "load_digits; StandardScaler + MLPClassifier(32), seed 1")
    v2 = Pipeline([("scale", StandardScaler()),
                   ("mlp", MLPClassifier((128, 64), alpha=1e-3, max_iter=600, random_state=2))]).fit(X_tr, y_tr)
    export(w, metrics, "digits-mlp/v2.onnx", sklearn_to_onnx(v2, 64, "digits_mlp_v2"), "input", X_ho, y_ho,
           "load_digits; StandardScaler + MLPClassifier(128, 64), alpha 1e-3, seed 2")
    rng = np.random.default_rng(3)
    y_bad = y_tr.copy()
    for c in (1, 3, 7):
        rows = np.flatnonzero(y_tr == c)
        flip = rng.choice(rows, int(0.4 * len(rows)), replace=False)
        y_bad[flip] = (c + 1) % 10
    v3 = Pipeline([("scale", StandardScaler()),
                   ("mlp", MLPClassifier((512, 512), max_iter=60, random_state=3))]).fit(X_tr, y_bad)
    export(w, metrics, "digits-mlp/v3.onnx", sklearn_to_onnx(v3, 64, "digits_mlp_v3"), "input", X_ho, y_ho,
           "load_digits with 40 % of classes 1, 3, 7 relabelled; MLPClassifier(512, 512), seed 3 (bad on purpose)")
    important["digits"] = most_important(v2, X_ho, y_ho)
    pixel_names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    write_dataset(w, "digits", pixel_names, [str(c) for c in range(10)], X_tr, y_tr, X_ho, y_ho,
                  important["digits"], "permutation importance of digits-mlp/v2 on the held-out split")

    log("digits-cnn: the same digits as [N,1,8,8] images / 16, trained in numpy")
    (W1, b1, W2, b2), _ = train_cnn(X_tr / 16.0, y_tr)
    cnn = cnn_to_onnx(W1, b1, W2, b2)
    export(w, metrics, "digits-cnn/v1.onnx", cnn, "image",
           (X_ho / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y_ho,
           "load_digits / 16 as images; Conv3x3(8) ReLU MaxPool2 Dense(10), numpy Adam, 40 epochs, seed 7")

    log("wine: 178 wines, 13 features, 3 classes")
    wine = load_wine()
    X_tr, X_ho, y_tr, y_ho = split(wine.data, wine.target)
    forest = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0, n_jobs=1).fit(X_tr, y_tr)
    export(w, metrics, "wine-forest/v1.onnx", sklearn_to_onnx(forest, 13, "wine_forest_v1"), "input", X_ho, y_ho,
           "load_wine; RandomForestClassifier(30 trees, depth 6), seed 0")
    important["wine"] = most_important(forest, X_ho, y_ho)
    write_dataset(w, "wine", list(wine.feature_names), list(wine.target_names), X_tr, y_tr, X_ho, y_ho,
                  important["wine"], "permutation importance of wine-forest/v1 on the held-out split")

    log("cancer: 569 tumours, 30 features, 2 classes")
    cancer = load_breast_cancer()
    X_tr, X_ho, y_tr, y_ho = split(cancer.data, cancer.target)
    logreg = Pipeline([("scale", StandardScaler()),
                       ("logreg", LogisticRegression(max_iter=2000))]).fit(X_tr, y_tr)
    export(w, metrics, "cancer-logreg/v1.onnx", sklearn_to_onnx(logreg, 30, "cancer_logreg_v1"), "input", X_ho, y_ho,
           "load_breast_cancer; StandardScaler + LogisticRegression")
    important["cancer"] = most_important(logreg, X_ho, y_ho)
    write_dataset(w, "cancer", list(cancer.feature_names), list(cancer.target_names), X_tr, y_tr, X_ho, y_ho,
                  important["cancer"], "permutation importance of cancer-logreg/v1 on the held-out split")

    w.json("metrics.json", metrics)
    meta = {}
    for name in ("digits", "wine", "cancer"):
        meta[name] = json.loads((Path(args.out) / f"data/{name}/meta.json").read_text())["most_important_feature"]
    write_readme(w, metrics, meta)
    w.sums()
    log("done")


if __name__ == "__main__":
    main()
