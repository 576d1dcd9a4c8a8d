"""Checks an ONNX file written by `darts export` with ONNX's own checker and runs it in ONNX Runtime.

    python bench/onnx_check.py MODEL.onnx INPUT.f32

INPUT.f32 holds float32 values (little-endian) of a batch shaped as the model's input [batch, c, h, w]; the
logits are printed as JSON, one list per example. Used by tests/deploy.rs.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    model_path, input_path = sys.argv[1], sys.argv[2]
    model = onnx.load(model_path)
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    chw = [d.dim_value for d in dims[1:]]
    x = np.fromfile(input_path, dtype="<f4").reshape([-1] + chw)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    json.dump(logits.tolist(), sys.stdout)


if __name__ == "__main__":
    main()
