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
import platform


def _pin_numerics():
    """Single-threaded, fixed-kernel numerics; must run before numpy is imported.

    Multi-threaded reductions are not bit-reproducible, and OpenBLAS and numpy pick SIMD kernels
    by CPU at run time (AVX2 vs AVX-512 kernels round differently, which changes trained weights).
    On x86-64 CPUs with AVX2+FMA both are pinned to the AVX2 kernels, so any such machine
    reproduces the same weights; elsewhere they are left to their defaults.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    flags = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"
        # numpy 2.4's dispatch targets above the AVX2 level (X86_V3).
        os.environ["NPY_DISABLE_CPU_FEATURES"] = "X86_V4 AVX512_ICL AVX512_SPR"
        return "x86-64 AVX2 kernels (OpenBLAS Haswell, numpy X86_V3)"
    return "default kernels (not x86-64 with AVX2+FMA: weights may differ from the committed ones)"


NUMERICS = _pin_numerics()

import argparse
import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import scipy
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

    def json(self, rel, value, sort_keys=True):
        # Self-tests keep the contract's key order (name, datatype, shape, data); the rest sorts.
        self.bytes(rel, (json.dumps(value, indent=1, sort_keys=sort_keys) + "\n").encode())

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
    # Class-prior shift, same length n as the held-out split: its rarest class (lowest index on
    # ties) becomes dominant, floor(share * n) rows drawn with replacement from that class and the
    # rest from the other classes' rows. share is 50 %, or 80 % for two classes (where 50 % would
    # be close to balance rather than dominance).
    counts = np.bincount(y_hold)
    dominant = int(counts.argmin())
    share = 0.5 if len(counts) > 2 else 0.8
    n = len(y_hold)
    n_dominant = int(share * n)
    from_dominant = rng.choice(np.flatnonzero(y_hold == dominant), n_dominant, replace=True)
    from_rest = rng.choice(np.flatnonzero(y_hold != dominant), n - n_dominant, replace=True)
    rows = np.concatenate([from_dominant, from_rest])
    rng.shuffle(rows)
    return {
        "noise": noise,
        "mean": mean.astype(np.float32),
        "prior": (X_hold[rows], y_hold[rows]),
        "params": {
            "noise": {"file": "shift-noise.X.npy", "sigma_fraction": 0.5,
                      "how": "holdout + N(0, 1) * 0.5 * train sigma, per feature"},
            "mean": {"file": "shift-mean.X.npy", "feature": int(important), "sigmas": 1.0,
                     "delta": float(sigma[important]),
                     "how": "holdout with the most important feature + 1 train sigma"},
            "prior": {"files": ["shift-prior.X.npy", "shift-prior.y.npy"],
                      "dominant_class": dominant, "share": share, "dominant_rows": n_dominant,
                      "holdout_share": float(counts[dominant] / n),
                      "class_counts": [int(c) for c in np.bincount(y_hold[rows], minlength=y_hold.max() + 1)],
                      "how": "holdout rows resampled with replacement: floor(share * n) from the "
                             "held-out split's rarest class, the rest from the other classes"},
            "rng": "numpy default_rng(shifts seed): noise, then dominant rows, other rows, shuffle",
        },
    }


def write_dataset(w, name, feature_names, class_names, X_tr, y_tr, X_ho, y_ho, ranking, how):
    important = ranking[0][0]
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
    meta = {
        "dataset": name,
        "features": list(feature_names),
        "classes": list(class_names),
        "train_rows": int(len(y_tr)),
        "holdout_rows": int(len(y_ho)),
        "train_class_counts": [int(c) for c in np.bincount(y_tr, minlength=len(class_names))],
        "holdout_class_counts": [int(c) for c in np.bincount(y_ho, minlength=len(class_names))],
        # float32 statistics of train.X.npy, written exactly (each decimal parses back to the float32).
        "train_mean": [float(v) for v in X_tr.mean(axis=0)],
        "train_sigma": [float(v) for v in X_tr.std(axis=0)],
        "most_important_feature": {
            "index": int(important), "name": feature_names[important], "how": how,
            "top5": [{"index": int(i), "name": feature_names[i], "importance_mean": round(v, 6)}
                     for i, v in ranking[:5]],
        },
        "shifts": s["params"],
        "split": {"test_size": 0.25, "stratify": True, "random_state": SPLIT_SEED},
        "seeds": {"split": SPLIT_SEED, "shifts": SHIFT_SEED},
        "dtypes": {"X": "float32", "y": "int64"},
    }
    w.json(f"{base}/meta.json", meta)
    return meta


def importance_ranking(model, X, y):
    """Features by permutation importance (accuracy drop, 5 repeats) on the held-out split."""
    result = permutation_importance(model, X, y, n_repeats=5, random_state=0, n_jobs=1)
    means = result.importances_mean
    order = sorted(range(len(means)), key=lambda i: (-means[i], i))
    return [(i, float(means[i])) for i in order]


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
    for value in list(onx.graph.input) + list(onx.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = "N"
    # skl2onnx can list the same opset twice (seen with the forest); keep one of each domain.
    opsets = {}
    for imp in onx.opset_import:
        opsets[imp.domain] = max(opsets.get(imp.domain, 0), imp.version)
    del onx.opset_import[:]
    for domain, version in sorted(opsets.items()):
        onx.opset_import.append(helper.make_opsetid(domain, version))
    onnx.checker.check_model(onx, full_check=True)
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

    return [p.astype(np.float32) for p in params]


def cnn_probabilities(params, images):
    """The CNN's forward pass in plain numpy (float64 arithmetic on the exported float32 weights),
    written independently of the training code's im2col, as a check on the ONNX graph."""
    W1, b1, W2, b2 = (p.astype(np.float64) for p in params)
    x = images.reshape(-1, 8, 8).astype(np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    kernels = W1.reshape(8, 3, 3)
    conv = np.zeros((len(x), 8, 8, 8))
    for c in range(8):
        for dy in range(3):
            for dx in range(3):
                conv[:, c] += kernels[c, dy, dx] * padded[:, dy:dy + 8, dx:dx + 8]
        conv[:, c] += b1[c]
    relu = np.maximum(conv, 0)
    pooled = relu.reshape(-1, 8, 4, 2, 4, 2).max(axis=(3, 5))
    logits = pooled.reshape(len(x), 128) @ W2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


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
    }, sort_keys=False)
    labels = sess.run(["label"], {input_name: X_hold})[0]
    accuracy = float((labels == y_hold).mean())
    n_classes = int(y_hold.max()) + 1
    model, version = rel[:-len(".onnx")].split("/")
    metrics[rel] = {
        "model": model, "version": version,
        "accuracy": round(accuracy, 4), "correct": int((labels == y_hold).sum()),
        "holdout_rows": int(len(y_hold)), "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": [describe(i) for i in sess.get_inputs()],
        "outputs": [describe(o) for o in sess.get_outputs()],
        "onnx_ops": sorted({(n.domain + ":" if n.domain else "") + n.op_type for n in onx.graph.node}),
        "opsets": {(i.domain or "ai.onnx"): i.version for i in onx.opset_import},
        "predicted_class_counts": [int(c) for c in np.bincount(labels, minlength=n_classes)],
        "true_class_counts": [int(c) for c in np.bincount(y_hold, minlength=n_classes)],
        "source": source,
    }
    log(f"  {rel}: held-out accuracy {accuracy:.4f} ({metrics[rel]['correct']}/{len(y_hold)}) "
        f"with onnxruntime {ort.__version__}")


