"""Question: would training a batch of K edits in one optimisation (issue 39's `edit_many`
batches) make an edit cheaper on this machine's CPU?

An edit's step is a forward and backward of the layers above the edited one over its rows
(the prompt and its prefixed copies, 11 rows under the preset). A batch of K edits is one
step over 11 K rows. Batching pays only where a step's cost grows slower than its rows.

Measured: the upper 5 layers of SmolLM2 (layer 25 of 30) and the LM head over the last 5
positions, forward + backward, rows of 40 tokens, 1 thread, best of 3.

Decision: on the CPU the cost per row is flat from 11 to 176 rows (K = 1 to 16), so a
batch costs K times one edit's step: batching cannot bring an edit to 0.5 s here, only
fewer row-steps per edit can. Batched edits are left for GPU sessions, where small row
batches leave the device idle. Ran at 4b79143 (docs/notebook/results/batch-rows-cost).
"""

from __future__ import annotations

import time

import torch

from wise_edit.models import load


def main() -> None:
    torch.manual_seed(0)
    model, _ = load("smollm2-135m")
    layers = model.model.layers[25:]
    rotary = model.model.rotary_emb
    print("rows  edits  best s/step  ms/row")
    for edits in (1, 4, 8, 16):
        rows = 11 * edits
        x = torch.randn(rows, 40, 576, requires_grad=True)
        positions = torch.arange(40)[None].expand(rows, -1)
        embeddings = rotary(x, positions)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            hidden = x
            for layer in layers:
                out = layer(hidden, position_embeddings=embeddings)
                hidden = out[0] if isinstance(out, tuple) else out
            logits = model.lm_head(model.model.norm(hidden[:, -5:]))
            logits.float().logsumexp(-1).sum().backward()
            times.append(time.perf_counter() - start)
        best = min(times)
        print(f"{rows:4d}  {edits:5d}  {best:11.3f}  {best / rows * 1000:6.1f}", flush=True)


if __name__ == "__main__":
    main()
