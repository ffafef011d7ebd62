"""Deployable model files (``python -m pyro_gbnn.export RUN_DIR --out FILE`` writes one).

One ``safetensors`` file (no pickle) that holds only what prediction reads: the network's
architecture (name and arguments, in the JSON header), its deterministic tensors
(normalisation layers), and the posterior in its compact form:

``normal``          mean-field, INT8 and SSVI runs: each weight's mean and std (SSVI: only
                    the active weights, with a one-bit mask per weight);
``spike_slab``      pruned spike-and-slab: the kept weights' mean and rho, a one-bit mask;
``shared_mixture``  2DGBNN: the component values the guide's semantics reads, the
                    outliers' means and rhos, one index symbol per weight (component k,
                    "outlier" or "ellipse"; outlier and ellipse values follow in weight
                    order) and the ellipse weights' blend tables;
``deterministic``   the network alone.

``precision="int8"`` stores each value tensor as 8-bit codes with a per-tensor fp32 scale
(means symmetric, the rest min/max affine); a mean-field model is then the INT8 method
at 8/8 bits per output channel, and an INT8 run always keeps its own codes (packed at
their bit widths). ``index_coding`` (``raw``, ``zstd``, ``ans``) codes the 2DGBNN index,
see :mod:`pyro_gbnn.index_coding`; the default, zstd, gave the smallest files measured
(``benchmarks/export_sizes.py``). :func:`load_model` rebuilds the network and a guide
whose draws, under a fixed seed, are those of the exported one (fp32: bit for bit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyro_gbnn.checkpoint import atomic_write_bytes
from pyro_gbnn.errors import UsageError
from pyro_gbnn.guides.base import site_key
from pyro_gbnn.guides.fixed_normal import FixedNormalGuide
from pyro_gbnn.guides.mean_field import MeanFieldGuide, inverse_softplus
from pyro_gbnn.guides.shared_mixture import COMPONENT_VALUES, SharedMixtureGuide
from pyro_gbnn.guides.sparse_subspace import SparseSubspaceGuide
from pyro_gbnn.guides.spike_slab import PrunedSpikeSlabGuide
from pyro_gbnn.index_coding import INDEX_CODINGS, decode_symbols, encode_symbols
from pyro_gbnn.quantization import (
    QuantizedMeanFieldGuide,
    QuantizedTensor,
    quantize_affine,
    quantize_mean_field,
    quantize_symmetric,
)
from pyro_gbnn.sharing.plan import SharingPlan

__all__ = ["FORMAT", "PRECISIONS", "INDEX_CODINGS", "ExportedModel", "export_model", "load_model"]

FORMAT = "pyro_gbnn.model/1"
PRECISIONS = ("fp32", "int8")
_HEADER_KEY = "pyro_gbnn"
# The component values each semantics reads when it samples (the rest only shape the KL).
_READ_BY = {
    "tied": ("centre_mu", "chol_log_00"),
    "independent": ("centre_mu", "centre_rho"),
    "hierarchical": COMPONENT_VALUES,
}


@dataclass
class ExportedModel:
    """A loaded model file: ``network`` (a ``BayesianNetwork``, or the plain network of a
    deterministic run), ``guide`` (None for a deterministic run) and ``info`` (the header:
    data set, classes, input shape, method, precision, ...)."""

    network: nn.Module
    guide: nn.Module | None
    info: dict[str, Any]
    draws: Any = None  # FixedDraws: the file's draws with their BatchNorm statistics (per_draw), else None

    @property
    def device(self) -> torch.device:
        """Where the network and guide are (the ``device`` :func:`load_model` was given)."""
        from pyro_gbnn.predict import module_device

        return module_device(self.network, self.guide)

    def predict(self, x: torch.Tensor, num_samples: int | None = None):
        """Predictive probabilities, class, entropy and mutual information of a batch
        (see :func:`pyro_gbnn.predict.predictive_summary`) under ``num_samples`` draws
        (default: the run's ``predict.num_samples``); ``x`` is moved to the model's device,
        the results are on the CPU. A file with per-draw BatchNorm statistics predicts with
        its first ``num_samples`` stored draws, the same on every device."""
        from pyro_gbnn.predict import FixedDraws, predictive_summary

        num_samples = num_samples or self.info["predict_samples"]
        draws = self.draws
        if draws is not None:
            if num_samples > draws.num_samples:
                raise UsageError(
                    f"this model file holds BatchNorm statistics for {draws.num_samples} posterior draws; "
                    f"ask for at most {draws.num_samples} samples, not {num_samples}"
                )
            draws = FixedDraws({k: v[:num_samples] for k, v in draws.weights.items()}, draws.statistics[:num_samples])
        return predictive_summary(self.network, self.guide, x.to(self.device), num_samples, draws=draws)


# ----------------------------------------------------------------------------- bits and values
def _pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``codes`` (< 2^bits) packed ``bits`` bits each, most significant first."""
    planes = np.unpackbits(codes.astype(np.uint8).reshape(-1, 1), axis=1)[:, 8 - bits :]
    return np.packbits(planes.reshape(-1))


def _unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits).reshape(count, bits)
    return np.packbits(np.pad(planes, ((0, 0), (8 - bits, 0))), axis=1).reshape(-1)