README_HEAD = """# Sample models

Real models trained on datasets that ship inside scikit-learn (nothing is downloaded), exported
to ONNX for tract, with self-test cases computed by onnxruntime and data for drift experiments.
Everything in this directory except `make.py` and `requirements.txt` is written by `make.py`
(this README included) and reproduces byte for byte:

```sh
pip install -r models/requirements.txt
python3 models/make.py                  # rewrites models/ in place
python3 models/make.py --out /tmp/x     # or elsewhere, then: diff models/SHA256SUMS /tmp/x/SHA256SUMS
```

`SHA256SUMS` lists every generated file (`sha256  relative/path`, sorted by path), so a checker can
confirm that a fresh run reproduced each committed file; `tests/tests/models_reproducible.rs`
does exactly that when `DRIFTGATE_TEST_PYTHON=1`.

## Models

Held-out accuracy is measured by `make.py` with onnxruntime on the 25 % held-out split
(`data/<dataset>/holdout.*`) and recorded, with more detail, in `metrics.json`. `N` is the
symbolic batch dimension; every model accepts any batch size.

| model | version | file | inputs | outputs | bytes | held-out accuracy | made from |
|---|---|---|---|---|---|---|---|
"""


def readme_tail(metrics, meta):
    hist = ["| | " + " | ".join(str(c) for c in range(10)) + " |", "|---" * 11 + "|"]
    first = metrics["digits-mlp/v1.onnx"]
    hist.append("| true labels | " + " | ".join(str(c) for c in first["true_class_counts"]) + " |")
    for v in ("v1", "v2", "v3"):
        counts = metrics[f"digits-mlp/{v}.onnx"]["predicted_class_counts"]
        hist.append(f"| `digits-mlp/{v}` | " + " | ".join(str(c) for c in counts) + " |")
    ops_rows = [
        f"| `{rel}` | {', '.join(m['onnx_ops'])} | "
        + ", ".join(f"{d} {v}" for d, v in sorted(m["opsets"].items())) + " |"
        for rel, m in metrics.items()
    ]
    shift_rows = []
    for name, m in meta.items():
        imp = m["most_important_feature"]
        prior = m["shifts"]["prior"]
        shift_rows.append(
            f"| {name} | {m['train_rows']} / {m['holdout_rows']} | {len(m['features'])} | "
            f"{imp['index']} `{imp['name']}` (+{m['shifts']['mean']['delta']:.4g}) | "
            f"{prior['dominant_class']} (`{m['classes'][prior['dominant_class']]}`, "
            f"{prior['holdout_share']:.0%} → {prior['dominant_rows'] / m['holdout_rows']:.0%}) | {imp['how']} |"
        )
    return f"""
`digits-mlp/v3` is deliberately bad, for rollback scenarios: it was trained on labels where 40 % of
the training rows of classes 1, 3 and 7 were relabelled as the next class (2, 4, 8), so its held-out
accuracy is clearly lower and its predicted-class histogram on the held-out split is visibly shifted
(counts per class, 450 rows):

{chr(10).join(hist)}

It also has three 1024-unit hidden layers (about 2.2 M multiply-adds per row against 17 k for v2),
which makes it much slower.

Input scales: the tabular models take raw feature values; `digits-mlp` takes the 8×8 pixel
intensities 0–16 (raw `load_digits` values, as floats) as 64 features; v1 uses them as they are,
v2 and v3 standardise them inside the model (a StandardScaler exported as `Sub`/`Div`, not the
`ai.onnx.ml` Scaler). `digits-cnn` takes the same digits as
`[N, 1, 8, 8]` images **divided by 16** (values in [0, 1]): `holdout.X.npy / 16` reshaped.

Classifier outputs are skl2onnx's, without ZipMap: `label` (INT64 `[N]`, the class index) and
`probabilities` (FP32 `[N, classes]`), in that order. `digits-cnn` was written with
`onnx.helper` (Conv, Relu, MaxPool, Flatten, Gemm, Softmax → `probabilities`, ArgMax → `label`);
`make.py` checks that onnxruntime's probabilities match a separate numpy forward pass.

ONNX operators and opsets (skl2onnx picks the lowest opsets that suffice, up to
{{"": 17, "ai.onnx.ml": 3}}); `agent/tests/sample_models.rs` loads every model with tract-onnx 0.23:

| file | operators | opsets |
|---|---|---|
{chr(10).join(ops_rows)}

## Self-test cases

`X.selftest.json` beside each `X.onnx`: the first 8 rows of the held-out split and onnxruntime's
outputs for them (CPU, one thread), as Open Inference Protocol (KServe v2) JSON tensors: `data`
is the flat row-major tensor, `datatype` a KServe name, outputs in the graph's output order, plus
the tolerance a runtime must meet. FP32 values are written as the exact decimal of each float32,
so they parse back to the same float32.

```json
{{
  "inputs": [{{"name": "input", "datatype": "FP32", "shape": [8, 64], "data": [0.0, 1.0, ...]}}],
  "outputs": [
    {{"name": "label", "datatype": "INT64", "shape": [8], "data": [3, 1, ...]}},
    {{"name": "probabilities", "datatype": "FP32", "shape": [8, 10], "data": [0.001, ...]}}
  ],
  "tolerance": {{"abs": 0.0001, "rel": 0.001}}
}}
```

`fleetctl model sign --self-test X.selftest.json` checks these expectations against tract before it
signs, and the agent runs them before it activates a version; `agent/tests/sample_models.rs`
checks every model here against its case.

## Data

`data/<dataset>/` for `digits`, `wine` and `cancer` (the CNN reuses `digits`): a stratified 75/25
split (`train_test_split(test_size=0.25, stratify=y, random_state={SPLIT_SEED})`). Arrays are written
with `np.save`: features float32 `[rows, features]`, labels int64 `[rows]`.

| file | contents |
|---|---|
| `train.X.npy`, `train.y.npy` | training features and labels |
| `holdout.X.npy`, `holdout.y.npy` | held-out features and labels (the models' accuracy is measured on these) |
| `train.csv`, `holdout.csv` | the same features as CSV: a header row of feature names, then one row per sample, `%.9g` (round-trips float32), no label column |
| `shift-noise.X.npy` | held-out features plus Gaussian noise of 0.5 σ per feature (σ of the training split; constant pixels get none) |
| `shift-mean.X.npy` | held-out features with the most important feature shifted by +1 σ, all else unchanged |
| `shift-prior.X.npy`, `shift-prior.y.npy` | class-prior shift: the held-out rows resampled with replacement, same length n: the held-out split's rarest class (lowest index on ties) becomes dominant with ⌊share·n⌋ rows, share 50 % (80 % for the two-class cancer data), the rest from the other classes |
| `meta.json` | feature and class names, row and class counts, float32 mean and σ per training feature, the most important feature (index, name, how it was chosen, top 5), shift parameters, split and seeds |

Shifts use `numpy.random.default_rng({SHIFT_SEED})`. The most important feature is the one with the
highest permutation importance (accuracy drop, 5 repeats, `random_state=0`) of that dataset's model
on its held-out split:

| dataset | train / held-out rows | features | most important feature (mean shift) | dominant class of `shift-prior` (held-out share → shifted) | chosen by |
|---|---|---|---|---|---|
{chr(10).join(shift_rows)}

## Reproducibility

`make.py` seeds everything, runs numpy/BLAS single-threaded (`OMP_NUM_THREADS`,
`OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS` = 1, set before numpy is imported), writes JSON with fixed
formatting and no timestamps, and names the ONNX graphs itself (skl2onnx would pick random ones).
OpenBLAS and numpy choose SIMD kernels by CPU, and AVX2 and AVX-512 kernels round differently, which
changes trained weights; so on x86-64 CPUs with AVX2+FMA `make.py` pins them to the AVX2 kernels
(`OPENBLAS_CORETYPE=Haswell`, `NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR"`). On other
CPUs (e.g. arm64) the weights will differ from the committed ones. onnxruntime also picks kernels by
CPU, so on a different CPU family the self-test expectations could differ in the last bits even
with identical models; the committed files were made on an x86-64 machine with AVX-512.

Versions: Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__},
scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, onnx {onnx.__version__},
onnxruntime {ort.__version__} (pinned in `requirements.txt`).
"""


