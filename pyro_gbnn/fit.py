"""Command line: ``python -m pyro_gbnn.fit --dataset cifar10`` (2DGBNN on ResNet-20, the
paper's settings, into ``runs/cifar10-2dgbnn-<date>-<time>``).

Settings: the shipped config of the data set and method (``configs/``), or ``--config``,
then the named flags, then ``--set``; the first lines of output say which file they came
from. ``--resume`` accepts the original command's flags where they agree with the saved
run and names every one that differs. Bad input (unknown names, out-of-range settings,
missing data, a corrupt checkpoint) prints one line on stderr and exits with 2, before any
work; a diverged run exits with 1 and keeps its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

from pyro_gbnn import distributed
from pyro_gbnn.config import DEFAULTS, apply_overrides, dataset_config_file, flatten, load_config, merge
from pyro_gbnn.devices import describe_device, resolve_device
from pyro_gbnn.errors import DivergedError, UsageError
from pyro_gbnn.methods import METHODS, method_class
from pyro_gbnn.report import FINAL_KEYS, format_table
from pyro_gbnn.tracking import TRACKERS

__all__ = ["main", "build_config", "base_config_file", "resume_differences"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_gbnn.fit",
        description=(
            "Train a (compressed) Bayesian neural network; writes config.yaml, log.jsonl, checkpoint.pt and "
            "metrics.json into --out."
        ),
    )
    parser.add_argument("--dataset", help="mnist, cifar10, cifar100, imagenet or imagefolder")
    parser.add_argument("--model", help="network name (see pyro_gbnn.models.MODELS)")
    parser.add_argument(
        "--method", help=f"one of {', '.join(METHODS)}, or a Method subclass by dotted path (package.module.Class)"
    )
    parser.add_argument("--config", help="YAML file with settings (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. mean_field.lr=1e-3 (repeatable)",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("PYRO_GBNN_DATA"),
        help=(
            "folder holding the data set (torchvision or ImageFolder layout); default: $PYRO_GBNN_DATA, else the "
            "config's data.dir"
        ),
    )
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("PYRO_GBNN_CACHE"),
        help=(
            "folder for decoded-image caches; default: $PYRO_GBNN_CACHE, else beside the data if it is yours, else "
            "~/.cache/pyro_gbnn"
        ),
    )
    parser.add_argument(
        "--download", action="store_true", help="download the data set with torchvision if it is missing"
    )
    parser.add_argument(
        "--out", help="run folder (must be new unless --resume); default: runs/<dataset>-<method>-<date>-<time>"
    )
    parser.add_argument("--epochs", type=int, help="epochs of the method's final training stage")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument(
        "--init-from", help="skip stage 0: take the deterministic network from this checkpoint.pt or state_dict file"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch stays)")
    parser.add_argument(
        "--tracker",
        choices=TRACKERS,
        help="also log to TensorBoard (RUN_DIR/tensorboard) or MLflow (MLFLOW_TRACKING_URI); needs .[tracking]",
    )
    return parser


def base_config_file(args: argparse.Namespace) -> Path | None:
    """``--config``, else the shipped config of ``--dataset`` and ``--method`` (None: built-in defaults)."""
    if args.config is not None:
        return Path(args.config)
    return dataset_config_file(args.dataset or DEFAULTS["dataset"], args.method)


def build_config(args: argparse.Namespace) -> dict:
    """Base config file (see :func:`base_config_file`) < named flags < --set overrides."""
    config = load_config(base_config_file(args))
    config = merge(config, {k: v for k, v in _named_flags(args).items() if v is not None})
    if args.data_dir is not None:
        config["data"]["dir"] = args.data_dir
    if args.download:
        config["data"]["download"] = True
    if args.cache_dir is not None:
        config["data"]["cache_dir"] = args.cache_dir
    config = apply_overrides(config, args.overrides)
    if args.epochs is not None:
        if args.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
        config = merge(config, _epochs_update(config["method"], args.epochs))
    return config


def _epochs_update(method: str, epochs: int) -> dict:
    """The config change ``--epochs`` makes: the epochs of the method's training stage."""
    stage = method_class(method).training_stage
    if stage not in DEFAULTS:
        raise UsageError(
            f"--epochs sets the epochs of method {method!r}'s stage {stage!r}, which has no config section; set them "
            "through method_args instead"
        )
    return {stage: {"epochs": epochs}}


