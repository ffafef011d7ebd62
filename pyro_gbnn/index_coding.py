"""Lossless coding of a sequence of small integer symbols (a 2DGBNN index) for export.

Three codings, compared side by side by ``benchmarks/export_sizes.py``:

``raw``   one code per symbol in the smallest integer dtype that holds them;
``zstd``  those bytes compressed by Zstandard (level 19), a general-purpose baseline;
``ans``   asymmetric numeral systems (the ``constriction`` package) under the sequence's
          own symbol frequencies, which are stored beside it: within a few bytes of the
          empirical entropy n * H(counts / n).

Each returns plain tensors (what a safetensors file can hold) and decodes exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_gbnn.sharing.plan import index_dtype

__all__ = ["INDEX_CODINGS", "encode_symbols", "decode_symbols"]

INDEX_CODINGS = ("raw", "zstd", "ans")
_ZSTD_LEVEL = 19


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _check(coding: str) -> None:
    if coding not in INDEX_CODINGS:
        raise ValueError(f"index coding {coding!r} is unknown; use one of {INDEX_CODINGS}")


def _ans_model(counts: np.ndarray):
    import constriction  # its submodules are attributes, not importable modules

    return constriction.stream.model.Categorical(counts.astype(np.float64) / max(int(counts.sum()), 1), perfect=False)


def encode_symbols(symbols: torch.Tensor, num_symbols: int, coding: str) -> dict[str, torch.Tensor]:
    """Tensors that store ``symbols`` (integers in 0 .. num_symbols - 1) under ``coding``."""
    _check(coding)
    flat = symbols.reshape(-1).long()
    if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < num_symbols):
        raise ValueError(f"symbols must lie in 0..{num_symbols - 1}, got {int(flat.min())}..{int(flat.max())}")
    raw = flat.to(index_dtype(num_symbols))
    if coding == "raw":
        return {"codes": raw}
    if coding == "zstd":
        import zstandard

        packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw.numpy().tobytes())
        return {"zstd": torch.from_numpy(np.frombuffer(packed, dtype=np.uint8).copy())}
    import constriction

    counts = np.bincount(flat.numpy(), minlength=num_symbols)
    coder = constriction.stream.stack.AnsCoder()
    if flat.numel():
        coder.encode_reverse(flat.numpy().astype(np.int32), _ans_model(counts))
    words = coder.get_compressed().astype("<u4").view(np.uint8)
    return {"ans": torch.from_numpy(words.copy()), "counts": torch.from_numpy(counts.astype(np.int32))}


def decode_symbols(parts: dict[str, torch.Tensor], count: int, num_symbols: int, coding: str) -> torch.Tensor:
    """The ``count`` symbols that :func:`encode_symbols` stored in ``parts``, as int64."""
    _check(coding)
    dtype = index_dtype(num_symbols)
    if coding == "raw":
        out = parts["codes"]
    elif coding == "zstd":
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(parts["zstd"].numpy().tobytes())
        out = torch.from_numpy(np.frombuffer(data, dtype=_numpy_dtype(dtype)).copy())
    else:
        import constriction

        if count == 0:
            return torch.zeros(0, dtype=torch.long)
        words = parts["ans"].numpy().view("<u4").astype(np.uint32)
        decoded = constriction.stream.stack.AnsCoder(words).decode(_ans_model(parts["counts"].numpy()), count)
        out = torch.from_numpy(np.asarray(decoded, dtype=np.int64))
    if out.numel() != count:
        raise ValueError(f"the stored index holds {out.numel()} symbols, expected {count}; the file is damaged")
    return out.long()
