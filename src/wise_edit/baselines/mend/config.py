"""MEND's settings: how edits are made (`MendConfig`, an editor config like every other
method's) and how the editor network is trained beforehand (`MendTraining`).

Constants are the paper's and its reference code's (eric-mitchell/mend): the edit step
and the network in ``config/alg/mend.yaml``, the training loss and optimiser in
``config/config.yaml`` and ``trainer.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...core.config import Checked, EditConfig

NETWORK_SOURCES = ("trained", "identity")


@dataclass
class MendConfig(EditConfig):
    """MEND at one FFN value matrix. An edit is one gradient of the target NLL at the
    current weights, turned into a weight change by the editor network: no optimisation
    loop, so ``max_steps`` and the early-stop settings do not apply.

    The paper edits the MLP weights of the last 3 blocks (the reference's
    config/model/gpt2.yaml, gptj.yaml: both MLP matrices of blocks 9-11 of GPT-2, 25-27 of
    GPT-J; the WISE paper's A.3: gate, up and down projections of LLaMA's layers 29-31).
    wise-edit's editors wrap one value matrix, so MEND edits the one the other methods
    edit (`layer`, default the WISE paper's relative depth): every method of the
    comparison then changes the same weight, and MEND differs from FT-L only in how the
    change is computed."""

    lr: float = field(
        default=1e-4,
        metadata={
            "help": "alpha, the edit's step: the initial value of MEND's learned per-layer "
            "step (mend.yaml edit_lr 1e-4). A trained network carries its learned alpha, "
            "which replaces this; with network='identity' this is the step itself."
        },
    )
    max_steps: int = field(
        default=1,
        metadata={
            "help": "Not used: MEND applies one transformed gradient per edit (kept, as "
            "every editor config has it, so a setting shared by all methods is accepted)."
        },
    )
    network: str = field(
        default="trained",
        metadata={
            "help": "The editor network: 'trained' (the one `wise-edit train-mend` trained "
            "for this model, layer and prompt format, from the wise-edit cache), "
            "'identity' (untrained: zero residual weights, so an edit is one plain "
            "gradient step of size lr; for tests and as an ablation), or the path of a "
            "folder holding a trained network."
        },
    )
    rank: int = field(
        default=1920,
        metadata={
            "help": "Rank of the network's low-rank layers, capped at their width "
            "(in + out features) (mend.yaml rank 1920)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("network", bool(self.network.strip()), "must be 'trained', 'identity' or a path"),
                ("rank", self.rank >= 1, "must be >= 1"),
            ]
        )


@dataclass
class MendTraining(Checked):
    """How the editor network is trained (the paper's Alg. 1): each step edits the model
    with one training record's prompt and target, then scores the edited model on the
    record's paraphrase (L_e, the NLL of the target) and on an unrelated prompt (L_loc,
    the KL from the unedited model's next-token distributions at its answer positions),
    and trains the network and alpha on c_edit * L_e + c_loc * L_loc. Every step starts
    from the unedited model."""

    steps: int = field(
        default=1000,
        metadata={
            "help": "Training edits (episodes). The reference trains up to 1M with early "
            "stopping on validation (config.yaml max_iters, early_stop_patience); 1000 is "
            "one pass over the 1000-record ZsRE train subset."
        },
    )
    lr: float = field(
        default=1e-6,
        metadata={"help": "Adam learning rate of the network (mend.yaml lr 1e-6)."},
    )
    lr_lr: float = field(
        default=1e-4,
        metadata={"help": "Adam learning rate of the step alpha (mend.yaml lr_lr 1e-4)."},
    )
    c_edit: float = field(default=0.1, metadata={"help": "Weight of L_e (config.yaml cedit 0.1)."})
    c_loc: float = field(default=1.0, metadata={"help": "Weight of L_loc (config.yaml cloc 1.0)."})
    accumulate: int = field(
        default=10,
        metadata={
            "help": "Edits whose gradients are summed per update (config.yaml accumulate_bs)."
        },
    )
    grad_clip: float = field(
        default=100.0, metadata={"help": "Gradient norm clip per update (config.yaml grad_clip)."}
    )
    holdout: int = field(
        default=20,
        metadata={
            "help": "Records kept out of training and edited before and after it, to report "
            "what training changed (the reference validates on a separate split); 0: none."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the record order."})

    def __post_init__(self) -> None:
        self._check_types()
        self._validate(
            [
                ("steps", self.steps >= 1, "must be >= 1"),
                ("lr", self.lr > 0, "must be > 0"),
                ("lr_lr", self.lr_lr >= 0, "must be >= 0"),
                ("c_edit", self.c_edit >= 0, "must be >= 0"),
                ("c_loc", self.c_loc >= 0, "must be >= 0"),
                ("accumulate", self.accumulate >= 1, "must be >= 1"),
                ("grad_clip", self.grad_clip > 0, "must be > 0"),
                ("holdout", self.holdout >= 0, "must be >= 0"),
                ("seed", self.seed >= 0, "must be >= 0"),
            ]
        )