def _named_flags(args: argparse.Namespace) -> dict:
    return {
        "dataset": args.dataset,
        "model": args.model,
        "method": args.method,
        "seed": args.seed,
        "init_from": args.init_from,
        "tracker": args.tracker,
    }


def resume_differences(args: argparse.Namespace, saved: dict) -> list[str]:
    """The settings that this command's flags (``--config``, named flags, ``--set``, applied
    in that order on top of the saved run's config) would change, each as
    ``"<key> <given> != saved <value>"``; none when the flags repeat the original command."""
    given = load_config(args.config, base=saved) if args.config is not None else saved
    given = merge(given, {k: v for k, v in _named_flags(args).items() if v is not None})
    if args.epochs is not None:
        given = merge(given, _epochs_update(given["method"], args.epochs))
    old, new = flatten(saved), flatten(apply_overrides(given, args.overrides))
    return [
        f"{key} {new[key]!r} != saved {old.get(key)!r}"
        for key in new
        if new[key] != old.get(key) and key not in RESUMABLE_ELSEWHERE
    ]


# Where a run computes may change on --resume (--set device=cpu); what it computes may not.
RESUMABLE_ELSEWHERE = ("device",)


def _resume_device(args: argparse.Namespace, saved: dict) -> str | None:
    """The device ``--set device=...`` asks a resumed run to move to, or None to keep the saved one."""
    device = apply_overrides(saved, [o for o in args.overrides if o.split("=", 1)[0].strip() == "device"])["device"]
    return None if device == saved.get("device") else device


def _saved_config(out: Path) -> dict:
    path = out / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{str(out)!r} holds no run to resume (no config.yaml); start it without --resume")
    return yaml.safe_load(path.read_text())


def _describe(source: Path | None, args: argparse.Namespace) -> str:
    if source is None:
        return "built-in defaults (pyro_gbnn/config.py) and flags"
    if args.config is not None:
        return f"{args.config} and flags"
    return f"{source.parent.name}/{source.name} (the shipped config for this data set and method) and flags"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prints = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    joined = False
    try:
        from pyro_gbnn.pipeline import run_fit

        if args.resume:
            if args.out is None:
                raise UsageError("--resume needs --out: the folder of the run to continue")
            saved = _saved_config(Path(args.out))
            differences = resume_differences(args, saved)
            if differences:
                raise UsageError(
                    f"--resume continues the run in {args.out!r} with its saved settings; these flags differ: "
                    f"{'; '.join(differences)}"
                )
            moved_to = _resume_device(args, saved)
            try:
                device = resolve_device(moved_to or saved["device"])
            except UsageError as err:
                raise UsageError(
                    f"{err}: add --set device=auto to the --resume command to continue the run here"
                ) from None
            joined = distributed.setup(device)
            if prints:
                print(f"resuming {args.out} with its saved settings on {describe_device(device)}", flush=True)
            metrics = run_fit(
                dict(DEFAULTS),
                args.out,
                resume=True,
                progress=not args.no_progress,
                data_dir=args.data_dir,
                device=moved_to,
            )
        else:
            config = build_config(args)
            source = base_config_file(args)
            device = resolve_device(config["device"])
            joined = distributed.setup(device)  # under torchrun: every rank takes rank 0's default --out
            args.out = distributed.broadcast_object(
                args.out or f"runs/{config['dataset']}-{config['method']}-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            if prints:
                print(
                    f"settings: {_describe(source, args)}; {config['dataset']} / {config['model']} / "
                    f"{config['method']} on {describe_device(device)} -> {args.out}",
                    flush=True,
                )
            metrics = run_fit(config, args.out, progress=not args.no_progress)
    except UsageError as err:
        if prints:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f"python -m pyro_gbnn.fit --out {args.out} --resume" if args.out else "nothing was started"
        print(f"interrupted; the last finished epoch is saved: {where}", file=sys.stderr)
        return 130
    except DivergedError as err:
        print(f"diverged: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.teardown(joined)
    if not prints:
        return 0
    print(format_table(metrics))
    summary = {k: metrics[k] for k in FINAL_KEYS if k in metrics}
    print(json.dumps(summary))
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