class _Writer:
    """Collects the file's tensors and the header entries that describe them."""

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.tensors: dict[str, torch.Tensor] = {}
        self.quantized: dict[str, dict[str, Any]] = {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor.detach().cpu().contiguous().clone()

    def put_quantized(self, key: str, q: QuantizedTensor) -> None:
        codes, signed = q.codes.reshape(-1).cpu().numpy(), q.zero_point is None
        if q.bits < 8:
            offset = 2 ** (q.bits - 1) - 1 if signed else 0
            codes = _pack_bits(codes.astype(np.int16) + offset, q.bits)
        self.put(key + "/codes", torch.from_numpy(np.ascontiguousarray(codes)))
        self.put(key + "/scale", q.scale.reshape(-1))
        if not signed:
            self.put(key + "/zero_point", q.zero_point.reshape(-1))
        self.quantized[key] = {
            "bits": q.bits,
            "per_channel": q.per_channel,
            "shape": list(q.shape),
            "channel_dim": q.channel_dim,
        }

    def put_values(self, key: str, x: torch.Tensor, signed: bool) -> None:
        """fp32, or (int8) 8-bit codes with one scale for the tensor: symmetric if ``signed``."""
        if self.precision == "fp32":
            self.put(key, x.float())
        else:
            quantize = quantize_symmetric if signed else quantize_affine
            self.put_quantized(key, quantize(x.detach().float().cpu(), 8, per_channel=False))

    def put_mask(self, key: str, mask: torch.Tensor) -> None:
        self.put(key, torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8))))


