"""INT8 baseline (Subedar et al. 2021): post-training quantization of the stage-1
mean-field guide, one evaluation per entry of ``int8.scale_bits`` (the first is the
headline row); deployed: the packed codes and their fp32 scales plus the fp32
normalisation parameters."""

from __future__ import annotations

import time

from torch import nn

from pyro_gbnn.bayesian import BayesianNetwork
from pyro_gbnn.methods.mean_field import MeanField, restore_mean_field
from pyro_gbnn.quantization import QuantizedMeanFieldGuide, quantize_mean_field
from pyro_gbnn.stages import FitRun, count_trainable

__all__ = ["Int8"]


class Int8(MeanField):
    """Stages 0-1 as mean-field, then ``quantize`` (no training)."""

    stages = ("deterministic", "mean_field", "quantize")
    training_stage = "mean_field"
    guide_use = "mean_field"

    def stage_quantize(self, run: FitRun, net: nn.Module, resume: dict | None) -> None:
        section = run.config["int8"]
        bnn, guide, _ = restore_mean_field(run, net)  # a mean-field guide: check_config saw to it
        others = count_trainable(bnn)
        n_params = count_trainable(guide) + others
        rows = {}
        for bits in section["scale_bits"]:
            started = time.perf_counter()
            quantized = quantize_mean_field(
                guide, loc_bits=section["loc_bits"], scale_bits=int(bits), per_channel=section["per_channel"]
            )
            metrics = run.evaluate(bnn, quantized, "test", run.config["predict"]["num_samples"])
            rows[str(bits)] = {
                **metrics,
                "size_bytes": quantized.size_bytes() + 4 * others,
                "wall_time_s": round(time.perf_counter() - started, 2),
            }
        first = str(section["scale_bits"][0])
        run.results["quantize"] = {
            **rows[first],
            "n_params_trainable": n_params,
            "scale_bits": int(first),
            "loc_bits": section["loc_bits"],
            "by_scale_bits": rows,
        }
        run.outputs["quantize"] = {}
        run.log.write({"stage": "quantize", "finished": True, "test": run.results["quantize"]})

    def model_quantize(self, run: FitRun, net: nn.Module) -> tuple[BayesianNetwork, QuantizedMeanFieldGuide]:
        """The quantized guide at the first of ``int8.scale_bits``."""
        bnn, guide, _ = restore_mean_field(run, net)
        section = run.config["int8"]
        return bnn, quantize_mean_field(
            guide, section["loc_bits"], int(section["scale_bits"][0]), section["per_channel"]
        )
