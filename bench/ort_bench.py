"""Times ONNX Runtime on darts' exported files, driven by `darts bench --deploy` over stdin/stdout so that its
measurements interleave with darts' own (libtorch, tract) in one run.

    python bench/ort_bench.py THREADS NAME=MODEL.onnx ...

Then reads lines `NAME BATCH ITERS` and answers each with the seconds per forward pass of each of ITERS timed
runs after one warm-up, as a JSON list; an empty line ends it.
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    threads = int(sys.argv[1])
    sessions = {}
    for arg in sys.argv[2:]:
        name, path = arg.split("=", 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[name] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    print("ready", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        name, batch, iters = line.split()
        session = sessions[name]
        dims = session.get_inputs()[0].shape
        x = np.random.default_rng(0).standard_normal([int(batch)] + list(dims[1:])).astype(np.float32)
        session.run(["logits"], {"input": x})
        times = []
        for _ in range(int(iters)):
            t = time.perf_counter()
            session.run(["logits"], {"input": x})
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
