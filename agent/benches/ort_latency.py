"""onnxruntime's latency on one sample model, for `cargo bench -p edge-agent --bench inference`.

Runs the model's self-test inputs `--iters` times on one thread (intra- and inter-op) and
prints one JSON line: {"p50_us": ..., "p99_us": ..., "version": ...}. Exits 3 when onnxruntime
is not installed, so the benchmark can say so instead of failing.
"""

import argparse
import json
import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as e:  # the benchmark reports "not installed"
    print(json.dumps({"error": str(e)}))
    sys.exit(3)

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--case", required=True, help="the model's .selftest.json")
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    with open(args.case) as f:
        case = json.load(f)
    # The first row only (batch 1), as the Rust side of the benchmark sends.
    feeds = {
        t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])[:1]
        for t in case["inputs"]
    }
    for _ in range(min(200, args.iters)):
        session.run(None, feeds)
    samples = []
    for _ in range(args.iters):
        started = time.perf_counter_ns()
        session.run(None, feeds)
        samples.append((time.perf_counter_ns() - started) / 1000.0)
    samples.sort()
    print(json.dumps({
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[min(len(samples) - 1, len(samples) * 99 // 100)],
        "version": ort.__version__,
    }))


if __name__ == "__main__":
    main()