def write_readme(w, metrics, meta):
    rows = []
    for rel, m in metrics.items():
        rows.append(
            f"| {m['model']} | {m['version']} | `{rel}` | {'; '.join(m['inputs'])} | {'; '.join(m['outputs'])} "
            f"| {m['bytes']} | {m['accuracy']:.4f} ({m['correct']}/{m['holdout_rows']}) | {m['source']} |"
        )
    w.bytes("README.md", (README_HEAD + "\n".join(rows) + "\n" + readme_tail(metrics, meta)).encode())


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent),
                        help="output directory (default: this script's directory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    log(f"numerics: {NUMERICS}; writing to {args.out}")
    w = Writer(args.out)
    metrics = {}
    meta = {}

    log("digits: 1797 images of 8x8 pixels, 10 classes")
    digits = load_digits()
    X_tr, X_ho, y_tr, y_ho = split(digits.data, digits.target)
    # v1: a plain MLP on the raw 0..16 pixels; v2 adds standardisation (folded into the ONNX
    # graph) and a bigger network, and is better.
    v1 = MLPClassifier((32,), max_iter=400, random_state=1).fit(X_tr, y_tr)
    export(w, metrics, "digits-mlp/v1.onnx", sklearn_to_onnx(v1, 64, "digits_mlp_v1"), "input", X_ho, y_ho,
           "load_digits raw pixels; MLPClassifier(hidden (32,), relu, adam, max_iter 400), random_state 1")
    v2 = Pipeline([("scale", StandardScaler()),
                   ("mlp", MLPClassifier((128, 64), alpha=1e-3, max_iter=600, random_state=2))]).fit(X_tr, y_tr)
    export(w, metrics, "digits-mlp/v2.onnx", sklearn_to_onnx(v2, 64, "digits_mlp_v2"), "input", X_ho, y_ho,
           "load_digits; StandardScaler + MLPClassifier(hidden (128, 64), alpha 1e-3, max_iter 600), random_state 2")
    rng = np.random.default_rng(3)
    y_bad = y_tr.copy()
    for c in (1, 3, 7):
        rows = np.flatnonzero(y_tr == c)
        flip = rng.choice(rows, int(0.4 * len(rows)), replace=False)
        y_bad[flip] = (c + 1) % 10
    v3 = Pipeline([("scale", StandardScaler()),
                   ("mlp", MLPClassifier((1024, 1024, 1024), max_iter=60, random_state=3))]).fit(X_tr, y_bad)
    export(w, metrics, "digits-mlp/v3.onnx", sklearn_to_onnx(v3, 64, "digits_mlp_v3"), "input", X_ho, y_ho,
           "load_digits, 40 % of the training labels of classes 1, 3, 7 relabelled as the next class "
           "(seed 3); StandardScaler + MLPClassifier(hidden (1024, 1024, 1024), max_iter 60), random_state 3 (bad on purpose)")
    pixel_names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    meta["digits"] = write_dataset(
        w, "digits", pixel_names, [str(c) for c in range(10)], X_tr, y_tr, X_ho, y_ho,
        importance_ranking(v2, X_ho, y_ho), "permutation importance of digits-mlp/v2 on the held-out split")

    log("digits-cnn: the same digits as [N,1,8,8] images / 16, trained in numpy")
    cnn_params = train_cnn(X_tr / 16.0, y_tr)
    cnn = cnn_to_onnx(*cnn_params)
    images_ho = (X_ho / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    export(w, metrics, "digits-cnn/v1.onnx", cnn, "image", images_ho, y_ho,
           "load_digits / 16 as [N,1,8,8] images; Conv3x3 1→8 pad 1, ReLU, MaxPool2 → 8x4x4, Flatten, "
           "Gemm → 10, Softmax; trained in numpy: Adam lr 0.01, batch 64, 40 epochs, seed 7")
    ours = cnn_probabilities(cnn_params, images_ho)
    theirs = session(cnn.SerializeToString()).run(["probabilities"], {"image": images_ho})[0]
    gap = float(np.abs(ours - theirs).max())
    numpy_accuracy = float((ours.argmax(axis=1) == y_ho).mean())
    assert gap < 1e-5, f"onnxruntime and the numpy forward pass differ by {gap}"
    log(f"  digits-cnn/v1.onnx: numpy forward pass accuracy {numpy_accuracy:.4f}, "
        f"max |numpy - onnxruntime| = {gap:.1e}")

    log("wine: 178 wines, 13 features, 3 classes")
    wine = load_wine()
    X_tr, X_ho, y_tr, y_ho = split(wine.data, wine.target)
    forest = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0, n_jobs=1).fit(X_tr, y_tr)
    export(w, metrics, "wine-forest/v1.onnx", sklearn_to_onnx(forest, 13, "wine_forest_v1"), "input", X_ho, y_ho,
           "load_wine; RandomForestClassifier(30 trees, max_depth 6), random_state 0")
    meta["wine"] = write_dataset(
        w, "wine", list(wine.feature_names), list(wine.target_names), X_tr, y_tr, X_ho, y_ho,
        importance_ranking(forest, X_ho, y_ho), "permutation importance of wine-forest/v1 on the held-out split")

    log("cancer: 569 tumours, 30 features, 2 classes")
    cancer = load_breast_cancer()
    X_tr, X_ho, y_tr, y_ho = split(cancer.data, cancer.target)
    logreg = Pipeline([("scale", StandardScaler()),
                       ("logreg", LogisticRegression(max_iter=2000))]).fit(X_tr, y_tr)
    export(w, metrics, "cancer-logreg/v1.onnx", sklearn_to_onnx(logreg, 30, "cancer_logreg_v1"), "input", X_ho, y_ho,
           "load_breast_cancer; StandardScaler + LogisticRegression(C 1, lbfgs, max_iter 2000)")
    meta["cancer"] = write_dataset(
        w, "cancer", list(cancer.feature_names), list(cancer.target_names), X_tr, y_tr, X_ho, y_ho,
        importance_ranking(logreg, X_ho, y_ho), "permutation importance of cancer-logreg/v1 on the held-out split")

    w.json("metrics.json", metrics)
    write_readme(w, metrics, meta)
    w.sums()
    log("done")


if __name__ == "__main__":
    main()
