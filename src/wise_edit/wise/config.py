"""`WiseConfig`: every knob of WISE, documented and validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..core.config import TARGET_FIELDS, EditConfig, TargetConfig
from ..core.fit import StopOn
from ..families import get_submodule, weight_out_in
from ..neutral import NEUTRAL_SUBJECTS
from .merging import MERGE_METHODS

# The paper: 20% of LLaMA-2-7B's 11008x4096 value matrix holds about 500 edits.
# Shard sizes follow from that density instead of copying the 7B edit count.
PAPER_PARAMS_PER_EDIT = 0.2 * 11008 * 4096 / 500

PAPER_MATRIX = 11008 * 4096
Mode = Literal["merge", "retrieve"]
Optimizer = Literal["adam", "sgd"]
DEFAULT_LR = {"adam": 1e-2, "sgd": 1.0}
# bound of each early stop: 'answer' bounds the routing margins alone (0.2: met ~3 steps
# sooner than 0.05 at equal T = 100 accuracy, docs/RESULTS.md); 'loss' is the reference's
DEFAULT_STOP_BOUND = {"answer": 0.2, "loss": 0.05, "lm": 0.05}
OPTIMIZERS = tuple(DEFAULT_LR)
MERGE_NAMES = tuple(MERGE_METHODS)


@dataclass
class WiseConfig(EditConfig):
    """Hyper-parameters of WISE editing. Defaults follow the paper (Table 10) except
    where the reference code's 7B-tuned constants would not transfer; those are
    expressed relative to a per-model score scale instead."""

    mode: Mode = field(
        default="merge",
        metadata={
            "help": "'merge': one side memory, shards merged into it. 'retrieve': a new "
            "side memory after every merge, top-1 routing among them."
        },
    )
    mask_ratio: float = field(
        default=0.2, metadata={"help": "rho: share of the matrix each shard may change (0, 1]."}
    )
    shard_size: int = field(
        default=50, metadata={"help": "Edits per shard (the reference's save_freq)."}
    )
    shards_per_merge: int = field(
        default=2, metadata={"help": "k: shards trained before they are merged (Eq. 8)."}
    )
    merge_method: str = field(
        default="ties", metadata={"help": f"One of {', '.join(MERGE_NAMES)} (Table 11)."}
    )
    merge_density: float = field(
        default=0.53, metadata={"help": "Share of each task vector kept by TIES/DARE trimming."}
    )
    alpha: float = field(
        default=0.25,
        metadata={"help": "Margin loss: irrelevant inputs should score below alpha * score_scale."},
    )
    beta: float = field(
        default=1.0,
        metadata={"help": "Margin loss: edit inputs should score above beta * score_scale."},
    )
    gamma: float = field(
        default=0.5,
        metadata={
            "help": "Margin loss: edit minus irrelevant score of at least gamma * score_scale."
        },
    )
    score_scale: float | None = field(
        default=None,
        metadata={
            "help": "Unit of alpha/beta/gamma. None: calibrated once per model as the median "
            "norm of the value projection's output on neutral text. 1.0 reproduces the "
            "paper's absolute constants (alpha=5, beta=20, gamma=10 for 7B models)."
        },
    )
    threshold_ratio: float = field(
        default=0.88,
        metadata={"help": "epsilon = ratio * min activation score over a memory's edit prompts."},
    )
    optimizer: Optimizer = field(
        default="adam",
        metadata={
            "help": "Update rule of an edit's side-memory step, always inside the shard's "
            "mask: 'adam' (per-entry scaled; ~2-3x fewer steps per edit on SmolLM2, "
            "docs/RESULTS.md) or 'sgd' (the paper and the reference code)."
        },
    )
    lr: float | None = field(
        default=None,
        metadata={"help": f"Learning rate. None: the optimiser's default {DEFAULT_LR}."},
    )
    momentum: float = field(
        default=0.0,
        metadata={
            "help": "Heavy-ball momentum of optimizer='sgd' (0: plain SGD, the paper). The "
            "velocity is a sum of past masked gradients, so the update keeps their subspace."
        },
    )
    max_steps: int = field(default=70, metadata={"help": "Optimisation steps per edit, at most."})
    early_stop_loss: float | None = field(
        default=None,
        metadata={
            "help": "Bound of the early stop named by `early_stop_on`, which must hold for "
            "`early_stop_patience` consecutive steps. None: that stop's default "
            f"{DEFAULT_STOP_BOUND}."
        },
    )
    early_stop_patience: int = field(default=2, metadata={"help": "See early_stop_loss."})
    side_steps: int = field(
        default=16,
        metadata={
            "help": "Once the answer is right and its target NLL under side_steps_lm, up to "
            "this many updates on the routing margins alone (they need no forward of the "
            "model) before the next full step checks the answer: ~21% fewer forwards at "
            "ZsRE T = 100 (docs/RESULTS.md). 0: every step is full (the paper)."
        },
    )
    early_stop_on: StopOn = field(
        default="answer",
        metadata={
            "help": "'answer': every trained target token (the edit's rows and the rehearsed "
            "ones) is the greedy choice and the routing margins are below "
            "early_stop_loss - what answering needs, ~4x fewer steps than 'loss' at the "
            "same accuracy (ZsRE T = 20, docs/RESULTS.md); 'loss': the whole loss below "
            "it (the reference's rule); 'lm': the target NLL alone."
        },
    )
    norm_bound: float | None = field(
        default=1.0,
        metadata={
            "help": "Side memory kept within +-norm_bound of the main weight, elementwise. "
            "None: unbounded."
        },
    )
    replay: bool = field(
        default=False,
        metadata={
            "help": "Retrieve mode: keep earlier memories' edits out of the memory being "
            "trained (L_memo, Appendix B.3)."
        },
    )
    replay_rows: int = field(
        default=4, metadata={"help": "Edits of earlier memories replayed in each new edit."}
    )
    rehearse_rows: int = field(
        default=4,
        metadata={
            "help": "Earlier edits of the side memory being trained (a seeded sample of at "
            "most this many) whose bare prompt -> target (+ stop) rows are trained again "
            "with each new edit, so that a memory's later edits do not overwrite its "
            "earlier ones (ZsRE, T = 20: answer EM Rel .75 -> 1.00, docs/RESULTS.md). "
            "0: no rehearsal (the paper)."
        },
    )
    prefix_count: int = field(
        default=10, metadata={"help": "Random prefixes generated once by the unedited model."}
    )
    prefix_lengths: tuple[int, ...] = field(
        default=(5, 10), metadata={"help": "Token lengths of those prefixes, used in turn."}
    )
    prefix_top_k: int = field(
        default=5, metadata={"help": "Top-k sampling of those prefixes (the reference's 5)."}
    )
    irrelevant_rows: int = field(
        default=4,
        metadata={
            "help": "Unrelated prompts drawn from the pool for each edit; the margin loss "
            "uses all of them at every step."
        },
    )
    hard_negatives: int = field(
        default=4,
        metadata={
            "help": "Unrelated prompts per edit, beside `irrelevant_rows` random ones, chosen "
            "as the pool prompts nearest to the edit prompt (cosine of the mean value-matrix "
            "input over the routed tokens): typically the edit's own sentence form with "
            "another subject, the prompts a router trained on random negatives lets in. "
            "0: random negatives only (the paper)."
        },
    )
    hard_negative_candidates: int = field(
        default=256,
        metadata={
            "help": "Pool prompts (drawn once with the seed) that hard negatives are chosen "
            "among; their activations are computed once per editor, so an edit's hard "
            "negatives cost it no forward."
        },
    )
    subject_negatives: int = field(
        default=0,
        metadata={
            "help": "Per edit that names its subject (`edit(..., subject=...)`), this many "
            "copies of its prompt rewritten about other subjects, trained as unrelated "
            "prompts: the memory then keys on the subject rather than on the relation's "
            "wording, which other subjects' prompts share (CounterFact's locality probes). "
            "0: measured on CounterFact T = 100 it teaches the memory the subjects it was "
            "shown, not others, and locality does not improve (docs/RESULTS.md)."
        },
    )
    margin_weight: float = field(
        default=10.0,
        metadata={
            "help": "Weight of the routing (margin) loss against the LM loss. The paper "
            "adds them unweighted with raw scores of a 7B model; here scores are in "
            "score_scale units, which shrinks their gradient, and at weight 1 unrelated "
            "prompts stayed above the threshold on SmolLM2 (docs/RESULTS.md, sweep)."
        },
    )
    route_candidates: int = field(
        default=4,
        metadata={
            "help": "Retrieval index for many memories: k > 0 scores only the memories of "
            "the k edit keys nearest (cosine of the mean value-matrix input) to the "
            "sequence, once there are more than k memories; 0 scores every side memory on "
            "every sequence. k = 4 routed as well as every memory at T = 100 and better "
            "(fewer false positives) at T = 1000, at 1.07x the unedited forward instead "
            "of 1.89x (docs/RESULTS.md)."
        },
    )
    key_radius: float | None = field(
        default=None,
        metadata={
            "help": "A side memory may take a sequence only if one of its edits' keys (the "
            "mean value-matrix input of the edit prompt) lies within this cosine of the "
            "sequence's, on top of its threshold. None: calibrated once per model, the "
            "cosine that only 1% of pairs of the built-in neutral sentences exceed (0.75 "
            "on SmolLM2); 0: off (the paper). At T = 100 it kept ZsRE unchanged and raised "
            "CounterFact's generated locality from .79 to .86 for .02 of its paraphrases "
            "(docs/RESULTS.md)."
        },
    )
    subject_tau: float = field(
        default=0.6,
        metadata={
            "help": "Subject gate: a side memory may answer a sequence only if one of the "
            "sequence's tokens lies within this cosine of the subject key of one of its "
            "edits (the residual stream after `subject_layer` decoder layers at the "
            "subject's last token, centred on neutral text); edits given without a "
            "subject are not gated. 0: off. On saved SmolLM2 runs at tau .6 it kept 93% "
            "of CounterFact's locality probes off every memory at T = 1000 instead of 70%, "
            "for one paraphrase in a thousand (docs/RESULTS.md, a subject gate)."
        },
    )
    subject_layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layers below the subject key (>= 1, at most the edited "
            "layer's index). Low, so that a subject's last token still carries the subject "
            "rather than its sentence: on SmolLM2 the gate worked at 2 of 30 and no longer "
            "from 3 up. None: 2, or the edited layer's index if that is lower (an editor "
            "of the first decoder layer has nothing below it, and no gate)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of masks, prefixes and row sampling."})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        # saves written before `optimizer` existed were trained with SGD at their lr;
        # reading them as Adam at that lr would wreck the next edit
        if "optimizer" not in data and "lr" in data:
            data = {**data, "optimizer": "sgd"}
        # saves from before the retrieval index hold no edit keys to search
        if "route_candidates" not in data:
            data = {**data, "route_candidates": 0}
        # saves from before the key radius routed without one
        if "key_radius" not in data:
            data = {**data, "key_radius": 0.0}
        # saves from before the subject gate routed without one
        if "subject_tau" not in data:
            data = {**data, "subject_tau": 0.0}
        # a stream resumed from a save from before side steps keeps training as it did
        if "side_steps" not in data:
            data = {**data, "side_steps": 0}
        return super().from_dict(data)

    def __post_init__(self) -> None:
        if self.lr is None:  # before the base checks, which need a number
            self._validate([("optimizer", self.optimizer in DEFAULT_LR, f"one of {OPTIMIZERS}")])
            self.lr = DEFAULT_LR[self.optimizer]
        if self.early_stop_loss is None:
            stops = tuple(DEFAULT_STOP_BOUND)
            self._validate([("early_stop_on", self.early_stop_on in stops, f"one of {stops}")])
            self.early_stop_loss = DEFAULT_STOP_BOUND[self.early_stop_on]
        super().__post_init__()  # types first: the checks below compare numbers
        self.prefix_lengths = tuple(self.prefix_lengths)
        checks = [
            ("mode", self.mode in ("merge", "retrieve"), "must be 'merge' or 'retrieve'"),
            ("mask_ratio", 0.0 < self.mask_ratio <= 1.0, "must be in (0, 1]"),
            ("shard_size", self.shard_size >= 1, "must be >= 1"),
            ("shards_per_merge", self.shards_per_merge >= 1, "must be >= 1"),
            ("merge_method", self.merge_method in MERGE_NAMES, f"must be one of {MERGE_NAMES}"),
            ("merge_density", 0.0 < self.merge_density <= 1.0, "must be in (0, 1]"),
            ("alpha", self.alpha >= 0, "must be >= 0"),
            ("beta", self.beta > self.alpha, "must be greater than alpha"),
            ("gamma", self.gamma >= 0, "must be >= 0"),
            ("score_scale", self.score_scale is None or self.score_scale > 0, "must be > 0"),
            ("threshold_ratio", 0.0 < self.threshold_ratio <= 1.0, "must be in (0, 1]"),
            ("optimizer", self.optimizer in DEFAULT_LR, f"one of {OPTIMIZERS}"),
            ("momentum", 0.0 <= self.momentum < 1.0, "must be in [0, 1)"),
            (
                "momentum",
                not (self.momentum and self.optimizer != "sgd"),
                "applies to optimizer='sgd'",
            ),
            ("norm_bound", self.norm_bound is None or self.norm_bound > 0, "must be > 0 or None"),
            ("replay_rows", self.replay_rows >= 1, "must be >= 1"),
            ("replay", not (self.replay and self.mode == "merge"), "applies to mode='retrieve'"),
            ("rehearse_rows", self.rehearse_rows >= 0, "must be >= 0"),
            ("prefix_count", self.prefix_count >= 0, "must be >= 0"),
            (
                "prefix_lengths",
                all(n >= 1 for n in self.prefix_lengths)
                and (self.prefix_lengths or self.prefix_count == 0),
                "must be positive lengths",
            ),
            ("prefix_top_k", self.prefix_top_k >= 1, "must be >= 1"),
            ("irrelevant_rows", self.irrelevant_rows >= 1, "must be >= 1"),
            ("route_candidates", self.route_candidates >= 0, "must be >= 0"),
            (
                "key_radius",
                self.key_radius is None or 0.0 <= self.key_radius <= 1.0,
                "must be None or a cosine in [0, 1]",
            ),
            ("subject_tau", 0.0 <= self.subject_tau <= 1.0, "must be a cosine in [0, 1]"),
            (
                "subject_layer",
                self.subject_layer is None or self.subject_layer >= 1,
                "must be None or >= 1",
            ),
            ("hard_negatives", self.hard_negatives >= 0, "must be >= 0"),
            ("hard_negative_candidates", self.hard_negative_candidates >= 1, "must be >= 1"),
            (
                "subject_negatives",
                0 <= self.subject_negatives <= len(NEUTRAL_SUBJECTS),
                f"must be in [0, {len(NEUTRAL_SUBJECTS)}]",
            ),
            ("margin_weight", self.margin_weight >= 0, "must be >= 0"),
        ]
        self._validate(checks)

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: Any) -> WiseConfig:
        """A preset for ``model``: the layer at the paper's relative depth, and subspaces
        sized from the value matrix instead of copied from a 7B model.

        The paper gives a shard rho = 20% of an 11008x4096 matrix for about 500 edits.
        A smaller matrix gets a larger rho (up to the whole matrix) so each edit keeps a
        workable number of parameters; when rho is above 1/2 two shards would overlap
        almost entirely, so one shard per merge group is used and merging is the identity.
        Anything given in ``overrides`` wins; ``target_module`` (with ``layers_path`` or
        without) works for families outside the table.
        """
        target = TargetConfig(**{k: overrides[k] for k in TARGET_FIELDS if k in overrides})
        path = target.resolve_target(model)
        preset = preset_for_matrix(weight_out_in(get_submodule(model, path)).numel())
        if target.target_module is None:
            preset["layer"] = target.resolve_layer(model)
        preset.update(overrides)
        return cls(**preset)

    def edits_per_memory(self) -> int:
        """Edits a memory takes before its shards are merged (and, in retrieve mode, closed)."""
        return self.shard_size * self.shards_per_merge


def preset_for_matrix(numel: int) -> dict[str, Any]:
    """Mask ratio, shards and shard size for a value matrix of ``numel`` entries."""
    ratio = min(1.0, 0.2 * PAPER_MATRIX / numel)
    shards = 2 if ratio <= 0.5 else 1
    return {
        "mask_ratio": round(ratio, 4),
        "shards_per_merge": shards,
        "merge_density": 0.53 if shards > 1 else 1.0,
        "shard_size": max(1, round(ratio * numel / PAPER_PARAMS_PER_EDIT)),
    }
