"""Writes the SVHN-format fixtures with scipy.io.savemat (an implementation independent of darts' parser):
X uint8 of shape 32x32x3xN (as SVHN's train_32x32.mat), y double Nx1 with labels 1..10 (10 is the digit 0).
Pixel (row r, col c, channel ch, image n) = (7n + 3ch + 5r + c) % 256. Run: python make.py (needs scipy)."""
import numpy as np
import scipy.io

def write(path, n, labels, compress):
    r, c, ch, i = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), np.arange(n), indexing="ij")
    x = ((7 * i + 3 * ch + 5 * r + c) % 256).astype(np.uint8)
    y = np.array(labels, dtype=np.float64).reshape(n, 1)
    scipy.io.savemat(path, {"X": x, "y": y}, do_compression=compress)

write("train_32x32.mat", 6, [10, 1, 2, 3, 9, 10], True)
write("test_32x32.mat", 3, [5, 6, 7], False)
