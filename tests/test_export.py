"""Model files: export -> load predicts identically, the index codings are lossless and
near the entropy, damaged files are one-line errors, and the predict command line."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_gbnn import pipeline
from pyro_gbnn.errors import UsageError
from pyro_gbnn.export import main as export_main
from pyro_gbnn.guides import SharedMixtureGuide
from pyro_gbnn.index_coding import INDEX_CODINGS, decode_symbols, encode_symbols
from pyro_gbnn.model_file import _pack_bits, _Reader, _unpack_bits, _Writer, export_model, load_model
from pyro_gbnn.predict import predict_batch, predictive_summary
from pyro_gbnn.predict.cli import main as predict_main
from pyro_gbnn.quantization import QuantizedMeanFieldGuide, quantize_affine, quantize_symmetric
from tests.conftest import GBNN, INT8, SPIKE_SLAB, SSVI, tiny_config, write_fake_mnist

RUNS = {"2dgbnn": GBNN, "int8": INT8, "spike-slab": SPIKE_SLAB + ["prune.epochs=1"], "ssvi": SSVI}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny finished run per method (2DGBNN and INT8 runs hold a mean-field stage too)."""
    root = tmp_path_factory.mktemp("runs")
    data = write_fake_mnist(root / "data")
    for method, extra in RUNS.items():
        pipeline.run_fit(tiny_config(data, method, extra), root / method)
    return root


def draws(network, guide, x, seed=5, samples=3):
    torch.manual_seed(seed)
    return predict_batch(network, guide, x, samples)


def entropy_bytes(symbols: torch.Tensor, num_symbols: int) -> float:
    counts = torch.bincount(symbols, minlength=num_symbols).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * p.log2()).sum()) / 8


# ----------------------------------------------------------------------------- index coding
@pytest.mark.parametrize("coding", INDEX_CODINGS)
@pytest.mark.parametrize("num_symbols", [3, 251, 700])
def test_every_index_coding_decodes_to_the_original_exactly(coding, num_symbols):
    g = torch.Generator().manual_seed(num_symbols)
    p = torch.distributions.Dirichlet(torch.full((num_symbols,), 0.5)).sample()
    symbols = torch.multinomial(p, 20_000, replacement=True, generator=g)
    parts = encode_symbols(symbols, num_symbols, coding)
    assert all(t.dim() == 1 for t in parts.values())
    assert torch.equal(decode_symbols(parts, symbols.numel(), num_symbols, coding), symbols)
    empty = encode_symbols(symbols[:0], num_symbols, coding)
    assert decode_symbols(empty, 0, num_symbols, coding).numel() == 0


def test_ans_costs_the_empirical_entropy_plus_its_frequency_table():
    g = torch.Generator().manual_seed(0)
    p = torch.distributions.Dirichlet(torch.full((251,), 0.3)).sample()
    symbols = torch.multinomial(p, 200_000, replacement=True, generator=g)
    parts = encode_symbols(symbols, 251, "ans")
    coded, table = parts["ans"].numel(), parts["counts"].numel() * 4
    bound = entropy_bytes(symbols, 251)
    assert bound - 8 <= coded <= 1.005 * bound + 16, "no code beats the empirical entropy; ANS comes within 0.5%"
    assert coded + table < encode_symbols(symbols, 251, "raw")["codes"].numel()