class _Reader:
    def __init__(self, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
        self.tensors, self.quantized = tensors, header.get("quantized", {})

    def get(self, key: str) -> torch.Tensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise ValueError(f"tensor {key!r} is missing") from None

    def values(self, key: str) -> torch.Tensor:
        if key not in self.quantized:
            return self.get(key)
        spec = self.quantized[key]
        shape, bits = torch.Size(spec["shape"]), spec["bits"]
        zero_point = self.tensors.get(key + "/zero_point")
        codes = self.get(key + "/codes").numpy()
        if bits < 8:
            codes = _unpack_bits(codes, bits, shape.numel()).astype(np.int16)
            codes = codes - (2 ** (bits - 1) - 1) if zero_point is None else codes
        scale = self.get(key + "/scale")
        scale, zero_point = (t if spec["per_channel"] or t is None else t.reshape(()) for t in (scale, zero_point))
        q = QuantizedTensor(
            torch.from_numpy(np.asarray(codes)).reshape(shape),
            scale,
            zero_point,
            bits,
            spec["per_channel"],
            shape,
            spec["channel_dim"],
        )
        return q.dequantize()

    def mask(self, key: str, shape: torch.Size) -> torch.Tensor:
        bits = np.unpackbits(self.get(key).numpy(), count=shape.numel())
        return torch.from_numpy(bits.astype(bool)).reshape(shape)

    def scattered(self, key: str, mask: torch.Tensor) -> torch.Tensor:
        """The values stored for the True entries of ``mask``, zeros elsewhere, shaped like it."""
        return torch.zeros(mask.shape).masked_scatter_(mask, self.values(key))


# ----------------------------------------------------------------------------- guides -> tensors
def _put_normal(w: _Writer, guide: nn.Module, header: dict) -> None:
    if isinstance(guide, QuantizedMeanFieldGuide):
        for name, (loc, scale) in guide.quantized.items():
            w.put_quantized(f"loc/{name}", loc)
            w.put_quantized(f"scale/{name}", scale)
        return
    if isinstance(guide, MeanFieldGuide) and w.precision == "int8":
        _put_normal(w, quantize_mean_field(guide, 8, 8, per_channel=True), header)
        return
    sparse = isinstance(guide, SparseSubspaceGuide)
    header["sparse"] = sparse
    for name in guide.site_shapes:
        q = guide.distribution(name).base_dist
        loc, scale = q.loc.detach(), q.scale.detach()
        if sparse:
            mask = guide.active_mask(name)
            w.put_mask(f"mask/{name}", mask)
            loc, scale = loc[mask], scale[mask]
        w.put_values(f"loc/{name}", loc, signed=True)
        w.put_values(f"scale/{name}", scale, signed=False)


def _put_spike_slab(w: _Writer, guide: PrunedSpikeSlabGuide, header: dict) -> None:
    header["prior_inclusion"] = guide.prior_inclusion
    for name in guide.site_shapes:
        key = site_key(name)
        mask = guide.mask[key]
        w.put_mask(f"mask/{name}", mask)
        w.put_values(f"loc/{name}", guide.loc[key].detach()[mask], signed=True)
        w.put_values(f"rho/{name}", guide.rho[key].detach()[mask], signed=False)


def _put_shared_mixture(w: _Writer, guide: SharedMixtureGuide, header: dict, index_coding: str) -> None:
    k = guide.num_components
    n = sum(shape.numel() for shape in guide.site_shapes.values())
    symbols = torch.empty(n, dtype=torch.long)  # on the CPU, where the index is coded
    symbols[guide.inlier_index.cpu()] = guide.inlier_component.long().cpu()
    symbols[guide.outlier_index.cpu()] = k
    symbols[guide.ellipse_index.cpu()] = k + 1
    outliers = guide.outlier_index.argsort()  # on the guide's device, as the tensors they order
    ellipses = guide.ellipse_index.argsort()
    read = _READ_BY[guide.semantics]
    header.update(
        semantics=guide.semantics,
        num_components=k,
        component_values=list(read),
        num_weights=n,
        index_coding=index_coding,
    )
    for name in read:
        w.put_values(f"component/{name}", getattr(guide, name), signed=name in ("centre_mu", "chol_10"))
    w.put("component/alive", guide.alive)
    w.put_values("outlier/loc", guide.outlier_loc[outliers], signed=True)
    w.put_values("outlier/rho", guide.outlier_rho[outliers], signed=False)
    for part, tensor in encode_symbols(symbols, k + 2, index_coding).items():
        w.put(f"index/{part}", tensor)
    w.put("ellipse/components", guide.ellipse_components[ellipses])
    w.put("ellipse/alphas", guide.ellipse_alphas[ellipses])


# ----------------------------------------------------------------------------- tensors -> guides
def _normal_guide(r: _Reader, sites: dict[str, torch.Size], header: dict) -> FixedNormalGuide:
    locs, scales, active = {}, {}, {}
    for name, shape in sites.items():
        if header.get("sparse"):
            mask = r.mask(f"mask/{name}", shape)
            locs[name], scales[name] = r.scattered(f"loc/{name}", mask), r.scattered(f"scale/{name}", mask)
            active[name] = mask.reshape(-1).nonzero().squeeze(1)
        else:
            locs[name], scales[name] = r.values(f"loc/{name}").reshape(shape), r.values(f"scale/{name}").reshape(shape)
    if r.quantized and not header.get("sparse"):  # as QuantizedMeanFieldGuide: stds stay > 0
        tiny = torch.finfo(torch.float32).tiny
        scales = {name: s.clamp_min(tiny) for name, s in scales.items()}
    return FixedNormalGuide(locs, scales, active)


def _spike_slab_guide(r: _Reader, sites: dict[str, torch.Size], header: dict) -> PrunedSpikeSlabGuide:
    locs, rhos, masks = {}, {}, {}
    for name, shape in sites.items():
        masks[name] = r.mask(f"mask/{name}", shape)
        locs[name], rhos[name] = r.scattered(f"loc/{name}", masks[name]), r.scattered(f"rho/{name}", masks[name])
    unit = {name: torch.ones(()) for name in sites}  # the prior only enters the KL, not prediction
    return PrunedSpikeSlabGuide(locs, rhos, masks, {n: torch.zeros(()) for n in sites}, unit, header["prior_inclusion"])


def _shared_mixture_guide(r: _Reader, bnn: nn.Module, header: dict) -> SharedMixtureGuide:
    k, n = header["num_components"], header["num_weights"]
    coding = header["index_coding"]
    parts = {key.split("/", 1)[1]: t for key, t in r.tensors.items() if key.startswith("index/")}
    symbols = decode_symbols(parts, n, k + 2, coding)
    values = {name: r.values(f"component/{name}") for name in header["component_values"]}
    # Values the semantics does not read get neutral stand-ins (unit covariance factors):
    # the plan below needs valid Gaussians, prediction never sees them.
    stand_in = {
        "centre_mu": torch.zeros(k),
        "centre_rho": inverse_softplus(torch.full((k,), 1e-3)),
        "chol_log_00": torch.zeros(k),
        "chol_10": torch.zeros(k),
        "chol_log_11": torch.zeros(k),
    }
    full = {name: values.get(name, stand_in[name]).float() for name in COMPONENT_VALUES}
    chol = torch.zeros(k, 2, 2)
    chol[:, 0, 0], chol[:, 1, 0], chol[:, 1, 1] = full["chol_log_00"].exp(), full["chol_10"], full["chol_log_11"].exp()
    components = r.get("ellipse/components")
    plan = SharingPlan(
        site_names=list(bnn.site_shapes),
        site_shapes=[list(s) for s in bnn.site_shapes.values()],
        means=torch.stack([full["centre_mu"], F.softplus(full["centre_rho"])], -1),
        covs=chol @ chol.transpose(-1, -2),
        counts=torch.ones(k),
        outlier_index=(symbols == k).nonzero().squeeze(-1),
        outlier_loc=r.values("outlier/loc"),
        outlier_scale=F.softplus(r.values("outlier/rho")),
        inlier_index=(symbols < k).nonzero().squeeze(-1),
        inlier_component=symbols[symbols < k].to(components.dtype if components.numel() else torch.int64),
        ellipse_index=(symbols == k + 1).nonzero().squeeze(-1),
        ellipse_components=components,
        ellipse_alphas=r.get("ellipse/alphas"),
        report={},
    )
    prior = header["fine_tune"]["shared_prior"] if header["semantics"] == "tied" else "weight"
    guide = SharedMixtureGuide(bnn, plan, header["semantics"], prior=prior)
    with torch.no_grad():
        for name, value in full.items():
            getattr(guide, name).copy_(value)
        guide.outlier_rho.copy_(r.values("outlier/rho"))
        guide.alive.copy_(r.get("component/alive"))
    return guide


# ----------------------------------------------------------------------------- public API
def _kind(guide: nn.Module | None) -> str:
    if guide is None:
        return "deterministic"
    if isinstance(guide, SharedMixtureGuide):
        return "shared_mixture"
    if isinstance(guide, PrunedSpikeSlabGuide):
        return "spike_slab"
    if isinstance(guide, (MeanFieldGuide, QuantizedMeanFieldGuide, SparseSubspaceGuide, FixedNormalGuide)):
        return "normal"
    raise UsageError(
        f"{type(guide).__name__} cannot be exported; export the run's final stage or a mean-field, 2DGBNN, INT8, "
        "pruned spike-and-slab or SSVI model"
    )


def export_model(
    run_dir: str | Path,
    out: str | Path,
    precision: str = "fp32",
    index_coding: str = "zstd",
    stage: str | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = "auto",
) -> dict[str, int]:
    """Write the model of a finished run (after ``stage``, default its last) to ``out``;
    returns the bytes of the file and of each part (``net``, ``posterior``, ``index``, ``header``).
    The model is rebuilt on ``device`` (``auto``: the GPU when there is one; the run may have
    trained on any device) and its tensors are written from the CPU, so the file loads anywhere."""
    from pyro_gbnn.methods import method_class
    from pyro_gbnn.pipeline import model_after_stage, open_run

    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is unknown; use one of {PRECISIONS}")
    if index_coding not in INDEX_CODINGS:
        raise UsageError(f"index coding {index_coding!r} is unknown; use one of {INDEX_CODINGS}")
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise UsageError(f"{str(run_dir)!r} holds no checkpoint.pt; pass the --out folder of a pyro_gbnn.fit run")
    run = open_run(run_dir, data_dir, device)
    config = run.config
    stage = stage or method_class(config["method"]).stages[-1]
    network, guide = model_after_stage(run, stage)
    kind = _kind(guide)
    header: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "method": config["method"],
        "stage": stage,
        "precision": precision,
        "dataset": config["dataset"],
        "classes": list(run.data.classes),
        "num_classes": run.data.num_classes,
        "in_channels": run.data.in_channels,
        "image_size": run.data.image_size,
        "model": config["model"],
        "model_args": config["model_args"],
        "bnn": config["bnn"],
        "fine_tune": {"shared_prior": config["fine_tune"]["shared_prior"]},
        "predict_samples": config["predict"]["num_samples"],
    }
    w = _Writer(precision)
    for key, tensor in network.state_dict().items():
        w.put(f"net/{key}", tensor)
    if kind != "deterministic":
        header["sites"] = {name: list(shape) for name, shape in network.site_shapes.items()}
    if kind == "normal":
        _put_normal(w, guide, header)
    elif kind == "spike_slab":
        _put_spike_slab(w, guide, header)
    elif kind == "shared_mixture":
        _put_shared_mixture(w, guide, header, index_coding)
    header["quantized"] = w.quantized
    if run.per_draw_batchnorm(network, guide):
        _put_batchnorm_statistics(w, header, run)
    from safetensors.torch import save

    blob = save(w.tensors, metadata={_HEADER_KEY: json.dumps(header)})
    atomic_write_bytes(out, lambda handle: handle.write(blob))
    sizes = {"file": len(blob), "header": 8 + int.from_bytes(blob[:8], "little")}
    for part in ("net", "index", "batchnorm"):
        sizes[part] = sum(t.numel() * t.element_size() for key, t in w.tensors.items() if key.startswith(part + "/"))
    sizes["posterior"] = sizes["file"] - sizes["header"] - sizes["net"] - sizes["index"] - sizes["batchnorm"]
    return sizes


