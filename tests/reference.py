"""Plain-Python references shared by the loss tests: lists, explicit loops, float64.

They are written differently from the library on purpose (no torch, no vectorised ops), so a
test that compares the two checks the library against an independent formulation.
"""

from __future__ import annotations

import math


def softmax(row, tau):
    """Independent softmax of one row at temperature ``tau`` (max-shifted, explicit loop)."""
    top = max(row)
    exps = [math.exp((v - top) / tau) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(srow, trow, tau):
    """Independent KL(p_t || p_s) of one row pair, summed over classes."""
    ps, pt = softmax(srow, tau), softmax(trow, tau)
    return sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))


def mean_kl(s, t, tau):
    """Independent row-averaged KL(p_t || p_s) over lists of rows."""
    return sum(kl(a, b, tau) for a, b in zip(s, t)) / len(s)


def ce(row, target):
    """Independent cross-entropy of one row against a class index or a probability list."""
    logp = [math.log(p) for p in softmax(row, 1.0)]
    if isinstance(target, int):
        return -logp[target]
    return -sum(q * lp for q, lp in zip(target, logp))


def mean_ce(logits, targets):
    """Independent row-averaged cross-entropy over lists of rows and targets."""
    return sum(ce(row, y) for row, y in zip(logits, targets)) / len(logits)


def dot(a, b):
    """Independent dot product of two lists."""
    return sum(x * y for x, y in zip(a, b))


def cos(a, b):
    """Independent cosine similarity of two lists."""
    return dot(a, b) / (math.sqrt(dot(a, a)) * math.sqrt(dot(b, b)))


def conv1x1(s, weight):
    """Independent 1×1 convolution without bias: s[b][i][h][w], weight[o][i] → out[b][o][h][w]."""
    out = []
    for sb in s:
        planes = []
        for wo in weight:
            planes.append([[sum(wo[i] * sb[i][y][x] for i in range(len(wo))) for x in range(len(sb[0][0]))]
                           for y in range(len(sb[0]))])
        out.append(planes)
    return out


def huber(x):
    """Independent smooth-L1 (Huber, δ = 1) of one value."""
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5
