# Experiment: Is `a @ delta^T` or `delta @ a^T` faster per side memory on SmolLM2's value matrix?
# Decided: `delta @ a^T` (0.55 against 1.02 ms per memory); the router scores with `value_change`
#   since c87da1e
# Ran at: 20041a9, as docs/results/routing-index-T3000/mm_order.py. Output:
#   docs/notebook/results/routing-index-T3000/
"""Milliseconds per side memory for `a @ delta^T` against `value_change` (delta @ a^T) on
SmolLM2's value-matrix shape (576 x 1536), by the rows multiplied, one thread, 100
different random deltas (so each is read from memory, as the router reads candidates).

    OMP_NUM_THREADS=1 python docs/results/routing-index-T3000/mm_order.py
"""

import time

import torch

from wise_edit.wise.router import value_change

torch.set_num_threads(1)
deltas = [torch.randn(576, 1536) for _ in range(100)]


def per_memory_ms(fn, acts: torch.Tensor, repeats: int = 3) -> float:
    fn(acts, deltas[0])
    started = time.perf_counter()
    for _ in range(repeats):
        for delta in deltas:
            fn(acts, delta)
    return 1e3 * (time.perf_counter() - started) / (repeats * len(deltas))


print("| acts (B, T, I) | a @ delta^T ms | delta @ a^T ms |\n|---|---|---|")
for shape in [(1, 1, 1536), (1, 15, 1536), (3, 15, 1536), (32, 15, 1536)]:
    acts = torch.randn(*shape)
    old = per_memory_ms(lambda a, d: a @ d.t(), acts)
    new = per_memory_ms(value_change, acts)
    print(f"| {tuple(shape)} | {old:.2f} | {new:.2f} |")
