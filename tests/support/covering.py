"""Pairwise covering designs: test cases in which every value of every axis
meets every value of every other axis at least once, without the full
cartesian product.

A greedy construction (in the manner of AETG): each new case starts from a
pair not yet covered and fills the other axes with the values that cover the
most uncovered pairs, best of a few seeded tries. Deterministic for a seed.
"""

from __future__ import annotations

import itertools
import random


def _pairs(axes: dict, skip: frozenset) -> set:
    names = list(axes)
    out = set()
    for a, b in itertools.combinations(names, 2):
        if frozenset((a, b)) in skip:
            continue
        for i, j in itertools.product(range(len(axes[a])), range(len(axes[b]))):
            out.add(((a, i), (b, j)))
    return out


def _covered(case: dict, names: list, skip: frozenset) -> set:
    out = set()
    for a, b in itertools.combinations(names, 2):
        if frozenset((a, b)) not in skip:
            out.add(((a, case[a]), (b, case[b])))
    return out


def pairwise_cases(axes: dict, skip_pairs=(), seed: int = 0, tries: int = 5) -> list[dict]:
    """Cases {axis: value} covering every pair of values of two axes, except
    the axis pairs in `skip_pairs` (pairs of axis names)."""
    names = list(axes)
    skip = frozenset(frozenset(p) for p in skip_pairs)
    uncovered = _pairs(axes, skip)
    rng = random.Random(seed)
    cases = []
    while uncovered:
        start = min(uncovered)
        best, best_gain = None, -1
        for _ in range(tries):
            case = {start[0][0]: start[0][1], start[1][0]: start[1][1]}
            rest = [n for n in names if n not in case]
            rng.shuffle(rest)
            for n in rest:
                options = list(range(len(axes[n])))
                rng.shuffle(options)

                def gain(v):
                    trial = dict(case, **{n: v})
                    return sum(
                        1 for m in trial if m != n and frozenset((m, n)) not in skip
                        and (tuple(sorted([(m, trial[m]), (n, v)], key=lambda p: names.index(p[0])))) in uncovered
                    )

                case[n] = max(options, key=gain)
            g = len(_covered(case, names, skip) & uncovered)
            if g > best_gain:
                best, best_gain = case, g
        uncovered -= _covered(best, names, skip)
        cases.append(best)
    return [{n: axes[n][c[n]] for n in names} for c in cases]


def missing_pairs(cases: list[dict], axes: dict, skip_pairs=()) -> list:
    """The value pairs `cases` leave uncovered (empty for a covering design)."""
    names = list(axes)
    skip = frozenset(frozenset(p) for p in skip_pairs)
    want = _pairs(axes, skip)
    have = set()
    for case in cases:
        idx = {n: axes[n].index(case[n]) for n in names}
        have |= _covered(idx, names, skip)
    return sorted(want - have)
