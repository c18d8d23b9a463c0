# Experiment: The six merges of the paper's Table 11 on one sharded WISE-Retrieve stream at
#   T = 1000, each memory's shards kept before they merged and merged every way.
# Decided: TIES (= sign) holds .80 of 1000 edits, DARE-TIES .81, SLERP .65, DARE and linear
#   ~.10, all below the unsharded preset (.99 TF Rel): the preset stays unsharded, 5 edits per
#   Retrieve memory. Needs the `_merge_group` hook the library had then.
# Ran at: d7483e1, as benchmarks/merge_compare.py. Output: docs/notebook/results/merge-T1000/
"""The six merge methods on one sharded WISE-Retrieve stream (the paper's Table 11 at T
edits), and unsharded memories of the same size beside them.

    python benchmarks/merge_compare.py --edits 1000 --mask-ratio 0.5 --out runs/merge-T1000
    python benchmarks/merge_compare.py --edits 1000 --shards 1 --mask-ratio 1 \\
        --shard-size 10 --out runs/merge-T1000-unsharded
    python benchmarks/merge_compare.py --load runs/merge-T1000 runs/merge-T1000-unsharded \\
        --plot merges.png

``--also SAVE`` scores saved editors of the same records beside the run, with the same
unedited baseline and samples (e.g. a `wise-edit bench` run's checkpoint/editor).

In retrieve mode a memory merges its k shards once, when the last is full, and closes:
no edit is ever trained against a merged memory (an edit's losses read its own memory's
shards, that memory's earlier edits and other edits' prompts, never another memory's
delta). So the merge method decides each closed memory's final delta and threshold and
nothing else, and one stream trained once, each memory's shards kept as they were just
before its merge, gives every method exactly: merge each kept memory again with the
method, refresh its threshold, score. (tests/test_merge_compare.py checks a re-merged
stream against one trained with the other method.) A sharded stream of 1000 edits takes
hours on a CPU; six of them would take days.

Scored per method: teacher-forced Rel on every edit prompt and the share fully held (TF
Rel = 1), TF Gen and Loc and answer exact match on a fixed sample, and which memory the
edit prompts and paraphrases reach. Long runs resume: the editor and the kept memories
are saved to OUT/checkpoint every --checkpoint-every edits; rerun the same command.
The table's steps and seconds per edit are the edit log's: those of the run that made
the edits, on whatever else the machine was doing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from wise_edit import WiseEditor
from wise_edit.bench import routing_scores
from wise_edit.data import EditRecord, load_dataset
from wise_edit.evaluation import (
    ANSWER_EM,
    TEACHER_FORCED,
    Baseline,
    locality_baseline,
    sample_indices,
    score,
)
from wise_edit.metrics import Decoder, token_accuracy
from wise_edit.wise.layer import SideMemory
from wise_edit.wise.merging import MERGE_METHODS

KEPT_TENSORS = "kept_memories.safetensors"
KEPT_STATE = "kept_memories.json"


class ShardKeeper(WiseEditor):
    """A WISE editor that keeps each memory as it was just before its shards merged, so
    that the trained stream can be merged again with any method (retrieve mode only: a
    merge-mode memory trains on after its merges, so its later edits depend on them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.mode != "retrieve":
            raise ValueError("ShardKeeper needs retrieve mode: merge-mode edits train on merges")
        self.kept: dict[int, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}

    def _merge_group(self, memory: SideMemory, number: int, method: str) -> None:
        tensors = {k: v.detach().clone().cpu() for k, v in memory.tensors("m").items()}
        self.kept[number] = (memory.state(), tensors)
        super()._merge_group(memory, number, method)

    def remerge(self, method: str) -> None:
        """Every kept memory merged with ``method`` instead, its threshold refreshed."""
        for number, (state, tensors) in sorted(self.kept.items()):
            memory = SideMemory(self.layer.weight.shape, self.layer.weight.device)
            memory.restore(state, tensors, "m", self.config.edits_per_memory())
            self._merge_group(memory, number, method)
            self._refresh_threshold(memory)
            self.layer.memories[number] = memory

    def save_kept(self, folder: Path) -> None:
        """The kept memories beside an editor save (safetensors + JSON, written first:
        a save never names a merged memory whose shards are missing)."""
        tensors = {
            f"memory.{n}.{k[2:]}": v for n, (_, kept) in self.kept.items() for k, v in kept.items()
        }
        save_file(tensors, str(folder / KEPT_TENSORS))
        states = {str(n): state for n, (state, _) in self.kept.items()}
        (folder / KEPT_STATE).write_text(json.dumps(states))

    def load_kept(self, folder: Path) -> None:
        states = json.loads((folder / KEPT_STATE).read_text())
        tensors = load_file(str(folder / KEPT_TENSORS))
        merged = [n for n, m in enumerate(self.memories) if m.merges]
        if not set(merged) <= {int(key) for key in states}:
            raise ValueError(f"{folder}: kept memories {sorted(states)}, merged {merged}")
        for number in merged:  # kept ones beyond: written before a save that did not land
            prefix = f"memory.{number}."
            mine = {f"m.{k[len(prefix) :]}": v for k, v in tensors.items() if k.startswith(prefix)}
            self.kept[number] = (states[str(number)], mine)


# ---------------------------------------------------------------------------- the run
def train(args: argparse.Namespace, records: list[EditRecord], editor: ShardKeeper) -> None:
    """Edit the records the editor does not hold yet, saving the kept memories and the
    editor to OUT/checkpoint every --checkpoint-every edits."""
    folder = Path(args.out) / "checkpoint"
    bar = tqdm(total=len(records), initial=editor.num_edits, desc="sharded edits", unit="edit")
    for start in range(editor.num_edits, len(records), args.checkpoint_every):
        for r in records[start : start + args.checkpoint_every]:
            result = editor.edit(r.prompt, r.target, subject=r.subject)
            bar.update(1)
            bar.set_postfix(steps=result.steps, s_per_edit=f"{result.seconds:.1f}")
        editor.save_kept(folder)
        editor.save_pretrained(folder / "editor", replace=True)
    bar.close()


def setting_of(editor: WiseEditor, records: list[EditRecord], args: argparse.Namespace):
    """What a row of the table was trained with, and its steps and seconds per edit
    (from the edit log: the figures of the run that made the edits)."""
    cfg, log = editor.config, editor.edit_log
    if [(e["prompt"], e["target"]) for e in log] != [(r.prompt, r.target) for r in records]:
        raise SystemExit(f"the editor's {len(log)} edits are not the {len(records)} records")
    return {
        "edits": len(records),
        "data": args.data,
        "mask_ratio": cfg.mask_ratio,
        "shards": cfg.shards_per_merge,
        "shard_size": cfg.shard_size,
        "merge_density": cfg.merge_density,
        "memories": len(editor.memories),
        "sample": args.sample,
        "answer_sample": args.answer_sample,
        "steps_per_edit": statistics.fmean(e["steps"] for e in log),
        "s_per_edit": statistics.fmean(e["seconds"] for e in log),
    }


def evaluate(
    editor: WiseEditor, records: list[EditRecord], base: ProbeBaseline, args: argparse.Namespace
) -> dict[str, Any]:
    model, fmt = editor.model, editor.format
    scored = {}
    with torch.no_grad():
        rel = [token_accuracy(model, fmt, r.prompt, r.target) for r in records]
        for kind, sample in ((TEACHER_FORCED, args.sample), (ANSWER_EM, args.answer_sample)):
            picked = sample_indices(len(records), sample)
            subset = [records[i] for i in picked]
            scored[kind.name] = score(kind, model, fmt, subset, base.of(records, picked))
        routing = routing_scores(editor, records)
    assert routing is not None  # WISE routes
    summary = routing["summary"]
    own = summary["share_routed_to_own_memory"]
    return {
        "tf_rel_all": statistics.fmean(rel),
        "held_all": sum(a == 1.0 for a in rel) / len(rel),
        "tf": asdict(scored[TEACHER_FORCED.name]),
        "answer_em": asdict(scored[ANSWER_EM.name]),
        "own_memory": {"edit prompts": own["edit prompts"], "paraphrases": own["paraphrases"]},
        "unrelated_to_none": 1 - summary["share_routed_to_side_memory"]["unrelated"],
    }


def scored_indices(total: int, args: argparse.Namespace) -> list[int]:
    """The records whose locality an evaluation reads: those of both samples."""
    samples = (args.sample, args.answer_sample)
    return sorted({i for sample in samples for i in sample_indices(total, sample)})


@dataclass
class ProbeBaseline:
    """The unedited model's probe records of ``records[covered]`` (one per probed record,
    in order): only the records an evaluation scores, since the unedited model's
    probes of all 1000 records took ~13 minutes of a run and 800 were never read."""

    covered: list[int]
    base: Baseline

    def of(self, records: list[EditRecord], picked: list[int]) -> Baseline:
        """The probe records of ``records[picked]`` (each picked record covered)."""
        position: dict[int, int] = {}
        for i in self.covered:
            if records[i].loc and records[i].loc_ans:
                position[i] = len(position)
        missing = [i for i in picked if i not in self.covered]
        if missing:
            raise ValueError(f"the baseline does not cover records {missing[:5]}")
        return {
            name: [values[position[i]] for i in picked if i in position]
            for name, values in self.base.items()
        }

    @classmethod
    def load(cls, path: Path, total: int) -> ProbeBaseline:
        data = json.loads(path.read_text())
        if "covered" not in data:  # written before the baseline was cut to the samples
            return cls(list(range(total)), data)
        return cls(data["covered"], data["base"])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"covered": self.covered, "base": self.base}))


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from common import HEADLINE, overrides

    from wise_edit import WiseConfig, models
    from wise_edit.data import load_zsre_irrelevant

    out = Path(args.out)
    folder = out / "checkpoint"
    records = load_dataset(args.data, args.data_dir, limit=args.edits)
    model, tokenizer = models.load(args.model, device=args.device)
    pool = load_zsre_irrelevant(args.data_dir)
    fields = {
        **HEADLINE,
        "mask_ratio": args.mask_ratio,
        "shards_per_merge": args.shards,
        "shard_size": args.shard_size,
        "merge_density": args.merge_density if args.shards > 1 else 1.0,
        "merge_method": "ties",
        **overrides(args),
    }
    if (folder / "editor").exists():
        editor = ShardKeeper.from_pretrained(model, tokenizer, folder / "editor", pool)
        editor.load_kept(folder)
        saved = editor.config
        asked = (fields["mask_ratio"], fields["shards_per_merge"], fields["shard_size"])
        if (saved.mask_ratio, saved.shards_per_merge, saved.shard_size) != asked:
            raise SystemExit(f"{folder} holds another setting: {saved}; use another --out")
        base = ProbeBaseline.load(folder / "baseline.json", len(records))
        print(f"resumed at {editor.num_edits} edits", flush=True)
    else:
        config = WiseConfig.for_model(model, **fields)
        editor = ShardKeeper(model, tokenizer, config, irrelevant_prompts=pool)
        folder.mkdir(parents=True, exist_ok=True)
        covered = scored_indices(len(records), args)
        with torch.no_grad():
            probes = locality_baseline(
                model, editor.format, [records[i] for i in covered], Decoder(model, editor.format)
            )
        base = ProbeBaseline(covered, probes)
        base.save(folder / "baseline.json")
    train(args, records, editor)
    done = EvaluatedScores(folder / "scores.json", editor.num_edits)
    methods = args.methods.split(",") if editor.config.shards_per_merge > 1 else ["unsharded"]
    scores: dict[str, Any] = {}
    for method in methods:
        if method not in done:
            if method != "unsharded":
                editor.remerge(method)
            done.add(method, evaluate(editor, records, base, args))
        scores[method] = done[method]
        print(f"  {method}: {json.dumps(scores[method])}", flush=True)
    runs = {args.out: {"setting": setting_of(editor, records, args), "methods": scores}}
    for save in args.also or []:  # saved editors of the same records, the same baseline
        model, tokenizer = models.load(args.model, device=args.device)
        other = WiseEditor.from_pretrained(model, tokenizer, save, pool)
        label = "unsharded" if other.config.shards_per_merge == 1 else other.config.merge_method
        if f"also:{save}" not in done:
            done.add(f"also:{save}", evaluate(other, records, base, args))
        scores = {label: done[f"also:{save}"]}
        print(f"  {save}: {json.dumps(scores)}", flush=True)
        runs[save] = {"setting": setting_of(other, records, args), "methods": scores}
    return runs


