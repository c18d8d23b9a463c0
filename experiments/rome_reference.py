# Experiment: Does our ROME (and MEMIT) edit of the bundled SmolLM2-135M match the reference
#   code (kmeng01/memit) on the same record, layer, context prefixes and statistics C?
# Decided: ROME differed from the reference by 7% (v* written at the mean key, not the raw
#   prompt's; fixed), now 1.5e-4; MEMIT 6e-5; ROME's v settings became EasyEdit's LLaMA ones.
# Ran at: 876a994. Output: printed, --out (report.json, reference.log); docs/results.md
"""One edit of the bundled model by wise-edit's ROME and MEMIT and by the reference code
(kmeng01/memit: `rome/rome_main.py`, `memit/memit_main.py`), on the same ZsRE record, the
same layer, the same context prefixes (ours, handed to the reference's template cache) and
the same C (ours, from the key-statistics cache, handed to the reference's `get_inv_cov` /
`get_cov`). Prints ||ΔW_ours - ΔW_ref|| / ||ΔW_ref||, the cosine of the two updates and
each edited model's greedy answer to the edit prompt (raw format).

The reference runs from a throw-away copy outside the project: `--mirror` is the git
directory `fetch github:kmeng01/memit` gave; the script copies `rome/`, `memit/`, `util/`
and `globals.yml` into `--ref-dir` and rewrites its "cuda" devices to "cpu". It needs only
torch and transformers (a stub stands in for `datasets`, which only the statistics pass
the reference does not run here imports). Our side runs with ``train_stop=False`` (the
reference trains the target alone) and the reference with one more step of its loop (its
last step measures the loss without updating; ours updates after every measured step), so
both take the same number of Adam updates.

    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/rome_reference.py \\
        --mirror /work/.mirror/kmeng01+memit/repo --ref-dir /tmp/refrome --out /tmp/refrome-out
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

from wise_edit import models
from wise_edit.baselines import MEMITConfig, MEMITEditor, ROMEConfig, ROMEEditor
from wise_edit.baselines import rome as rome_module
from wise_edit.baselines.closed_form import rome_update
from wise_edit.core.prompts import PromptFormat
from wise_edit.metrics import answer_match


def setup_reference(mirror: str, ref_dir: Path) -> str:
    """The reference's code, copied out of the mirror and set to run on the CPU."""
    ref_dir.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", f"--git-dir={mirror}", "archive", "HEAD", "rome", "memit", "util", "globals.yml"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "x", "-C", str(ref_dir)], input=archive, check=True)
    for path in ref_dir.rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace('"cuda"', '"cpu"'))
    # transformers 4.x decoder layers returned a tuple, LlamaDecoderLayer now returns the
    # hidden states alone: compute_z reads and edits `output[0]`, so take the tensor itself
    z_file = ref_dir / "memit" / "compute_z.py"
    z = z_file.read_text()
    z = z.replace(
        "import torch\n",
        "import torch\n\n\ndef _first(x):\n    return x if torch.is_tensor(x) else x[0]\n",
        1,
    )
    z = z.replace("cur_out[0][", "_first(cur_out)[")
    loss_out = "tr[hparams.layer_module_tmp.format(loss_layer)].output"
    z = z.replace(loss_out + "[0][", f"_first({loss_out})[")
    z_file.write_text(z)
    commit = subprocess.run(
        ["git", f"--git-dir={mirror}", "rev-parse", "HEAD"], check=True, capture_output=True
    )
    return commit.stdout.decode().strip()


def import_reference(ref_dir: Path) -> None:
    stub = types.ModuleType("datasets")  # rome/layer_stats.py imports it; never called here
    stub.load_dataset = None
    sys.modules.setdefault("datasets", stub)
    sys.path.insert(0, str(ref_dir))
    here = os.getcwd()
    os.chdir(ref_dir)  # util/globals.py reads globals.yml from the working directory
    try:
        import memit.memit_main  # noqa: F401
        import rome.rome_main  # noqa: F401
    finally:
        os.chdir(here)


