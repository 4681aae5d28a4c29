"""Agreement of `expo` and `task_arithmetic` (weight 1+α) with the float64 formula, in bf16.

    python benchmarks/agreement.py

Six 1024×1024 bf16 tensors, aligned model = SFT + 1 % noise; prints the share of output elements
equal to the float64 formula rounded to bf16 (the table in docs/numerics.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mergekit.merge_methods import merge_state_dicts

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from reference import formula64  # noqa: E402

SHAPES = {f"w{i}": (1024, 1024) for i in range(6)}


def relative(source: dict, scale: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        k: (
            v.double()
            + torch.randn(v.shape, generator=generator, dtype=torch.float64) * 0.02 * scale
        ).to(torch.bfloat16)
        for k, v in source.items()
    }


def share(out: dict, expected: dict) -> float:
    same = sum(int((out[k] == expected[k].to(out[k].dtype)).sum()) for k in out)
    return same / sum(v.numel() for v in out.values())


def main() -> None:
    import argparse

    argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Prints the table of docs/numerics.md."
    ).parse_args()  # no options: --help only
    generator = torch.Generator().manual_seed(0)
    theta0 = {
        k: (torch.randn(s, generator=generator, dtype=torch.float64) * 0.02).to(torch.bfloat16)
        for k, s in SHAPES.items()
    }
    iterates = [relative(theta0, 0.01 * k, k) for k in (1, 2, 3)]
    pair = {"sft": theta0, "dpo": iterates[0]}
    for alpha in (0.1, 0.3, 0.5, 1.7, 2.5, 25.0):
        expected = {k: formula64(theta0[k], iterates[0][k], alpha=alpha) for k in theta0}
        expo = merge_state_dicts(pair, "expo", base="sft", parameters={"alpha": alpha})
        task = merge_state_dicts(
            pair, "task_arithmetic", base="sft", parameters={"weight": 1 + alpha}
        )
        print(
            f"ExPO alpha={alpha:<5} expo {100 * share(expo, expected):.4f} %   "
            f"task_arithmetic {100 * share(task, expected):.3f} %"
        )
    models = {"sft": theta0, "i1": iterates[0], "i2": iterates[1], "i3": iterates[2]}
    for alpha, lam in ((0.4, 0.3), (1.7, 0.2)):
        expected = {
            k: formula64(
                theta0[k], iterates[2][k], [iterates[0][k], iterates[1][k]], alpha=alpha, lam=lam
            )
            for k in theta0
        }
        expo = merge_state_dicts(
            models, "expo", base="sft", parameters={"alpha": alpha, "lambda": lam}
        )
        print(f"iterative alpha={alpha} lambda={lam}: expo {100 * share(expo, expected):.4f} %")


if __name__ == "__main__":
    main()