def _put_batchnorm_statistics(w: _Writer, header: dict, run) -> None:
    """Each posterior draw's BatchNorm statistics (``predict.batchnorm: per_draw``), estimated
    on the run's training batches for the draws the file's own guide gives under the draw
    seed (so an INT8 file's statistics are those of its dequantised values): stored fp32 as
    [S, C] per layer, with the seed in the header."""
    from pyro_gbnn.batchnorm import PER_DRAW_STATISTICS
    from pyro_gbnn.data import posterior_draws_seed
    from pyro_gbnn.predict import with_batchnorm_statistics

    seed, num_draws = posterior_draws_seed(run.config["seed"], 0), run.config["predict"]["num_samples"]
    header["batchnorm"] = {"mode": "per_draw", "num_draws": num_draws, "seed": seed}
    network, guide = _model_from(dict(w.tensors), header, run.device)
    draws = with_batchnorm_statistics(network, _file_draws(network, guide, header), run.batchnorm_batches(0))
    for key in draws.statistics[0]:
        if key.rsplit(".", 1)[1] in PER_DRAW_STATISTICS:
            w.put(f"batchnorm/{key}", torch.stack([statistics[key] for statistics in draws.statistics]))


def _file_draws(network: nn.Module, guide: nn.Module, header: dict) -> dict[str, torch.Tensor]:
    from pyro_gbnn.predict import draws_on_cpu

    return draws_on_cpu(network, guide, header["batchnorm"]["num_draws"], header["batchnorm"]["seed"])