def greedy(model, tok, prompt: str, tokens: int = 10) -> str:
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :])


def answers(model, tok, fmt, prompt: str, target: str) -> dict:
    return {
        "greedy": greedy(model, tok, prompt),
        "answer_em": answer_match(model, fmt, prompt, target),
    }


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.double(), ref.double()
    return {
        "rel_diff": float((ours - ref).norm() / ref.norm()),
        "cosine": float((ours * ref).sum() / (ours.norm() * ref.norm())),
        "norm_ours": float(ours.norm()),
        "norm_ref": float(ref.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", required=True)
    parser.add_argument("--ref-dir", default="/tmp/refrome")
    parser.add_argument("--out", default=None)
    parser.add_argument("--record", type=int, default=0)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["rome", "memit"])
    parser.add_argument(
        "--set", action="append", default=[], help="our config override k=v (JSON value)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    ref_dir = Path(args.ref_dir)
    ref_commit = setup_reference(args.mirror, ref_dir)
    import_reference(ref_dir)
    import memit.memit_main as ref_memit
    import rome.compute_u as ref_u
    import rome.rome_main as ref_rome
    from memit.memit_hparams import MEMITHyperParams
    from rome.rome_hparams import ROMEHyperParams

    model, tok = models.load("smollm2-135m")
    model.config.n_embd = model.config.hidden_size  # compute_v / compute_z read GPT-2's name
    fmt = PromptFormat.create(tok, "raw")
    record = json.loads(Path("../shared/data/zsre/zsre_edit.json").read_text())[args.record]
    prompt, target, subject = record["src"], record["alt"], record["subject"]
    assert subject in prompt
    request = {
        "prompt": prompt.replace(subject, "{}", 1),
        "subject": subject,
        "target_new": {"str": target},
        "case_id": args.record,
    }
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    common = dict(prompt_format="raw", train_stop=False, layer=args.layer, **overrides)
    weight_path = f"model.layers.{args.layer}.mlp.down_proj.weight"
    report: dict = {"record": args.record, "layer": args.layer, "reference_commit": ref_commit}
    report["unedited"] = answers(model, tok, fmt, prompt, target)
    log = io.StringIO()

    if "rome" in args.methods:
        config = ROMEConfig.for_model(model, **common)
        editor = ROMEEditor(model, tok, config)
        seen: dict = {}
        real_update, real_fit = rome_module.rome_update, editor._fit_value

        def spy(key, residual, moment, at=None):
            seen.update(key=key, moment=moment, raw=at)
            return real_update(key, residual, moment, at)

        rome_module.rome_update = spy
        editor._fit_value = lambda plan: seen.setdefault("fit", real_fit(plan))
        result = editor.edit(prompt, target, subject=subject)
        rome_module.rome_update = real_update
        ours = editor.layer.delta.detach().clone().double()
        ours_answers = answers(model, tok, fmt, prompt, target)
        # before the fix: v* written at the mean key (residual v* - W k_mean)
        v_star, weight = seen["fit"][1], editor.layer.weight.double()
        old = rome_update(seen["key"], v_star - weight @ seen["key"], seen["moment"])
        with torch.no_grad():
            editor.layer.delta.copy_(old.float())
        old_answers = answers(model, tok, fmt, prompt, target)
        prefixes, moment = editor.prefixes, seen["moment"]
        editor.detach()

        hp = ROMEHyperParams(
            layers=[args.layer],
            fact_token="subject_last",
            v_num_grad_steps=config.max_steps + 1,
            v_lr=config.lr,
            v_loss_layer=model.config.num_hidden_layers - 1,
            v_weight_decay=config.value_decay,
            clamp_norm_factor=config.clamp_norm_factor,
            kl_factor=config.kl_factor,
            mom2_adjustment=True,
            context_template_length_params=[[5, 10], [10, 10]],
            rewrite_module_tmp="model.layers.{}.mlp.down_proj",
            layer_module_tmp="model.layers.{}",
            mlp_module_tmp="model.layers.{}.mlp",
            attn_module_tmp="model.layers.{}.self_attn",
            ln_f_module="model.norm",
            lm_head_module="model.embed_tokens",  # tied to the input embeddings
            mom2_dataset="wikipedia",
            mom2_n_samples=100000,
            mom2_dtype="float32",
        )
        ref_rome.CONTEXT_TEMPLATES_CACHE = ["{}"] + [p + ". {}" for p in prefixes]
        # the reference inverts its fp32 moment and casts to fp32 (compute_u.get_inv_cov)
        ref_u.get_inv_cov = lambda *a, **k: torch.inverse(moment.float()).float()
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.padding_side = "right"  # the reference's indexing assumes right padding (GPT-2's)
        original = model.get_parameter(weight_path).detach().clone()
        with contextlib.redirect_stdout(log):
            ref_rome.apply_rome_to_model(model, tok, [request], hp)
        ref = (model.get_parameter(weight_path).detach() - original).double()
        ref_answers = answers(model, tok, fmt, prompt, target)
        with torch.no_grad():
            model.get_parameter(weight_path).copy_(original)
        report["rome"] = {
            "ours": {**ours_answers, "steps": result.steps, "loss": result.loss},
            "ours_before_fix": {**old_answers, **compare(old, ref)},
            "reference": ref_answers,
            **compare(ours, ref),
        }
        print(json.dumps(report["rome"], indent=1), flush=True)

    if "memit" in args.methods:
        config = MEMITConfig.for_model(model, span=1, **common)
        tok.padding_side = "left"
        editor = MEMITEditor(model, tok, config)
        result = editor.edit(prompt, target, subject=subject)
        ours = editor.layer.delta.detach().clone().double()
        ours_answers = answers(model, tok, fmt, prompt, target)
        prefixes, moment = editor.prefixes, editor.key_stats(args.layer).moment
        editor.detach()
        hp = MEMITHyperParams(
            layers=[args.layer],
            layer_selection="all",
            fact_token="subject_last",
            v_num_grad_steps=config.max_steps + 1,
            v_lr=config.lr,
            v_loss_layer=model.config.num_hidden_layers - 1,
            v_weight_decay=config.value_decay,
            clamp_norm_factor=config.clamp_norm_factor,
            kl_factor=config.kl_factor,
            mom2_adjustment=True,
            mom2_update_weight=config.moment_weight,
            rewrite_module_tmp="model.layers.{}.mlp.down_proj",
            layer_module_tmp="model.layers.{}",
            mlp_module_tmp="model.layers.{}.mlp",
            attn_module_tmp="model.layers.{}.self_attn",
            ln_f_module="model.norm",
            lm_head_module="model.embed_tokens",  # tied to the input embeddings
            mom2_dataset="wikipedia",
            mom2_n_samples=100000,
            mom2_dtype="float32",
        )
        ref_memit.CONTEXT_TEMPLATES_CACHE = [["{}"], [p + ". {}" for p in prefixes]]
        ref_memit.get_cov = lambda *a, inv=False, **k: (
            torch.inverse(moment.float()) if inv else moment.float()
        )
        tok.pad_token = tok.pad_token or tok.eos_token
        tok.padding_side = "right"
        original = model.get_parameter(weight_path).detach().clone()
        with contextlib.redirect_stdout(log):
            ref_memit.apply_memit_to_model(model, tok, [request], hp)
        ref = (model.get_parameter(weight_path).detach() - original).double()
        ref_answers = answers(model, tok, fmt, prompt, target)
        with torch.no_grad():
            model.get_parameter(weight_path).copy_(original)
        report["memit"] = {
            "ours": {**ours_answers, "steps": result.steps, "loss": result.loss},
            "reference": ref_answers,
            **compare(ours, ref),
        }
        print(json.dumps(report["memit"], indent=1), flush=True)

    print(json.dumps(report, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        (out / "reference.log").write_text(log.getvalue())


if __name__ == "__main__":
    main()
