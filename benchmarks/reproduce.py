"""Reproduce the 2DGBNN paper's tables at a CPU budget, side by side; one command per table.

    python benchmarks/reproduce.py cifar10   --data-dir ../shared/data --out runs/reproduce
    python benchmarks/reproduce.py ablations --data-dir ../shared/data --out runs/reproduce
    python benchmarks/reproduce.py shift     --data-dir ../shared/data --out runs/reproduce
    python benchmarks/reproduce.py mnist     --data-dir ../shared/data --out runs/reproduce

Budget (the same for every row): ``configs/cifar10_resnet20_budget.yaml``, 4 epochs of
stage 0, 2 epochs of Bayesian training after it (stage 1, spike-and-slab), 1 epoch of
2DGBNN fine-tuning; SSVI, which has no stage 0, trains 6 epochs from scratch. Every row
samples weights with the budget config's estimator (``weight``). The CIFAR-10 rows share
one stage-0 network and one stage-1 posterior (``pipeline.branch_run``), the ablations
branch off that stage-1 posterior, and ``shift`` scores the CIFAR-10 models on corrupted
CIFAR-10 test images and on MNIST digits. Every run is an ordinary run folder under
``--out``: kill the script and start it again, and it resumes where it stopped.
Each table is written to ``--results`` (default ``benchmarks/results/reproduce-<table>.json``)
with the command, the machine and the wall time of every stage. ``--set key=value``
applies to every run (the test suite shrinks the budget with it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import pyro
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyro_gbnn.config import apply_overrides, load_config  # noqa: E402
from pyro_gbnn.data import load_dataset, make_loader  # noqa: E402
from pyro_gbnn.metrics import calibration_bins, classification_metrics, ood_metrics  # noqa: E402
from pyro_gbnn.pipeline import branch_run, model_after_stage, open_run, run_fit  # noqa: E402
from pyro_gbnn.predict import predict  # noqa: E402
from pyro_gbnn.shift import (  # noqa: E402
    CORRUPTIONS,
    cifar10c_folder,
    cifar10c_test_set,
    corrupted_test_set,
    digits_as_cifar_test_set,
    svhn_test_set,
)

BUDGET = ROOT / "configs" / "cifar10_resnet20_budget.yaml"
MNIST_BUDGET = ROOT / "configs" / "mnist_quick_2dgbnn.yaml"

# Method settings at the budget: each method's shipped CIFAR-10 config (configs/cifar10_resnet20_<method>.yaml)
# with its epochs cut to the budget.
INT8 = ["method=int8"]
MEAN_FIELD_LRT = ["method=mean-field", "bnn.estimator=local"]
SPIKE_SLAB = ["method=spike-slab", "spike_slab.epochs=2", "spike_slab.lr=0.0001", "spike_slab.lr_scale=0.01",
              "spike_slab.schedule=cosine", "spike_slab.eval_samples=4", "spike_slab.prior_inclusion=0.1", "prune.epochs=0"]
SSVI = ["method=ssvi", "ssvi.epochs=6", "ssvi.optimizer=sgd", "ssvi.lr=0.01", "ssvi.lr_scale=0.01", "ssvi.momentum=0.9",
        "ssvi.weight_decay=0.0005", "ssvi.schedule=cosine", "ssvi.eval_samples=4", "ssvi.kl_warmup_epochs=3",
        "ssvi.kl_scale=0.01", "ssvi.density=0.1"]

# (row, run folder under <out>/cifar10, stage whose results the row shows)
CIFAR_ROWS = [
    ("deterministic", "2dgbnn", "deterministic"),
    ("mean-field", "2dgbnn", "mean_field"),
    ("mean-field, local reparam.", "mean-field-lrt", "mean_field"),
    ("2dgbnn", "2dgbnn", "fine_tune"),
    ("int8", "int8", "quantize"),
    ("spike-slab", "spike-slab", "prune"),
    ("ssvi", "ssvi", "ssvi"),
]

# Stage 2 and 3 variants on the CIFAR-10 stage-1 posterior; the base run is each table's reference row.
# "No outliers": neither criterion, and no small clusters dissolved (their members would become outliers).
NO_OUTLIERS = ["sharing.tau_w=null", "sharing.top_grad_fraction=null", "sharing.min_cluster_size=0"]
ABLATIONS = {
    "table5_outliers_ellipses": {
        "no outliers": NO_OUTLIERS,
        "no ellipses": ["sharing.blend=false"],
        "neither": [*NO_OUTLIERS, "sharing.blend=false"],
    },
    "table10_merging": {
        "no merging": ["sharing.merge=false"],
        "App. H threshold": ["sharing.merge_tau_w2sq=1.5e-7", "sharing.merge_tau_overlap=null"],
    },
    "blend_rule": {"own": ["sharing.blend_rule=own"]},
    "table8_tau_w": {f"tau_w={tau}": [f"sharing.tau_w={tau}"] for tau in (0.1, 0.4, 0.6)},
    "semantics": {name: [f"fine_tune.semantics={name}"] for name in ("hierarchical", "independent")},
}
BASE_LABEL = {"table5_outliers_ellipses": "full", "table10_merging": "merging", "blend_rule": "every", "table8_tau_w": "tau_w=0.2", "semantics": "tied"}

ROW_KEYS = ("accuracy", "nll", "ece", "brier", "batchnorm", "n_params_trainable", "n_params_paper", "size_bytes", "size_bytes_index",
            "n_outliers", "n_ellipses", "n_gaussians", "sparsity", "density", "epochs", "wall_time_s")
SEVERITIES = (1, 3, 5)


def machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def fit(config: dict, out: Path, data_dir: str) -> dict:
    """Run or resume ``config`` in ``out``; a finished run only re-reads its results."""
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    print(f"-- {out}", flush=True)
    return run_fit(config, out, resume=(out / "checkpoint.pt").exists(), progress=False, data_dir=data_dir)


def fresh_config(file: Path, overrides: list[str], args: argparse.Namespace) -> dict:
    return apply_overrides(load_config(file), [f"data.dir={args.data_dir}", *overrides, *args.set])


def branch(base: Path, out: Path, after: str, overrides: list[str], args: argparse.Namespace) -> dict:
    return fit(branch_run(base, out, after, [*overrides, *args.set]), out, args.data_dir)


def row(metrics: dict, stage: str) -> dict:
    result = metrics["stages"][stage]
    stages = list(metrics["stages"])
    return {
        **{key: result[key] for key in ROW_KEYS if key in result},
        "total_wall_time_s": round(sum(metrics["stages"][s]["wall_time_s"] for s in stages[: stages.index(stage) + 1]), 1),
    }


def base_run(args: argparse.Namespace) -> dict:
    """The CIFAR-10 2DGBNN run every other CIFAR-10 row and ablation starts from."""
    return fit(fresh_config(BUDGET, [], args), args.out / "cifar10" / "2dgbnn", args.data_dir)


def cifar10_runs(args: argparse.Namespace) -> dict[str, dict]:
    """The CIFAR-10 run folders: 2DGBNN (rows deterministic, mean-field, 2DGBNN), mean-field
    with local reparameterization (from the same stage 0), INT8, spike-and-slab, SSVI."""
    folder = args.out / "cifar10"
    runs = {"2dgbnn": base_run(args)}
    runs["mean-field-lrt"] = branch(folder / "2dgbnn", folder / "mean-field-lrt", "deterministic", MEAN_FIELD_LRT, args)
    runs["int8"] = branch(folder / "2dgbnn", folder / "int8", "mean_field", INT8, args)
    runs["spike-slab"] = branch(folder / "2dgbnn", folder / "spike-slab", "deterministic", SPIKE_SLAB, args)
    runs["ssvi"] = fit(fresh_config(BUDGET, SSVI, args), folder / "ssvi", args.data_dir)
    return runs


# The config section whose KL weight trained a stage's posterior.
POSTERIOR_SECTION = {"mean_field": "mean_field", "quantize": "mean_field", "fine_tune": "fine_tune", "prune": "spike_slab", "ssvi": "ssvi"}


def posterior_settings(folder: Path, stage: str) -> dict:
    """The settings that temper a row's posterior, stated beside its numbers: the weight prior
    and the KL weight its stage trained with (``kl_scale``, 1: the ELBO); none for stage 0."""
    if stage not in POSTERIOR_SECTION:
        return {}
    config = yaml.safe_load((folder / "config.yaml").read_text())
    prior = config["bnn"]["prior"]
    args = ", ".join(f"{k}={v}" for k, v in (prior.get("args") or {}).items())
    return {"prior": f"{prior['class']}({args})", "kl_scale": config[POSTERIOR_SECTION[stage]]["kl_scale"]}


def table_cifar10(args: argparse.Namespace) -> dict:
    runs = cifar10_runs(args)
    rows = {name: row(runs[run], stage) | posterior_settings(args.out / "cifar10" / run, stage) for name, run, stage in CIFAR_ROWS}
    mf, gbnn = rows["mean-field"], rows["2dgbnn"]
    checks = {
        "accuracy_gap_points": round(100 * (mf["accuracy"] - gbnn["accuracy"]), 2),
        "params_ratio": round(mf["n_params_trainable"] / gbnn["n_params_trainable"], 1),
        "ece_minus_mean_field": round(gbnn["ece"] - mf["ece"], 4),
        "size_bytes_ratio": round(mf["size_bytes"] / gbnn["size_bytes"], 2),
    }
    return {"rows": rows, "int8_by_scale_bits": runs["int8"]["stages"]["quantize"].get("by_scale_bits"), "checks_2dgbnn_vs_mean_field": checks}


def table_ablations(args: argparse.Namespace) -> dict:
    base_dir = args.out / "cifar10" / "2dgbnn"
    base = base_run(args)
    tables = {}
    for table in args.only or ABLATIONS:
        variants = ABLATIONS[table]
        rows = {BASE_LABEL[table]: {"sharing": row(base, "sharing"), "fine_tune": row(base, "fine_tune")}}
        for label, overrides in variants.items():
            if args.variants and label not in args.variants:
                continue
            out = args.out / "ablations" / f"{table}-{label.replace(' ', '_').replace('=', '')}"
            metrics = branch(base_dir, out, "mean_field", overrides, args)
            rows[label] = {"sharing": row(metrics, "sharing"), "fine_tune": row(metrics, "fine_tune")}
        tables[table] = rows
        if args.partial is not None:  # each finished ablation table is kept even if a later one is stopped
            args.partial(tables)
    return tables


def _scored(bnn, guide, dataset, args: argparse.Namespace, samples: int, draws=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    loader = make_loader(dataset, args.eval_batch_size, shuffle=False)
    prediction = predict(bnn, guide, loader, num_samples=samples, keep_samples=True, draws=draws)
    return prediction.probs, prediction.labels, prediction.sample_probs


def table_shift(args: argparse.Namespace) -> dict:
    runs = cifar10_runs(args)
    cifar = load_dataset("cifar10", args.data_dir, augment=False)
    mnist = load_dataset("mnist", args.data_dir, augment=False)
    order = torch.randperm(len(cifar.test), generator=torch.Generator().manual_seed(0))[: args.shift_examples]
    clean = cifar.test.subset(order, cifar.test.transform)
    labels = clean.targets
    real = cifar10c_folder(args.data_dir)
    if real is None:
        sets = {"clean": clean} | {f"{name}/{s}": corrupted_test_set(clean, name, s, seed=s) for name in CORRUPTIONS for s in SEVERITIES}
    else:
        sets = {"clean": clean} | {f"{name}/{s}": cifar10c_test_set(real, name, s, cifar.test.transform, args.shift_examples)
                                   for name in CORRUPTIONS for s in SEVERITIES}
    ood_sets = {"mnist": digits_as_cifar_test_set(mnist.test, cifar.test.transform, args.shift_examples, seed=0)}
    svhn = svhn_test_set(args.data_dir, cifar.test.transform, args.shift_examples, seed=0, download=args.download)
    if svhn is not None:
        ood_sets["svhn"] = svhn
    report = {"examples": len(clean), "corruptions": "CIFAR-10-C" if real else "made on the fly (pyro_gbnn.shift)",
              "ood_examples": {k: len(v) for k, v in ood_sets.items()}, "models": {}}
    opened = {}  # a run folder's data and outputs, read once for all the rows it holds
    for name, run, stage in CIFAR_ROWS:
        started = time.perf_counter()
        if run not in opened:
            opened[run] = open_run(args.out / "cifar10" / run, args.data_dir)
        bnn, guide = model_after_stage(opened[run], stage)
        pyro.set_rng_seed(0)  # each model's draws from the same seed: a row does not depend on the rows before it
        samples = 1 if guide is None else args.samples
        draws = opened[run].fixed_draws(bnn, guide, samples)  # the run's predict.batchnorm: per-draw statistics, or None
        scores, clean_probs = {}, None
        for key, dataset in sets.items():
            probs, y, sample_probs = _scored(bnn, guide, dataset, args, samples, draws)
            scores[key] = classification_metrics(probs, y)
            if key == "clean":
                clean_probs, clean_samples = probs, sample_probs
        ood_scores = {}
        for ood_name, ood in ood_sets.items():
            probs_out, _, samples_out = _scored(bnn, guide, ood, args, samples, draws)
            ood_scores[ood_name] = ood_metrics(clean_probs, probs_out, clean_samples, samples_out) if guide is not None \
                else ood_metrics(clean_probs, probs_out)
        by_severity = {
            str(s): {m: sum(scores[f"{c}/{s}"][m] for c in CORRUPTIONS) / len(CORRUPTIONS) for m in ("accuracy", "nll", "ece")}
            for s in SEVERITIES
        }
        bins = dict(zip(("count", "confidence_sum", "correct_sum"), (b.tolist() for b in calibration_bins(clean_probs, labels))))
        report["models"][name] = {"clean": scores["clean"], "corrupted_mean_by_severity": by_severity, "corrupted": scores,
                                  **{f"ood_{k}": v for k, v in ood_scores.items()}, "clean_calibration_bins": bins,
                                  "wall_time_s": round(time.perf_counter() - started, 1)}
        print(json.dumps({name: {"clean": scores["clean"]["accuracy"], "severity5": by_severity["5"]["accuracy"], **ood_scores}}), flush=True)
    return report


def table_mnist(args: argparse.Namespace) -> dict:
    tables = {}
    for model in ("lenet", "resnet20"):
        metrics = fit(fresh_config(MNIST_BUDGET, [f"model={model}", "bnn.estimator=weight"], args), args.out / "mnist" / model, args.data_dir)
        tables[model] = {"deterministic": row(metrics, "deterministic"), "mean-field": row(metrics, "mean_field"), "2dgbnn": row(metrics, "fine_tune")}
    return tables


# The paper's numbers beside ours (accuracy %, NLL, ECE); None: the paper has no such row.
PAPER = {
    "cifar10": {  # ResNet-20: Table 9 (deterministic), Table 5 (2DGBNN)
        "deterministic": (91.84, 0.246, 0.031), "mean-field": None, "mean-field, local reparam.": None,
        "2dgbnn": (90.92, 0.265, 0.040),
        "int8": None, "spike-slab": None, "ssvi": None,  # INT8: see int8_sigma (its rows by bits of the std)
    },
    "int8_sigma": {  # Table 4: INT8 of Subedar et al. (vanilla-trained BNN), SIGMA4/2/1 taken as 4/2/1-bit stds
       "4": (90.92, 0.266, 1.778), "2": (90.85, 0.273, 2.547), "1": (90.96, 0.266, 0.711)},
    "table5_outliers_ellipses": {"full": (90.92, 0.265, 0.040), "no ellipses": (90.43, 0.304, 0.043),
                                 "no outliers": (90.18, 0.308, 0.026), "neither": (90.01, 0.318, 0.029)},
    "table10_merging": {"merging": (91.02, 0.3066, 0.0374), "no merging": (88.77, 0.3792, 0.0500)},
    "table8_tau_w": {"tau_w=0.1": (91.14, 0.376, 0.0197), "tau_w=0.2": (91.04, 0.303, 0.037),
                     "tau_w=0.4": (90.53, 0.396, 0.0279), "tau_w=0.6": (89.78, 0.322, 0.038)},
    "semantics": {},
    "blend_rule": {},
    "mnist_resnet20_2dgbnn": (99.52, 0.013, 0.001),  # Table 4, without pre-training
}


def _paper(cells: tuple | None) -> str:
    return " | ".join(f"{v:g}" for v in cells) if cells else "- | - | -"


def _metrics(r: dict) -> str:
    return f"{100 * r['accuracy']:.2f} | {r['nll']:.3f} | {r['ece']:.3f}"


def _batchnorm(name: str, r: dict) -> str:
    """How a row's BatchNorm layers were scored; rows from before ``predict.batchnorm`` existed used running statistics."""
    return "-" if name == "deterministic" else r.get("batchnorm", "running")


