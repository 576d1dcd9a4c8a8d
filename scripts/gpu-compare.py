"""The checks of scripts/gpu-check: reads the run directories it made and writes compare.json.

    python gpu-compare.py RUNS DEVICE COMPARE_JSON

Each check is computed on its own: a run that is missing (failed, cut off by the deadline) fails its checks with
the reason and leaves the others standing. Exits non-zero if any check failed.
"""
import json
import sys

runs, dev, dest = sys.argv[1], sys.argv[2], sys.argv[3]
checks = {}


def last(run):
    """The last metrics line of run directory `run` (under RUNS)."""
    with open(f"{runs}/{run}/metrics.jsonl") as f:
        return json.loads(f.read().strip().splitlines()[-1])


def check(name):
    """Records what the decorated function returns under `name`, or its error as a failed check."""
    def run(fn):
        try:
            checks[name] = fn()
        except (OSError, ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as e:
            checks[name] = {"error": f"{type(e).__name__}: {e}", "ok": False}
    return run


def close(a, b, rel, labels=("cpu", dev)):
    return {labels[0]: a, labels[1]: b, "ok": abs(a - b) <= rel * max(abs(a), abs(b))}


def alpha_difference(a, b):
    rows = zip(a["alpha_normal"] + a["alpha_reduce"], b["alpha_normal"] + b["alpha_reduce"])
    return max(abs(x - y) for ra, rb in rows for x, y in zip(ra, rb))


# One epoch from the same initial weights, data order and augmentation; GPU kernels (cuDNN, TF32) round
# differently, so losses agree to a few percent and alphas to a few 1e-4 (they start at 1/8 and move ~1e-3).
@check("search train loss")
def _():
    return close(last("search-cpu")["train_loss"], last(f"search-{dev}")["train_loss"], 0.03)


@check("search alpha-split loss")
def _():
    return close(last("search-cpu")["val_loss"], last(f"search-{dev}")["val_loss"], 0.03)


@check("search softmax(alpha) max abs difference")
def _():
    d = alpha_difference(last("search-cpu"), last(f"search-{dev}"))
    return {"value": d, "ok": d < 2e-3}


@check("train loss")
def _():
    return close(last("train-cpu")["train_loss"], last(f"train-{dev}")["train_loss"], 0.03)


@check("test loss")
def _():
    return close(last("train-cpu")["test_loss"], last(f"train-{dev}")["test_loss"], 0.05)


# bf16 autocast against fp32 on the same device and seed: rounding to 8 significant bits moves the losses a little.
@check("bf16 train loss against fp32")
def _():
    return close(last(f"train-{dev}")["train_loss"], last("train-bf16")["train_loss"], 0.05, ("fp32", "bf16"))


@check("bf16 test loss against fp32")
def _():
    return close(last(f"train-{dev}")["test_loss"], last("train-bf16")["test_loss"], 0.1, ("fp32", "bf16"))


@check("train seconds fp32 / bf16")
def _():
    return {"fp32": last(f"train-{dev}")["seconds"], "bf16": last("train-bf16")["seconds"]}


@check("peak GPU MiB (search, train fp32, train bf16)")
def _():
    rows = [last(f"search-{dev}"), last(f"train-{dev}"), last("train-bf16")]
    return {"values": [r.get("peak_gpu_mb") for r in rows],
            "ok": dev == "cpu" or all(r.get("peak_gpu_mb", 0) > 0 for r in rows)}


@check("search with skip dropout, auxiliary skip and GDAS")
def _():
    loss = last("search-remedies")["train_loss"]
    return {"train loss": loss, "ok": loss == loss and loss < 10}


# The exported file in tract on the CPU scores what the device-trained model scores on the device: GPU and CPU
# kernels round differently, so the loss agrees to 1e-3 and at most one test image in 256 may change its class.
@check("ONNX export of the device-trained model, tract on the CPU against darts eval on the device")
def _():
    e_dev = json.load(open(f"{runs}/eval-device.json"))
    e_onnx = json.load(open(f"{runs}/eval-onnx.json"))
    diff_top1 = abs(e_dev["top1"] - e_onnx["top1"]) * e_dev["examples"]
    ok = e_dev["examples"] == e_onnx["examples"] and diff_top1 <= 1 and \
        abs(e_dev["loss"] - e_onnx["loss"]) <= 1e-3 * max(1, e_dev["loss"])
    return {"device": e_dev, "onnx": e_onnx, "export": json.load(open(f"{runs}/export.json")), "ok": ok}


# torchrun: one world of every GPU (NCCL). A world of one must train as the plain run does (its averages divide
# by one); several GPUs train their own deterministic run, so only its health and speed are recorded.
@check("torchrun data parallel")
def _():
    world, backend = open(f"{runs}/dp-world").read().split()
    t_dp, s_dp = last("train-dp"), last("search-dp")
    t_dev, s_dev = last(f"train-{dev}"), last(f"search-{dev}")
    entry = {"world": int(world), "backend": backend, "train seconds": t_dp["seconds"],
             "search seconds": s_dp["seconds"], "train loss": t_dp["train_loss"],
             "search train loss": s_dp["train_loss"],
             "comm seconds (train, search)": [t_dp.get("comm_seconds"), s_dp.get("comm_seconds")],
             "one process (train, search seconds)": [t_dev["seconds"], s_dev["seconds"]]}
    if int(world) == 1:
        entry["ok"] = abs(t_dp["train_loss"] - t_dev["train_loss"]) <= 1e-4 * abs(t_dev["train_loss"]) and \
            abs(s_dp["train_loss"] - s_dev["train_loss"]) <= 1e-4 * abs(s_dev["train_loss"])
    else:
        entry["ok"] = all(x == x and x < 10 for x in (t_dp["train_loss"], s_dp["train_loss"]))
    return entry


# --cuda-graphs replays the kernels the eager passes launch, on the same seed: the same numbers up to the order
# of atomic adds in a few cuDNN/scatter kernels, and (the point) fewer seconds.
if dev != "cpu":
    for run, keys in (("search", ("train_loss", "val_loss")), ("search2", ("train_loss", "val_loss")),
                      ("train", ("train_loss", "test_loss"))):
        @check(f"CUDA graphs against eager: {run}")
        def _(run=run, keys=keys):
            e, g = last(f"graphs-{run}-eager"), last(f"graphs-{run}-graphs")
            entry = {"seconds (eager, graphs)": [e["seconds"], g["seconds"]]}
            ok = True
            for k in keys:
                entry[k] = [e[k], g[k]]
                ok = ok and abs(e[k] - g[k]) <= 1e-3 * max(abs(e[k]), 1e-9)
            if "alpha_normal" in e:
                d = alpha_difference(e, g)
                entry["softmax(alpha) max abs difference"] = d
                ok = ok and d < 1e-4
            entry["ok"] = ok
            return entry


@check("search seconds")
def _():
    return {"cpu": last("search-cpu")["seconds"], dev: last(f"search-{dev}")["seconds"]}


@check("train seconds")
def _():
    return {"cpu": last("train-cpu")["seconds"], dev: last(f"train-{dev}")["seconds"]}


ok = all(v.get("ok", True) for v in checks.values())
with open(dest, "w") as f:
    json.dump({"ok": ok, "checks": checks}, f, indent=1)
print(json.dumps({"ok": ok, "checks": checks}, indent=1))
sys.exit(0 if ok else 1)
