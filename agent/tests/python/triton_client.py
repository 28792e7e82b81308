"""A stock Open Inference Protocol client against the agent's API.

Uses NVIDIA's `tritonclient[http]` from PyPI, unmodified, the way a Triton user would: server
liveness and readiness, model metadata, and an inference with JSON tensors
(`binary_data=False`; the agent does not speak the binary extension). The expected outputs are
the model's committed self-test case (computed by onnxruntime). Prints one line per check and
exits non-zero on the first mismatch.

    python3 triton_client.py --url 127.0.0.1:8080 --model cancer-logreg \
        --case models/cancer-logreg/v1.selftest.json --version v1
"""

import argparse
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--case", required=True)
    args = parser.parse_args()
    with open(args.case) as f:
        case = json.load(f)

    client = httpclient.InferenceServerClient(url=args.url)
    check(client.is_server_live(), "is_server_live")
    check(client.is_server_ready(), "is_server_ready")
    check(client.is_model_ready(args.model), f"is_model_ready({args.model!r})")
    check(not client.is_model_ready("no-such-model"), "is_model_ready('no-such-model') is False")

    server = client.get_server_metadata()
    check(bool(server.get("name")) and "version" in server, f"get_server_metadata: {server}")

    metadata = client.get_model_metadata(args.model)
    check(metadata["name"] == args.model, f"get_model_metadata name: {metadata['name']}")
    check(args.version in metadata.get("versions", []), f"versions: {metadata.get('versions')}")
    declared = {t["name"]: t for t in metadata["inputs"]}
    for tensor in case["inputs"]:
        spec = declared.get(tensor["name"])
        check(spec is not None and spec["datatype"] == tensor["datatype"],
              f"input {tensor['name']} declared as {spec}")
    declared_outputs = {t["name"] for t in metadata["outputs"]}
    check(declared_outputs == {t["name"] for t in case["outputs"]},
          f"outputs declared: {sorted(declared_outputs)}")

    inputs = []
    for tensor in case["inputs"]:
        data = np.asarray(tensor["data"], dtype=DTYPES[tensor["datatype"]]).reshape(tensor["shape"])
        infer_input = httpclient.InferInput(tensor["name"], list(data.shape), tensor["datatype"])
        infer_input.set_data_from_numpy(data, binary_data=False)
        inputs.append(infer_input)
    outputs = [httpclient.InferRequestedOutput(t["name"], binary_data=False) for t in case["outputs"]]
    result = client.infer(args.model, inputs, outputs=outputs, request_id="triton-client-1")
    response = result.get_response()
    check(response.get("model_name") == args.model, f"response model_name {response.get('model_name')}")
    check(response.get("id") == "triton-client-1", "the request id is echoed")

    tolerance = case.get("tolerance", {"abs": 1e-4, "rel": 1e-3})
    for tensor in case["outputs"]:
        expected = np.asarray(tensor["data"], dtype=DTYPES[tensor["datatype"]]).reshape(tensor["shape"])
        got = result.as_numpy(tensor["name"])
        check(got is not None and got.shape == expected.shape and got.dtype == expected.dtype,
              f"output {tensor['name']}: {None if got is None else (got.shape, got.dtype)}")
        if np.issubdtype(expected.dtype, np.floating):
            close = np.allclose(got, expected, atol=tolerance["abs"], rtol=tolerance["rel"])
        else:
            close = np.array_equal(got, expected)
        check(close, f"output {tensor['name']} equals the self-test case")

    # A wrong shape is refused with a message naming what was expected.
    bad = httpclient.InferInput(case["inputs"][0]["name"], [1, 3], case["inputs"][0]["datatype"])
    bad.set_data_from_numpy(np.zeros((1, 3), dtype=DTYPES[case["inputs"][0]["datatype"]]),
                            binary_data=False)
    try:
        client.infer(args.model, [bad])
        check(False, "a wrong shape is refused")
    except InferenceServerException as e:
        check("expected" in str(e), f"a wrong shape is refused: {e}")


if __name__ == "__main__":
    main()
