"""Does batching a cell's edges make the search faster on this CPU? (issue 16's premise, measured.)

    OMP_WAIT_POLICY=PASSIVE python bench/batched_edges.py [--threads 2]

The eight edges that read a cell's two inputs (four each), as darts runs them (one sep-conv block per edge:
ReLU, depthwise 3x3, pointwise 1x1, affine-free BatchNorm), against the same maths batched: ReLU once, one
depthwise convolution with channel multiplier 4 per input, one grouped 1x1 convolution (8 groups) or an einsum
for the eight pointwise convolutions, one BatchNorm over the stack. Forward and backward, channels-last, the
default search shape (batch 64, C=16, 32x32). Also the depthwise convolutions alone. Prints milliseconds,
interleaved over rounds.
"""
import argparse
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    n, c, h, k = 64, 16, 32, 8
    cl = torch.channels_last
    x = torch.randn(n, 2 * c, h, h).contiguous(memory_format=cl).requires_grad_(True)
    dws = [torch.randn(c, 1, 3, 3, requires_grad=True) for _ in range(k)]
    pws = [torch.randn(c, c, 1, 1, requires_grad=True) for _ in range(k)]

    def separate():
        s = [x[:, :c], x[:, c:]]
        total = 0
        for e in range(k):
            y = F.conv2d(s[e // 4].relu(), dws[e], padding=1, groups=c)
            y = F.batch_norm(F.conv2d(y, pws[e]), None, None, training=True)
            total = total + y.sum()
        return total

    def depthwise_stacked(r):
        # Input channel j of input s gets its 4 edges' filters: output channel order (s, c, e).
        w = torch.cat([torch.stack(dws[4 * s:4 * s + 4], 1).reshape(4 * c, 1, 3, 3) for s in range(2)])
        return F.conv2d(r, w, padding=1, groups=2 * c)

    def batched_grouped():
        y = depthwise_stacked(x.relu())
        y = y.view(n, 2, c, 4, h, h).transpose(2, 3).reshape(n, k * c, h, h).contiguous(memory_format=cl)
        y = F.conv2d(y, torch.cat(pws, 0), groups=k)
        return F.batch_norm(y, None, None, training=True).sum()

    def batched_einsum():
        y = depthwise_stacked(x.relu()).permute(0, 2, 3, 1).reshape(n * h * h, 2, c, 4)
        w = torch.stack([p.view(c, c) for p in pws], 0).view(2, 4, c, c)
        z = torch.einsum("psce,seoc->pseo", y, w).reshape(n, h, h, k * c).permute(0, 3, 1, 2)
        return F.batch_norm(z, None, None, training=True).sum()

    def depthwise_separate():
        s = [x[:, :c], x[:, c:]]
        return sum(F.conv2d(s[e // 4], dws[e], padding=1, groups=c).sum() for e in range(k))

    def depthwise_batched():
        return depthwise_stacked(x).sum()

    cases = [("8 edges, one by one", separate), ("batched, grouped 1x1", batched_grouped),
             ("batched, einsum 1x1", batched_einsum), ("depthwise only, one by one", depthwise_separate),
             ("depthwise only, batched", depthwise_batched)]
    times = {name: [] for name, _ in cases}
    for _ in range(a.rounds):
        for name, f in cases:
            f().backward()
            t = time.perf_counter()
            for _ in range(5):
                f().backward()
            times[name].append((time.perf_counter() - t) / 5 * 1e3)
    for name, ts in times.items():
        ts.sort()
        print(f"{name:<30} {ts[len(ts) // 2]:8.1f} ms (forward + backward, median of {a.rounds} rounds)")


if __name__ == "__main__":
    main()