def test_index_coding_rejects_bad_input():
    with pytest.raises(ValueError, match="symbols must lie in 0..2"):
        encode_symbols(torch.tensor([0, 3]), 3, "ans")
    with pytest.raises(ValueError, match="unknown; use one of"):
        encode_symbols(torch.tensor([0]), 3, "huffman")
    parts = encode_symbols(torch.tensor([0, 1, 2]), 3, "raw")
    with pytest.raises(ValueError, match="holds 3 symbols, expected 4"):
        decode_symbols(parts, 4, 3, "raw")


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_pack_to_their_bit_width_and_back(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=1001).astype(np.uint8)
    packed = _pack_bits(codes, bits)
    assert packed.size == math.ceil(1001 * bits / 8)
    assert np.array_equal(_unpack_bits(packed, bits, 1001), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_tensors_are_stored_packed_and_read_back_exactly(bits, per_channel):
    x = torch.randn(6, 5, 3)
    w = _Writer("int8")
    means, stds = quantize_symmetric(x, bits, per_channel), quantize_affine(x.abs() + 0.1, bits, per_channel)
    w.put_quantized("loc", means)
    w.put_quantized("scale", stds)
    assert w.tensors["loc/codes"].numel() == math.ceil(x.numel() * bits / 8)
    r = _Reader(w.tensors, {"quantized": w.quantized})
    assert torch.equal(r.values("loc"), means.dequantize()) and torch.equal(r.values("scale"), stds.dequantize())


# ----------------------------------------------------------------------------- export -> load
@pytest.mark.parametrize("method, stage", [
    ("2dgbnn", "fine_tune"), ("2dgbnn", "sharing"), ("2dgbnn", "mean_field"), ("2dgbnn", "deterministic"),
    ("int8", "quantize"), ("spike-slab", "prune"), ("ssvi", "ssvi"),
])
def test_fp32_export_predicts_exactly_as_the_run(runs, tmp_path, method, stage):
    run = pipeline.open_run(runs / method)
    network, guide = pipeline.model_after_stage(run, stage)
    network.eval()
    sizes = export_model(runs / method, tmp_path / "m.safetensors", stage=stage)
    assert sizes["file"] == (tmp_path / "m.safetensors").stat().st_size
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.info["stage"] == stage and loaded.info["classes"] == run.data.classes
    x = torch.stack([run.data.test[i][0] for i in range(12)])
    assert torch.equal(draws(network, guide, x), draws(loaded.network, loaded.guide, x))
    assert not torch.equal(draws(loaded.network, loaded.guide, x, seed=5), draws(loaded.network, loaded.guide, x, seed=6)) or guide is None


def test_mean_field_file_holds_two_fp32_values_per_weight_and_nothing_else(runs, tmp_path):
    sizes = export_model(runs / "2dgbnn", tmp_path / "mf.safetensors", stage="mean_field")
    n_weights = sum(s.numel() for s in load_model(tmp_path / "mf.safetensors").network.site_shapes.values())
    assert sizes["posterior"] == 8 * n_weights and sizes["index"] == 0
    assert sizes["file"] == sizes["header"] + sizes["net"] + sizes["posterior"]


def test_int8_files_quantize_the_posterior_and_keep_int8_runs_codes(runs, tmp_path):
    fp32 = export_model(runs / "2dgbnn", tmp_path / "mf32.safetensors", stage="mean_field")
    int8 = export_model(runs / "2dgbnn", tmp_path / "mf8.safetensors", stage="mean_field", precision="int8")
    assert int8["posterior"] < fp32["posterior"] / 3.5
    run = pipeline.open_run(runs / "int8")
    network, quantized = pipeline.model_after_stage(run)
    assert isinstance(quantized, QuantizedMeanFieldGuide)
    export_model(runs / "int8", tmp_path / "q.safetensors")
    loaded = load_model(tmp_path / "q.safetensors")
    for name in quantized.site_shapes:
        assert torch.equal(loaded.guide.location(name), quantized.location(name))
        assert torch.equal(loaded.guide.scale(name), quantized.scale(name))
    # the 2DGBNN model at int8: close to its fp32 predictions, a smaller posterior
    x = torch.stack([run.data.test[i][0] for i in range(12)])
    export_model(runs / "2dgbnn", tmp_path / "g32.safetensors")
    g8 = export_model(runs / "2dgbnn", tmp_path / "g8.safetensors", precision="int8")
    a, b = (load_model(tmp_path / f) for f in ("g32.safetensors", "g8.safetensors"))
    assert (draws(a.network, a.guide, x) - draws(b.network, b.guide, x)).abs().max() < 0.05
    assert g8["posterior"] < export_model(runs / "2dgbnn", tmp_path / "g.safetensors")["posterior"]


def test_2dgbnn_file_keeps_the_plan_and_codes_its_index(runs, tmp_path):
    network, guide = pipeline.model_after_stage(pipeline.open_run(runs / "2dgbnn"))
    sizes = {c: export_model(runs / "2dgbnn", tmp_path / f"{c}.safetensors", index_coding=c) for c in INDEX_CODINGS}
    n_weights = sum(s.numel() for s in network.site_shapes.values())
    assert sizes["raw"]["index"] == n_weights * torch.empty((), dtype=guide.inlier_component.dtype).element_size()
    assert sizes["ans"]["index"] < sizes["raw"]["index"] and sizes["zstd"]["index"] < sizes["raw"]["index"]
    loaded = load_model(tmp_path / "ans.safetensors").guide
    assert isinstance(loaded, SharedMixtureGuide) and loaded.semantics == guide.semantics
    for name in ("outlier_index", "inlier_index", "ellipse_index", "inlier_component", "ellipse_components", "ellipse_alphas", "alive"):
        assert torch.equal(getattr(loaded, name), getattr(guide, name)), name
    for name in ("centre_mu", "chol_log_00", "outlier_loc", "outlier_rho"):  # what the tied guide reads
        assert torch.equal(getattr(loaded, name), getattr(guide, name)), name


# ----------------------------------------------------------------------------- damaged files
def test_damaged_files_are_one_line_errors(runs, tmp_path):
    good = tmp_path / "good.safetensors"
    export_model(runs / "2dgbnn", good)
    blob = good.read_bytes()
    cases = {
        "truncated": blob[: len(blob) - 1000],
        "cut in the header": blob[:100],
        "not safetensors": b"PK\x03\x04" + bytes(200),
        "empty": b"",
    }
    from safetensors.torch import save

    cases["no pyro_gbnn header"] = save({"x": torch.zeros(3)})
    cases["other format"] = save({"x": torch.zeros(3)}, metadata={"pyro_gbnn": json.dumps({"format": "pyro_gbnn.model/99"})})
    for what, data in cases.items():
        path = tmp_path / f"{what}.safetensors"
        path.write_bytes(data)
        with pytest.raises(UsageError) as err:
            load_model(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "export" in message, what
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


def test_export_rejects_bad_options_before_reading_the_run(tmp_path):
    with pytest.raises(UsageError, match="precision 'fp16' is unknown"):
        export_model(tmp_path / "nowhere", tmp_path / "m", precision="fp16")
    with pytest.raises(UsageError, match="index coding 'lz4' is unknown"):
        export_model(tmp_path / "nowhere", tmp_path / "m", index_coding="lz4")
    with pytest.raises(UsageError, match="holds no checkpoint.pt"):
        export_model(tmp_path / "nowhere", tmp_path / "m")


# ----------------------------------------------------------------------------- command lines
def write_digits(folder, count=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8)).save(folder / f"digit{i}.png")
    Image.fromarray((rng.random((40, 30, 3)) * 255).astype(np.uint8)).save(folder / "photo.jpg")  # resized, made grey
    return sorted(folder.iterdir())


def test_export_and_predict_command_lines(runs, tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    assert export_main([str(runs / "2dgbnn"), "--out", str(model), "--index-coding", "zstd"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["file"] == model.stat().st_size
    images = write_digits(tmp_path / "images")
    assert predict_main([str(model), "--images", str(tmp_path / "images"), "--samples", "4", "--seed", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in images]
    loaded = load_model(model)
    for row in rows:
        assert sum(row["probs"]) == pytest.approx(1, abs=1e-4)
        assert row["class"] == loaded.info["classes"][row["label"]] and row["label"] == int(np.argmax(row["probs"]))
        assert 0 <= row["mutual_information"] <= row["entropy"] <= math.log(10) + 1e-6
    # the Python function gives the same numbers for the same tensors and seed
    from pyro_gbnn.data import image_for_model

    x = torch.stack([image_for_model(p, "mnist", 1, 28) for p in images])
    torch.manual_seed(1)
    summary = predictive_summary(loaded.network, loaded.guide, x, 4)
    assert [round(float(e), 6) for e in summary.entropy] == [row["entropy"] for row in rows]
    assert predict_main([str(model), "--images", str(images[0])]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_predict_command_line_reports_bad_input_in_one_line(runs, tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    export_model(runs / "2dgbnn", model, index_coding="raw")
    for argv, message in [
        ([str(model), "--images", str(tmp_path / "none.png")], "does not exist"),
        ([str(tmp_path / "none.safetensors"), "--images", str(model)], "does not exist"),
        ([str(model), "--images", str(tmp_path)], "holds no images"),
        ([str(model), "--images", str(model), "--samples", "0"], "--samples must be >= 1"),
        ([str(model), "--images", str(model)], "cannot decode image"),
    ]:
        assert predict_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, argv