def _tempering(r: dict) -> str:
    return f"{r['prior']}, {r['kl_scale']:g}" if "prior" in r else "-"


def _count(r: dict, key: str) -> str:
    return f"{r[key]:,}" if key in r else "-"


def render_cifar10(report: dict) -> str:
    rows = report["result"]["rows"]
    lines = ["| method | acc % | NLL | ECE | paper acc % | paper NLL | paper ECE | prior, KL weight | BatchNorm | params trained | "
             "size bytes (index) | time s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for name, r in rows.items():
        index = f" ({r['size_bytes_index']:,})" if "size_bytes_index" in r else ""
        lines.append(f"| {name} | {_metrics(r)} | {_paper(PAPER['cifar10'][name])} | {_tempering(r)} | {_batchnorm(name, r)} | "
                     f"{r['n_params_trainable']:,} | {r['size_bytes']:,}{index} | {r['total_wall_time_s']:.0f} |")
    for bits, r in (report["result"].get("int8_by_scale_bits") or {}).items():
        lines.append(f"| int8, {bits}-bit std | {_metrics(r)} | {_paper(PAPER['int8_sigma'].get(bits))} | - | - | - | {r['size_bytes']:,} | - |")
    return "\n".join(lines)


def render_ablations(report: dict) -> str:
    parts = []
    for table, rows in report["result"].items():
        lines = [f"**{table}**", "", "| variant | acc % | NLL | ECE | paper acc % | paper NLL | paper ECE | outliers | ellipses | Gaussians | params trained | size bytes |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, stages in rows.items():
            r = stages["fine_tune"]
            lines.append(f"| {label} | {_metrics(r)} | {_paper(PAPER[table].get(label))} | {_count(r, 'n_outliers')} | "
                         f"{_count(r, 'n_ellipses')} | {_count(r, 'n_gaussians')} | {r['n_params_trainable']:,} | {r['size_bytes']:,} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render_shift(report: dict) -> str:
    models = report["result"]["models"]
    ood_names = [k.removeprefix("ood_") for k in next(iter(models.values())) if k.startswith("ood_")]
    label = {"mnist": "MNIST", "svhn": "SVHN"}
    lines = ["| model | clean acc % | clean ECE | acc % sev 1 / 3 / 5 | ECE sev 1 / 3 / 5 | NLL sev 5 | "
             + " | ".join(f"{label.get(n, n)} AUROC entropy / MI | {label.get(n, n)} AUPR entropy / MI | {label.get(n, n)} FPR95 entropy / MI"
                          for n in ood_names) + " |",
             "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---: | ---:" for _ in ood_names) + " |"]
    for name, m in models.items():
        sev = m["corrupted_mean_by_severity"]
        pair = lambda ood, key: f"{ood[f'entropy_{key}']:.3f} / " + (f"{ood[f'mi_{key}']:.3f}" if f"mi_{key}" in ood else "-")  # noqa: E731
        lines.append(f"| {name} | {100 * m['clean']['accuracy']:.2f} | {m['clean']['ece']:.3f} | "
                     + " / ".join(f"{100 * sev[s]['accuracy']:.1f}" for s in ("1", "3", "5")) + " | "
                     + " / ".join(f"{sev[s]['ece']:.3f}" for s in ("1", "3", "5"))
                     + f" | {sev['5']['nll']:.3f} | "
                     + " | ".join(" | ".join(pair(m[f"ood_{n}"], key) for key in ("auroc", "aupr", "fpr95")) for n in ood_names) + " |")
    return "\n".join(lines)


def render_mnist(report: dict) -> str:
    lines = ["| network | method | acc % | NLL | ECE | paper acc % | paper NLL | paper ECE | params trained | size bytes | time s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, rows in report["result"].items():
        for name, r in rows.items():
            paper = PAPER["mnist_resnet20_2dgbnn"] if (model, name) == ("resnet20", "2dgbnn") else None
            lines.append(f"| {model} | {name} | {_metrics(r)} | {_paper(paper)} | {r['n_params_trainable']:,} | {r['size_bytes']:,} | {r['total_wall_time_s']:.0f} |")
    return "\n".join(lines)


RENDERERS = {"cifar10": render_cifar10, "ablations": render_ablations, "shift": render_shift, "mnist": render_mnist}


def figures(reports: dict[str, dict], folder: Path) -> list[Path]:
    """Accuracy against trained parameters (CIFAR-10 table) and accuracy under corruption by severity (shift table)."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "cifar10" in reports:
        ax = Figure(figsize=(5, 3.5)).subplots()
        for name, r in reports["cifar10"]["result"]["rows"].items():
            ax.scatter(r["n_params_trainable"], 100 * r["accuracy"])
            ax.annotate(name, (r["n_params_trainable"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", xlabel="trained parameters", ylabel="test accuracy (%)", title="CIFAR-10 ResNet-20 at the budget")
        written.append(folder / "cifar10_accuracy_vs_parameters.png")
        ax.figure.tight_layout()
        ax.figure.savefig(written[-1], dpi=120)
    if "shift" in reports:
        ax = Figure(figsize=(5, 3.5)).subplots()
        for name, m in reports["shift"]["result"]["models"].items():
            accuracy = [100 * m["clean"]["accuracy"]] + [100 * m["corrupted_mean_by_severity"][s]["accuracy"] for s in ("1", "3", "5")]
            ax.plot([0, 1, 3, 5], accuracy, marker="o", label=name)
        ax.set(xlabel="corruption severity (0: clean)", ylabel="accuracy (%)", title="CIFAR-10 under corruption (mean of 4)")
        ax.legend(fontsize=7)
        written.append(folder / "cifar10_shift_accuracy.png")
        ax.figure.tight_layout()
        ax.figure.savefig(written[-1], dpi=120)
        models = reports["shift"]["result"]["models"]
        columns = (len(models) + 1) // 2
        fig = Figure(figsize=(2.8 * columns, 5.6))
        axes = fig.subplots(2, columns, sharex=True, sharey=True).reshape(-1)
        for ax, (name, m) in zip(axes, models.items()):
            bins = {k: torch.tensor(v) for k, v in m.get("clean_calibration_bins", {}).items()}
            if not bins:
                continue
            n_bins, filled = len(bins["count"]), bins["count"] > 0
            left = torch.arange(n_bins)[filled] / n_bins
            ax.bar(left, (bins["correct_sum"] / bins["count"].clamp(min=1))[filled], width=1 / n_bins, align="edge", edgecolor="black")
            ax.plot([0, 1], [0, 1], "--", color="gray")
            ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}: ECE {m['clean']['ece']:.3f}")
        for ax in axes[columns:]:
            ax.set_xlabel("confidence")
        for ax in axes[::columns]:
            ax.set_ylabel("accuracy")
        written.append(folder / "cifar10_reliability.png")
        fig.tight_layout()
        fig.savefig(written[-1], dpi=110)
    return written


def report_markdown(results: Path, document: Path, figure_folder: Path) -> None:
    """Fill each ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->`` block of ``document`` from
    ``results/reproduce-NAME.json`` (blocks whose JSON does not exist yet are left as they are),
    and draw the figures."""
    text = document.read_text()
    reports = {}
    for name, render in RENDERERS.items():
        path = results / f"reproduce-{name}.json"
        start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if not path.exists() or start not in text:
            continue
        reports[name] = json.loads(path.read_text())
        head, rest = text.split(start, 1)
        text = head + start + "\n" + render(reports[name]) + "\n" + end + rest.split(end, 1)[1]
    document.write_text(text)
    for path in figures(reports, figure_folder):
        print(f"wrote {path}")


TABLES = {"cifar10": table_cifar10, "ablations": table_ablations, "shift": table_shift, "mnist": table_mnist}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=[*TABLES, "report"], help="a table to run, or report: fill docs/results.md and its figures from the JSON files")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="run folders (resumed when present)")
    parser.add_argument("--results", type=Path, help="JSON file to write (default benchmarks/results/reproduce-<table>.json); report: the folder holding them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run (repeatable)")
    parser.add_argument("--shift-examples", type=int, default=2000, help="CIFAR-10 test images (and MNIST digits) scored under shift")
    parser.add_argument("--download", action="store_true", help="shift: download SVHN's test set through torchvision if it is missing")
    parser.add_argument("--samples", type=int, default=10, help="posterior samples per prediction in the shift table")
    parser.add_argument("--eval-batch-size", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=ABLATIONS, help="ablations: only these tables (default: all)")
    parser.add_argument("--variants", nargs="+", help="ablations: only these rows of them (default: all), e.g. 'no ellipses'")
    parser.add_argument("--document", type=Path, default=ROOT / "docs" / "results.md", help="report: the markdown file to fill")
    args = parser.parse_args(argv)
    if args.table == "report":
        results = args.results or ROOT / "benchmarks" / "results"
        report_markdown(results, args.document, args.document.parent / "figures")
        return
    started = time.perf_counter()
    path = args.results or ROOT / "benchmarks" / "results" / f"reproduce-{args.table}.json"

    def write(result: dict, complete: bool = True) -> None:
        report = {
            "table": args.table,
            "command": "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "budget": str(BUDGET.relative_to(ROOT)) if args.table != "mnist" else str(MNIST_BUDGET.relative_to(ROOT)),
            "overrides": args.set,
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
            "wall_time_s": round(time.perf_counter() - started, 1),
            "complete": complete,
            "result": result,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}", flush=True)

    args.partial = lambda result: write(result, complete=False)
    write(TABLES[args.table](args), complete=not (args.only or args.variants))


if __name__ == "__main__":
    main()