class EvaluatedScores:
    """Each evaluation's scores, written as soon as it is done (an evaluation takes
    minutes, seven of them most of an hour), so a killed run does not score again what
    it already scored. Kept only for the number of edits they were scored at."""

    def __init__(self, path: Path, edits: int) -> None:
        self.path, self.edits = path, edits
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.scores: dict[str, Any] = saved.get("scores", {}) if saved.get("edits") == edits else {}

    def __contains__(self, name: str) -> bool:
        return name in self.scores

    def __getitem__(self, name: str) -> Any:
        return self.scores[name]

    def add(self, name: str, scores: dict[str, Any]) -> None:
        self.scores[name] = scores
        self.path.write_text(json.dumps({"edits": self.edits, "scores": self.scores}, indent=1))


# ---------------------------------------------------------------------------- report
def table(runs: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| setting | method | TF Rel (all) | held (all) | TF Gen | TF Loc"
        " | answer EM Rel / Gen / Loc | edit / para -> own memory | unrelated -> none"
        " | steps/edit, s/edit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in runs.values():
        s = result["setting"]
        label = (
            f"{s['shards']} x {s['shard_size']} edits, rho {s['mask_ratio']}"
            f" ({s['memories']} memories)"
        )
        for method, m in result["methods"].items():
            em, own = m["answer_em"], m["own_memory"]
            lines.append(
                f"| {label} | {method} | {m['tf_rel_all']:.3f} | {m['held_all']:.3f} "
                f"| {m['tf']['gen']:.3f} | {m['tf']['loc']:.3f} "
                f"| {em['rel']:.3f} / {em['gen']:.3f} / {em['loc']:.3f} "
                f"| {own['edit prompts']:.3f} / {own['paraphrases']:.3f} "
                f"| {m['unrelated_to_none']:.3f} "
                f"| {s['steps_per_edit']:.1f}, {s['s_per_edit']:.1f} |"
            )
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [
        (f"{m}" if m != "unsharded" else f"unsharded\n{r['setting']['shard_size']}/memory", m_res)
        for r in runs.values()
        for m, m_res in r["methods"].items()
    ]
    metrics = {
        "held (TF Rel = 1)": lambda m: m["held_all"],
        "TF Gen": lambda m: m["tf"]["gen"],
        "TF Loc": lambda m: m["tf"]["loc"],
        "answer EM Rel": lambda m: m["answer_em"]["rel"],
    }
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(bars)), 4))
    width = 0.8 / len(metrics)
    for j, (name, get) in enumerate(metrics.items()):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(bars))]
        ax.bar(xs, [get(m) for _, m in bars], width, label=name)
    ax.set_xticks(range(len(bars)), [label for label, _ in bars])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(metrics), loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from common import editing_parser

    parser = editing_parser(__doc__, edits=1000)
    parser.add_argument("--data", default="zsre", choices=["zsre", "counterfact"])
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=5)
    parser.add_argument("--merge-density", type=float, default=0.53)
    parser.add_argument("--methods", default=",".join(MERGE_METHODS))
    parser.add_argument("--sample", type=int, default=200, help="records for TF Gen/Loc")
    parser.add_argument("--answer-sample", type=int, default=100, help="records for answer EM")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--out", help="run folder (resumes from OUT/checkpoint)")
    parser.add_argument(
        "--also", nargs="+", help="saved editors of the same records to score beside the run"
    )
    parser.add_argument("--load", nargs="+", help="report run folders instead of editing")
    parser.add_argument("--plot", help="write a bar chart of the methods to this PNG")
    args = parser.parse_args()
    unknown = set(args.methods.split(",")) - set(MERGE_METHODS)
    if unknown:
        parser.error(f"unknown merge methods {sorted(unknown)}; choose from {list(MERGE_METHODS)}")
    if not args.load and not args.out:
        parser.error("give --out (a run folder) or --load")
    if args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be >= 1")
    runs: dict[str, dict[str, Any]] = {}
    for folder in args.load or []:
        runs |= json.loads((Path(folder) / "merge_compare.json").read_text())
    if not args.load:
        runs = run(args)
        Path(args.out, "merge_compare.json").write_text(json.dumps(runs, indent=1))
    print(table(runs))
    if args.plot:
        plot(runs, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
