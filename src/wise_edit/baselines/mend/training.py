"""Training MEND's editor network beforehand (the paper's Sec. 3, Alg. 1; the reference's
``trainer.py`` ``EditTrainer.edit_step`` and ``train_step``).

Each training step is one edit of the unedited model: the gradient of the target NLL on
a record's prompt is turned into a weight change by the network, and the edited model
is scored on the record's paraphrase (L_e: the target's NLL, generalisation) and on an
unrelated question (L_loc: the KL from the unedited model's next-token distributions at
its answer positions, locality). The network and the step alpha are trained on
c_edit * L_e + c_loc * L_loc. Only the layers from the edited one up are run with
gradients; everything below is captured once per row, as every edit in wise-edit does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.attach import editing_mode
from ...core.fastpath import greedy_hits, target_loss
from ...core.rows import build_rows
from ...data import EditRecord
from . import store
from .config import MendConfig, MendTraining
from .editor import MendEditor, network_fields
from .network import EditorNetwork

logger = logging.getLogger(__name__)


def locality_kl(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """KL(p_pre || p_post) of next-token distributions, averaged over positions; logits
    (R, n, V). The reference's ``losses.kl_loc_loss``."""
    pre_log = pre.float().log_softmax(-1)
    post_log = post.float().log_softmax(-1)
    return (pre_log.exp() * (pre_log - post_log)).sum(-1).mean()


def _episode(
    editor: MendEditor, network: EditorNetwork, record: EditRecord, observe: bool
) -> dict[str, torch.Tensor]:
    """One training edit of the unedited model with ``record``: L_e and L_loc (with
    gradients into ``network``), and whether the paraphrase's answer became right and
    the unrelated answer's tokens stayed the same. ``observe``: add the edit's gradient
    factors to the network's normalisation statistics first (training, not evaluation)."""
    assert record.rephrase and record.loc and record.loc_ans
    zero = torch.zeros_like(editor.layer.delta)
    edit = editor._edit_rows(record.prompt, record.target)
    outer = editor._edit_rows(record.rephrase, record.target)
    loc = build_rows(editor.format, record.loc, record.loc_ans, []).to(editor.device)
    fast = editor.config.fast_path
    lower = {
        name: editor._capture(rows, fast)
        for name, rows in (("edit", edit), ("outer", outer), ("loc", loc))
    }
    with torch.no_grad(), editor.layer.trial(zero):
        pre_loc = editor._target_logits(loc, lower["loc"])
    _, (u, delta) = editor.gradient_factors(edit, lower["edit"], zero)
    if observe:
        network.observe(u, delta)
    step = network.weight_update(u, delta)
    with editor.layer.trial(step):
        post_outer = editor._target_logits(outer, lower["outer"])
        post_loc = editor._target_logits(loc, lower["loc"])
    return {
        "edit": target_loss(post_outer, outer.targets),
        "loc": locality_kl(pre_loc, post_loc),
        "edit_acc": greedy_hits(post_outer, outer.targets).float(),
        "loc_same": (pre_loc.argmax(-1) == post_loc.argmax(-1)).float().mean().detach(),
    }


def _usable(records: Sequence[EditRecord]) -> list[EditRecord]:
    usable = [r for r in records if r.rephrase and r.loc and r.loc_ans]
    if len(usable) < 2:
        raise ValueError(
            "MEND trains on records with a paraphrase and a locality probe "
            f"(rephrase, loc, loc_ans); {len(usable)} of {len(records)} have them"
        )
    return usable


def evaluate(
    editor: MendEditor, network: EditorNetwork, records: Sequence[EditRecord]
) -> dict[str, float]:
    """Mean L_e, L_loc, paraphrase accuracy after the edit (every target token greedy-
    right, teacher-forced) and share of unrelated answer tokens unchanged, each record
    edited alone into the unedited model."""
    totals: dict[str, float] = {}
    for record in records:
        with editing_mode(editor.model):
            result = _episode(editor, network, record, observe=False)
        for key, value in result.items():
            totals[key] = totals.get(key, 0.0) + value.item()
    return {key: round(value / max(1, len(records)), 4) for key, value in totals.items()}


