"""`WiseConfig`: every setting of WISE, documented and validated in one place.

The settings every editor shares (target layer, learning rate, step budget and early
stop, seed, prompt format) are top-level fields, as in every method's config; WISE's own
ideas are nested groups, each named after the file that uses it: `memory` (the bank of
side memories, `bank.py`), `shards` (`shards.py`), `routing` (`router.py`), `negatives`
(`negatives.py`) and `prefixes` (the augmentation, `calibration.py`). docs/guide.md maps
the paper's symbols (alpha, beta, gamma, epsilon, rho, k, save_freq, act_ratio) to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ..core.config import TARGET_FIELDS, EditConfig, Group, TargetConfig
from ..core.fit import StopOn
from ..families import get_submodule, weight_out_in
from .merging import MERGE_METHODS

# The paper's shard: 20% of LLaMA-2-7B's 11008x4096 value matrix.
PAPER_MATRIX = 11008 * 4096
# Edits a dense side memory takes before it closes, in the preset: small memories keep
# their edits on long streams, where one large memory overwrites its earlier edits
DENSE_EDITS_PER_MEMORY = 5
# Edits a compact side memory takes before it closes, in the preset: one, so that no edit is
# trained over another (a memory that takes many overwrites its earlier edits on a long
# stream, and rehearsing them slows every later edit down)
EDITS_PER_MEMORY = 1
# The rank of each edit's product in the preset's compact memories: (O + I) * 8 floats
# per edit, a few percent of a dense copy of the matrix
COMPACT_RANK = 8
# epsilon's ratio to a compact memory's own edit score in the preset: a one-edit memory's
# threshold is set by its single prompt, where a 5-edit memory's is set by the lowest of
# five, and at the paper's 0.88 it turned away paraphrases its edit's answer reaches
COMPACT_THRESHOLD_RATIO = 0.8
# Prefixed rows each forward of a compact edit trains beside its bare prompt, in turn: an
# edit takes ~15 forwards, so every one of the 10 prefixes is still trained, at a fraction
# of the rows; the answers were those of training all 11 rows at every step
PREFIXES_PER_STEP = 1
Mode = Literal["merge", "retrieve"]
Optimizer = Literal["adam", "sgd"]
DEFAULT_LR = {"adam": 1e-2, "sgd": 1.0}
# bound of each early stop: 'answer' bounds the routing margins alone, 'loss' is the
# reference's rule, 'lm' the target NLL alone
DEFAULT_STOP_BOUND = {"answer": 0.2, "loss": 0.05, "lm": 0.05}
OPTIMIZERS = tuple(DEFAULT_LR)
MERGE_NAMES = tuple(MERGE_METHODS)


@dataclass
class MemoryConfig(Group):
    """The bank of side memories (`bank.py`)."""

    mode: Mode = field(
        default="merge",
        metadata={
            "help": "'merge': one side memory, its full groups of shards merged into it. "
            "'retrieve': a new side memory after every merge, top-1 routing among them."
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
    rank: int = field(
        default=0,
        metadata={
            "help": "0: each side memory is a dense delta (the paper). r > 0: a compact "
            "memory; each edit is trained as a rank-r product W' - W = up @ down and kept "
            "as such, (O + I) r floats per edit instead of O I per memory. Needs "
            "shards.mask_ratio=1 and shards.per_merge=1 (a product has no entry masks, and "
            "one shard's merge is the identity)."
        },
    )
    rehearse_rows: int = field(
        default=4,
        metadata={
            "help": "Earlier edits of the side memory being trained (a seeded sample of at "
            "most this many) whose prompt -> target (+ stop) rows are trained again with "
            "each new edit, so that a memory's later edits do not overwrite its earlier "
            "ones. 0: no rehearsal (the paper)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("mode", self.mode in ("merge", "retrieve"), "must be 'merge' or 'retrieve'"),
                ("norm_bound", self.norm_bound is None or self.norm_bound > 0, "must be > 0"),
                ("replay_rows", self.replay_rows >= 1, "must be >= 1"),
                (
                    "replay",
                    not (self.replay and self.mode == "merge"),
                    "applies to mode='retrieve'",
                ),
                ("rehearse_rows", self.rehearse_rows >= 0, "must be >= 0"),
                ("rank", self.rank >= 0, "must be >= 0"),
            ]
        )


@dataclass
class ShardConfig(Group):
    """Knowledge sharding and merging (`shards.py`, `merging.py`; Eqs. 7-8)."""

    mask_ratio: float = field(
        default=0.2, metadata={"help": "rho: share of the matrix each shard may change (0, 1]."}
    )
    size: int = field(default=50, metadata={"help": "Edits per shard (the reference's save_freq)."})
    per_merge: int = field(
        default=2, metadata={"help": "k: shards trained before they are merged (Eq. 8)."}
    )
    merge_method: str = field(
        default="ties", metadata={"help": f"One of {', '.join(MERGE_NAMES)} (Table 11)."}
    )
    merge_density: float = field(
        default=0.53, metadata={"help": "Share of each task vector kept by TIES/DARE trimming."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("mask_ratio", 0.0 < self.mask_ratio <= 1.0, "must be in (0, 1]"),
                ("size", self.size >= 1, "must be >= 1"),
                ("per_merge", self.per_merge >= 1, "must be >= 1"),
                ("merge_method", self.merge_method in MERGE_NAMES, f"one of {MERGE_NAMES}"),
                ("merge_density", 0.0 < self.merge_density <= 1.0, "must be in (0, 1]"),
            ]
        )


@dataclass
class RoutingConfig(Group):
    """The router and its margin loss (`router.py`; Eqs. 3-6, Algorithm 2)."""

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
        metadata={
            "help": "The reference's act_ratio: epsilon = ratio * the smallest activation "
            "score over a memory's edit prompts."
        },
    )
    margin_weight: float = field(
        default=10.0,
        metadata={
            "help": "Weight of the margin loss against the LM loss. The paper adds them "
            "unweighted with raw scores of a 7B model; in score_scale units their gradient "
            "is smaller, and at weight 1 unrelated prompts stay above the threshold."
        },
    )
    candidates: int = field(
        default=4,
        metadata={
            "help": "Retrieval index for many memories: k > 0 scores only the memories of "
            "the k edit keys nearest (cosine of the mean value-matrix input) to the "
            "sequence, once there are more than k memories; 0 scores every memory."
        },
    )
    key_radius: float | None = field(
        default=None,
        metadata={
            "help": "A side memory may take a sequence only if one of its edits' keys lies "
            "within this cosine of the sequence's, on top of its threshold. None: "
            "calibrated once per model, the cosine that only 1% of pairs of the built-in "
            "neutral sentences exceed; 0: off (the paper)."
        },
    )
    subject_tau: float = field(
        default=0.6,
        metadata={
            "help": "Subject gate: a side memory may answer a sequence only if one of its "
            "tokens lies within this cosine of the subject key of one of its edits (edits "
            "given without a subject are not gated). 0: off."
        },
    )
    gate: bool = field(
        default=True,
        metadata={
            "help": "False: the paper's 'w.o. router' ablation (Table 7). Every sequence "
            "goes to its top-scoring side memory, with no threshold, key radius or subject "
            "gate, so nothing reaches the unedited model once there is a memory."
        },
    )
    subject_layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layers below the subject key (>= 1, at most the edited layer's "
            "index): low, so that a subject's last token still carries the subject rather "
            "than its sentence. None: 2, or the edited layer's index if that is lower."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        radius, layer = self.key_radius, self.subject_layer
        self._validate(
            [
                ("alpha", self.alpha >= 0, "must be >= 0"),
                ("beta", self.beta > self.alpha, "must be greater than alpha"),
                ("gamma", self.gamma >= 0, "must be >= 0"),
                ("score_scale", self.score_scale is None or self.score_scale > 0, "must be > 0"),
                ("threshold_ratio", 0.0 < self.threshold_ratio <= 1.0, "must be in (0, 1]"),
                ("margin_weight", self.margin_weight >= 0, "must be >= 0"),
                ("candidates", self.candidates >= 0, "must be >= 0"),
                ("key_radius", radius is None or 0.0 <= radius <= 1.0, "must be None or a cosine"),
                ("subject_tau", 0.0 <= self.subject_tau <= 1.0, "must be a cosine in [0, 1]"),
                ("subject_layer", layer is None or layer >= 1, "must be None or >= 1"),
            ]
        )


@dataclass
class NegativesConfig(Group):
    """The unrelated prompts of the margin loss (`negatives.py`)."""

    random: int = field(
        default=4,
        metadata={"help": "Unrelated prompts drawn at random from the pool for each edit."},
    )
    hard: int = field(
        default=4,
        metadata={
            "help": "Unrelated prompts per edit chosen as the pool prompts nearest to the "
            "edit prompt: typically its own sentence form about another subject, the "
            "prompts a router trained on random negatives lets in. 0: random only (the paper)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [("random", self.random >= 1, "must be >= 1"), ("hard", self.hard >= 0, "must be >= 0")]
        )


@dataclass
class PrefixConfig(Group):
    """Random prefixes each edit is also trained behind (the paper's augmentation)."""

    count: int = field(
        default=10, metadata={"help": "Random prefixes generated once by the unedited model."}
    )
    lengths: tuple[int, ...] = field(
        default=(5, 10), metadata={"help": "Token lengths of those prefixes, used in turn."}
    )
    per_step: int | None = field(
        default=None,
        metadata={
            "help": "Prefixed rows each forward trains beside the bare prompt, taken in turn "
            "so that consecutive steps cover every prefix. None: all of them at every step "
            "(the paper). A step costs about its rows."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lengths = tuple(self.lengths)
        ok = all(n >= 1 for n in self.lengths) and (bool(self.lengths) or self.count == 0)
        self._validate(
            [
                ("count", self.count >= 0, "must be >= 0"),
                ("lengths", ok, "must be positive lengths"),
                ("per_step", self.per_step is None or self.per_step >= 1, "must be None or >= 1"),
            ]
        )


@dataclass
class WiseConfig(EditConfig):
    """Settings of WISE editing. The field defaults follow the paper (Table 10) except
    where the reference code's 7B-tuned constants would not transfer; those are expressed
    relative to a per-model score scale instead. `for_model` (what `edit`, `bench`,
    `serve` and an editor made without a config use) starts from `preset_for_matrix`:
    WISE-Retrieve with small memories, which keeps a long stream's edits."""

    optimizer: Optimizer = field(
        default="adam",
        metadata={
            "help": "Update rule of an edit's side-memory step, always inside the shard's "
            "mask: 'adam' (per-entry scaled, fewer steps per edit) or 'sgd' (the paper)."
        },
    )
    lr: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata={"help": f"Learning rate. None: the optimiser's default {DEFAULT_LR}."},
    )
    max_steps: int = field(default=70, metadata={"help": "Optimisation steps per edit, at most."})
    early_stop_on: StopOn = field(
        default="answer",
        metadata={
            "help": "'answer': every trained target token (the edit's rows and the rehearsed "
            "ones) is the greedy choice and the routing margins are below early_stop_loss; "
            "'loss': the whole loss below it (the reference's rule); 'lm': the target NLL."
        },
    )
    early_stop_loss: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": f"Bound of the early stop. None: that stop's default {DEFAULT_STOP_BOUND}."
        },
    )
    early_stop_patience: int = field(default=2, metadata={"help": "See early_stop_loss."})
    side_steps: int = field(
        default=16,
        metadata={
            "help": "Once the answer is right and settled, up to this many updates on the "
            "routing margins alone (they need no forward of the model) before the next "
            "full step checks the answer. 0: every step is full (the paper)."
        },
    )
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    prefixes: PrefixConfig = field(default_factory=PrefixConfig)

    def __post_init__(self) -> None:
        if self.lr is None:  # before the base checks, which need a number
            self._validate([("optimizer", self.optimizer in DEFAULT_LR, f"one of {OPTIMIZERS}")])
            self.lr = DEFAULT_LR[self.optimizer]
        if self.early_stop_loss is None:
            stops = tuple(DEFAULT_STOP_BOUND)
            self._validate([("early_stop_on", self.early_stop_on in stops, f"one of {stops}")])
            self.early_stop_loss = DEFAULT_STOP_BOUND[self.early_stop_on]
        super().__post_init__()
        shards = self.shards
        if self.memory.rank and (shards.mask_ratio != 1.0 or shards.per_merge != 1):
            raise ValueError(
                f"WiseConfig.memory.rank={self.memory.rank}: a compact memory needs "
                f"shards.mask_ratio=1 and shards.per_merge=1 (got {shards.mask_ratio} and "
                f"{shards.per_merge})"
            )

    @classmethod
    def preset(cls, model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
        """The layer at the paper's relative depth and `preset_for_matrix`: compact
        memories, unless ``given`` asks for what only dense ones have (entry masks,
        several shards per merge, rank 0); then dense ones with subspaces sized from the
        value matrix instead of copied from a 7B model."""
        target = TargetConfig(**{k: given[k] for k in TARGET_FIELDS if k in given})
        path = target.resolve_target(model)
        dense = (
            given.get("memory.rank") == 0
            or given.get("shards.mask_ratio", 1.0) != 1.0
            or given.get("shards.per_merge", 1) != 1
        )
        numel = weight_out_in(get_submodule(model, path)).numel()
        preset = preset_for_matrix(numel, compact=not dense)
        if target.target_module is None:
            preset["layer"] = target.resolve_layer(model)
        return preset

    def edits_per_memory(self) -> int:
        """Edits a memory takes before its shards are merged (and, in retrieve mode, closed)."""
        return self.shards.size * self.shards.per_merge


def preset_for_matrix(numel: int, compact: bool = True) -> dict[str, Any]:
    """The defaults for a value matrix of ``numel`` entries: WISE-Retrieve with replay,
    and one compact side memory per edit (a trained rank-`COMPACT_RANK` product,
    `compact.py`). One memory that takes every edit (WISE-Merge) forgets its earlier edits
    on a long stream; small closed memories keep them, replay keeps each out of the
    others' prompts, and a product costs (O + I) r floats per edit where a dense memory
    costs the whole matrix. A product has no entry masks (ratio 1, one shard) and no
    elementwise bound: it concentrates an edit's change in a few directions, so its
    entries exceed the dense delta's bound where the change is learnt, and its rank, not a
    clamp, keeps it small. Its threshold ratio is `COMPACT_THRESHOLD_RATIO`, and each
    forward trains `PREFIXES_PER_STEP` of the prefixed rows (a step costs about its rows).

    ``compact`` False (settings that need dense memories: masks, several shards, rank 0):
    dense memories of `DENSE_EDITS_PER_MEMORY` edits, the mask ratio keeping the paper's
    density (rho = 20% of an 11008x4096 matrix, more, up to the whole matrix, for a
    smaller one, so that each edit keeps a workable number of parameters)."""
    preset: dict[str, Any] = {
        "memory.mode": "retrieve",
        "memory.replay": True,
        "shards.per_merge": 1,
        "shards.merge_density": 1.0,
    }
    if not compact:
        ratio = min(1.0, 0.2 * PAPER_MATRIX / numel)
        return {
            **preset,
            "shards.mask_ratio": round(ratio, 4),
            "shards.size": DENSE_EDITS_PER_MEMORY,
        }
    return {
        **preset,
        "memory.rank": COMPACT_RANK,
        "memory.norm_bound": None,
        "routing.threshold_ratio": COMPACT_THRESHOLD_RATIO,
        "prefixes.per_step": PREFIXES_PER_STEP,
        "shards.mask_ratio": 1.0,
        "shards.size": EDITS_PER_MEMORY,
    }