def _stored_draws(tensors: dict[str, torch.Tensor], network: nn.Module, guide: nn.Module, header: dict):
    """The file's draws with their stored BatchNorm statistics (FixedDraws), on the model's device."""
    from pyro_gbnn.batchnorm import current_batchnorm_statistics
    from pyro_gbnn.predict import FixedDraws

    running = current_batchnorm_statistics(network)  # num_batches_tracked: not read in eval mode, kept as it is
    missing = [key for key in running if key.endswith(".running_mean") and f"batchnorm/{key}" not in tensors]
    if missing:
        raise ValueError(f"BatchNorm statistics of {missing[0]} are missing")
    device = next(iter(running.values())).device
    statistics = [
        {
            key: tensors[f"batchnorm/{key}"][s].to(device) if f"batchnorm/{key}" in tensors else value
            for key, value in running.items()
        }
        for s in range(header["batchnorm"]["num_draws"])
    ]
    return FixedDraws(_file_draws(network, guide, header), statistics)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    fix = "export one with: python -m pyro_gbnn.export RUN_DIR --out FILE"
    if not path.is_file():
        raise UsageError(f"model file {str(path)!r} does not exist; {fix}")
    blob = path.read_bytes()
    try:
        tensors = load(blob)
        length = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + length]).get("__metadata__", {})
        header = json.loads(metadata[_HEADER_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UsageError(f"{str(path)!r} is not a readable pyro_gbnn model file ({reason}); {fix}") from None
    if header.get("format") != FORMAT:
        raise UsageError(f"{str(path)!r} has format {header.get('format')!r}, this pyro_gbnn reads {FORMAT!r}; {fix}")
    return tensors, header


def load_model(path: str | Path, device: str | torch.device | None = "auto") -> ExportedModel:
    """The network and guide of a file written by :func:`export_model`, in eval mode, on
    ``device`` (``auto``, the default: the GPU when there is one, else the CPU; ``cpu``,
    ``cuda``, ``cuda:N``). The file is decoded on the CPU and its tensors copied there."""
    from pyro_gbnn.devices import resolve_device

    device = resolve_device(device)
    path = Path(path)
    tensors, header = _read_file(path)
    try:
        network, guide = _model_from(tensors, header, device)
        draws = _stored_draws(tensors, network, guide, header) if "batchnorm" in header else None
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"{str(path)!r} is damaged or from another pyro_gbnn version ({reason}); export it again"
        ) from None
    return ExportedModel(network, guide, header, draws)


def _model_from(
    tensors: dict[str, torch.Tensor], header: dict, device: torch.device
) -> tuple[nn.Module, nn.Module | None]:
    """The network (eval mode) and guide that a file's tensors and header describe, on ``device``."""
    from pyro_gbnn.models import build_model
    from pyro_gbnn.stages import build_bnn

    net = build_model(
        header["model"], header["num_classes"], header["in_channels"], header["image_size"], **header["model_args"]
    )
    net.to(device)  # before the BNN is built: its priors and initial values follow the weights
    r = _Reader(tensors, header)
    net_state = {key[4:]: t for key, t in tensors.items() if key.startswith("net/")}
    kind = header["kind"]
    if kind == "deterministic":
        net.load_state_dict(net_state)
        guide, network = None, net
    else:
        network = build_bnn(net, {"bnn": header["bnn"]}, 1)
        network.load_state_dict(net_state)
        sites = {name: torch.Size(shape) for name, shape in header["sites"].items()}
        if list(sites) != list(network.site_shapes):
            raise ValueError("its weight sites differ from the network's")
        if kind == "normal":
            guide = _normal_guide(r, sites, header)
        elif kind == "spike_slab":
            guide = _spike_slab_guide(r, sites, header)
        elif kind == "shared_mixture":
            guide = _shared_mixture_guide(r, network, header)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        guide.to(device)  # the normal and spike-and-slab guides are decoded on the CPU
    network.eval()
    return network, guide