def train_mend(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    config: MendConfig | None = None,
    training: MendTraining | None = None,
    progress: bool = False,
) -> tuple[EditorNetwork, dict[str, Any]]:
    """Train an editor network for ``model`` edited with ``config`` on ``records``
    (prompt, target, rephrase, loc, loc_ans; e.g. `data.load_zsre_train`), starting from
    the identity network. Returns the network and a report: steps, seconds, the losses
    over training, and (``training.holdout`` > 0) the held-out records' scores before
    and after training. The model is left as it was."""
    config = replace(config or MendConfig.for_model(model), network="identity")
    training = training or MendTraining()
    usable = _usable(records)
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(training.seed))
    shuffled = [usable[i] for i in order.tolist()]
    holdout = min(training.holdout, len(shuffled) - 1)
    held, train = shuffled[:holdout], shuffled[holdout:]
    editor = MendEditor(model, tokenizer, config)
    try:
        network = EditorNetwork(
            *reversed(editor.layer.weight.shape), config.rank, config.lr, config.seed
        )
        network.to(editor.device)
        report: dict[str, Any] = {"records": len(train), "holdout": len(held)}
        if held:
            report["holdout_before"] = evaluate(editor, network, held)
        started = time.perf_counter()
        report["curve"] = _fit_network(editor, network, train, training, progress)
        report["seconds"] = round(time.perf_counter() - started, 1)
        if held:
            report["holdout_after"] = evaluate(editor, network, held)
    finally:
        editor.detach()
    report["edit_lr"] = network.edit_lr.item()
    return network.eval(), report


def _fit_network(
    editor: MendEditor,
    network: EditorNetwork,
    records: Sequence[EditRecord],
    training: MendTraining,
    progress: bool,
) -> list[dict[str, float]]:
    """The training loop: ``training.steps`` edits through the records in order (again
    from the start when they run out), an Adam update of the network and of alpha every
    ``accumulate`` edits. Returns the mean losses of each update window, for the report.
    An edit whose gradients are not finite is left out of its update, as the reference's
    ``safe_backward`` does."""
    network.train()
    weights = [p for name, p in network.named_parameters() if name != "edit_lr"]
    everything = [*weights, network.edit_lr]
    optimizer = torch.optim.Adam(weights, lr=training.lr)
    lr_optimizer = torch.optim.Adam([network.edit_lr], lr=training.lr_lr)
    curve: list[dict[str, float]] = []
    window: dict[str, float] = {}
    skipped = in_window = 0
    bar = tqdm(range(training.steps), desc="training MEND", unit="edit", disable=not progress)
    for step in bar:
        with editing_mode(editor.model):
            result = _episode(editor, network, records[step % len(records)], observe=True)
        total = training.c_edit * result["edit"] + training.c_loc * result["loc"]
        grads = torch.autograd.grad(total, everything)
        if all(torch.isfinite(g).all() for g in grads):
            for param, grad in zip(everything, grads):
                share = grad / training.accumulate
                param.grad = share if param.grad is None else param.grad + share
        else:
            skipped += 1
        for key, value in {"total": total, **result}.items():
            window[key] = window.get(key, 0.0) + value.item()
        in_window += 1
        if (step + 1) % training.accumulate == 0 or step + 1 == training.steps:
            torch.nn.utils.clip_grad_norm_(everything, training.grad_clip)
            optimizer.step()
            lr_optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_optimizer.zero_grad(set_to_none=True)
            means = {k: round(v / in_window, 4) for k, v in window.items()}
            curve.append({"edits": step + 1, **means})
            window, in_window = {}, 0
            bar.set_postfix(
                L_e=curve[-1]["edit"], L_loc=curve[-1]["loc"], alpha=f"{network.edit_lr.item():.2e}"
            )
    if skipped:
        logger.warning("%d training edits had non-finite gradients and were left out", skipped)
    return curve


def train_and_cache(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    config: MendConfig | None = None,
    training: MendTraining | None = None,
    *,
    source: str = "",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """`train_mend`, then store the network in the wise-edit cache where
    ``MendConfig(network="trained")`` finds it for this model. ``source`` names the
    training data in the record. Returns the folder and the record written."""
    config = config or MendConfig.for_model(model)
    training = training or MendTraining()
    fields = network_fields(model, config, tokenizer)  # before anything is attached
    network, report = train_mend(model, tokenizer, records, config, training, progress)
    meta = {
        **fields,
        "steps": training.steps,
        "training": asdict(training),
        "data": source,
        "torch_threads": torch.get_num_threads(),
        **report,
    }
    folder = store.cache_folder(fields, cache_dir)
    store.save_network(folder, network, meta)
    return folder, meta
