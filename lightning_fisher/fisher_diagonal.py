"""``FisherDiagonal``: the diagonal of a Fisher estimate, one float32 tensor per parameter."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _json as strict_json
from .outputs import FisherInputError


class FisherDiagonal(Mapping[str, Tensor]):
    """A Fisher diagonal keyed by parameter name, with how it was computed.

    ``fd[name]`` is a float32 tensor shaped like the parameter. The estimate is averaged over
    inputs: F_i = (1/N) sum_x E_y[g_y(x)_i^2], except ``batched`` (mean over mini-batches)
    and ``squisher`` (B times Adam's second moment).

    Args:
        tensors: parameter name -> diagonal.
        n_samples: number of inputs N the estimate averaged over.
        method: the estimator's name (``exact``, ``sample``, ``hutchinson``, ...).
        options: the estimator's options (``max_samples``, ``mc_samples``, ``probes``, ...).
        certificate: what the computation proves about the estimate's distance to F (``lower``
            attaches the kernel-space spectrum of its gap: tail eigenvalue mass, the largest
            dropped eigenvalue, ...; see docs/math.md), or ``None``. Saved and loaded with the
            tensors; a scaled or summed diagonal no longer carries it.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        n_samples: int = 0,
        method: str = "unknown",
        options: Mapping[str, Any] | None = None,
        certificate: Mapping[str, Any] | None = None,
    ) -> None:
        self._tensors: dict[str, Tensor] = {k: v.detach().float() for k, v in tensors.items()}
        self.n_samples = int(n_samples)
        self.method = method
        self.options: dict[str, Any] = dict(options or {})
        self.certificate: dict[str, Any] | None = (
            dict(certificate) if certificate is not None else None
        )
        #: FSDP1 local pieces: the names whose tensors are this rank's 1-D piece of the whole
        #: diagonal, and the process group their pieces are spread over (set by the sharded pass)
        self.piece_names: frozenset[str] = frozenset()
        self.piece_group: Any = None

    def _like(self, other: FisherDiagonal) -> FisherDiagonal:
        """``other`` with this diagonal's FSDP1 piece layout (arithmetic keeps the layout)."""
        other.piece_names, other.piece_group = self.piece_names, self.piece_group
        return other

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return (
            f"FisherDiagonal(method={self.method!r}, n_samples={self.n_samples}, "
            f"params={len(self)}, trace={self.trace():.6g})"
        )

    # Summaries --------------------------------------------------------------------------------
    def trace(self) -> float:
        """tr(F) = sum of every diagonal entry (summed in float64)."""
        return float(sum(self.traces().values()))

    def traces(self) -> dict[str, float]:
        """Per-parameter traces (summed in float64, one device sync for all)."""
        if not self._tensors:
            return {}
        from .sharded import is_dtensor, local_tensor

        values = list(self._tensors.values())
        sums = torch.stack([local_tensor(t).sum(dtype=torch.float64) for t in values])
        shards = [i for i, t in enumerate(values) if is_dtensor(t)]
        if shards:  # sharded (FSDP2) tensors: add the other ranks' shards (a collective)
            import torch.distributed as dist

            part = sums[shards]
            dist.all_reduce(part, group=values[shards[0]].device_mesh.get_group())  # type: ignore[attr-defined]
            sums[shards] = part
        pieces = [i for i, k in enumerate(self._tensors) if k in self.piece_names]
        if pieces:  # FSDP1 local pieces: add the other ranks' pieces (a collective)
            import torch.distributed as dist

            part = sums[pieces]
            dist.all_reduce(part, group=self.piece_group)
            sums[pieces] = part
        return dict(zip(self._tensors, sums.tolist()))

    def layer_traces(self) -> dict[str, float]:
        """Traces grouped by module (a parameter's name without its last component)."""
        out: dict[str, float] = {}
        for name, value in self.traces().items():
            layer = name.rsplit(".", 1)[0] if "." in name else name
            out[layer] = out.get(layer, 0.0) + value
        return out

    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def flatten(self) -> Tensor:
        """All entries in one float32 vector, in key order."""
        return (
            torch.cat([t.reshape(-1) for t in self._tensors.values()]) if self else torch.zeros(0)
        )

    # Arithmetic (online EWC: F <- gamma F + F_new) ------------------------------------------------
    def scale(self, factor: float) -> FisherDiagonal:
        """A copy with every entry multiplied by ``factor``."""
        return self._like(
            FisherDiagonal(
                {k: v * factor for k, v in self._tensors.items()},
                self.n_samples,
                self.method,
                self.options,
            )
        )

    def __mul__(self, factor: float) -> FisherDiagonal:
        return self.scale(float(factor))

    __rmul__ = __mul__

    def __add__(self, other: FisherDiagonal) -> FisherDiagonal:
        """Entry-wise sum; a parameter missing on one side counts as zero there."""
        if not isinstance(other, FisherDiagonal):
            return NotImplemented
        keys = list(self._tensors) + [k for k in other if k not in self._tensors]
        tensors: dict[str, Tensor] = {}
        for k in keys:
            a, b = self._tensors.get(k), other._tensors.get(k)
            if a is not None and b is not None and a.shape != b.shape:
                raise ValueError(
                    f"Cannot add Fisher diagonals: {k!r} has shapes {a.shape} and {b.shape}."
                )
            if a is not None and b is not None:
                tensors[k] = a + b.to(a.device)
            else:
                only = a if a is not None else b
                assert only is not None  # every key comes from one side at least
                tensors[k] = only
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        if self.piece_names != other.piece_names:
            raise ValueError(
                "Cannot add Fisher diagonals: one holds FSDP1 local pieces of parameters the "
                "other holds whole (or other pieces)."
            )
        return self._like(
            FisherDiagonal(tensors, self.n_samples + other.n_samples, method, self.options)
        )

    def to(self, *args: Any, **kwargs: Any) -> FisherDiagonal:
        """Move (or cast) every tensor, like ``Tensor.to``: a dtype given is kept (the
        constructor's cast to float32 does not apply)."""
        out = FisherDiagonal({}, self.n_samples, self.method, self.options, self.certificate)
        out._tensors = {k: v.to(*args, **kwargs) for k, v in self._tensors.items()}
        return self._like(out)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data form for checkpoints (``load_state_dict`` / ``from_state_dict``)."""
        return {
            "tensors": {k: v.clone() for k, v in self._tensors.items()},
            "n_samples": self.n_samples,
            "method": self.method,
            "options": dict(self.options),
            "certificate": None if self.certificate is None else dict(self.certificate),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> FisherDiagonal:
        return cls(
            state["tensors"],
            state["n_samples"],
            state["method"],
            state.get("options"),
            state.get("certificate"),
        )

    def check_matches(self, model: nn.Module) -> None:
        """Raise a clear error if names or shapes differ from ``model``'s parameters."""
        params = dict(model.named_parameters())
        missing = [k for k in self if k not in params]
        wrong = [k for k in self if k in params and params[k].shape != self[k].shape]
        if missing or wrong:
            msg = []
            if missing:
                msg.append(
                    f"not parameters of the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                )
            if wrong:
                msg.append(
                    "shapes differ: "
                    + ", ".join(
                        f"{k} {tuple(self[k].shape)} vs {tuple(params[k].shape)}" for k in wrong[:5]
                    )
                )
            raise ValueError(
                "This Fisher diagonal does not match the model; " + "; ".join(msg) + "."
            )

    # Files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file; method, n_samples, options and the certificate go in its
        metadata."""
        from safetensors.torch import save_file

        from .sharded import is_dtensor

        if any(is_dtensor(t) for t in self._tensors.values()):
            raise FisherInputError(
                "FisherDiagonal.save writes whole tensors, but this Fisher is sharded (DTensors of "
                "an FSDP2 model). Gather it on every rank with "
                "`FisherDiagonal(lightning_fisher.sharded.full_tensors(fd), fd.n_samples, "
                "fd.method, fd.options)` and save that on one rank, or keep it sharded in a "
                "torch.distributed.checkpoint."
            )

        if self.piece_names:
            raise FisherInputError(
                "FisherDiagonal.save writes whole tensors, but this Fisher holds FSDP1 local "
                "pieces (1-D parts of each rank's flat shard). Gather it on every rank with "
                "`lightning_fisher.sharded.full_state(dict(fd), model)` and save that on one rank."
            )

        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise FisherInputError(
                f"FisherDiagonal.save: the folder of {os.fspath(path)!r} does not exist; expected "
                "a path in an existing folder (create it first)."
            )

        meta = {
            "format": "lightning-fisher/1",
            "method": self.method,
            "n_samples": str(self.n_samples),
            "options": strict_json.dumps(self.options, default=str),
            "order": strict_json.dumps(list(self._tensors)),  # safetensors sorts keys; keep ours
        }
        if self.certificate is not None:
            meta["certificate"] = strict_json.dumps(self.certificate)
        save_file(
            {k: v.contiguous().cpu() for k, v in self._tensors.items()},
            os.fspath(path),
            metadata=meta,
        )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu"
    ) -> FisherDiagonal:
        """Read a file written by ``save``."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            names = json.loads(meta["order"]) if "order" in meta else list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names}
        return cls(
            tensors,
            n_samples=int(meta.get("n_samples", 0)),
            method=meta.get("method", "unknown"),
            options=json.loads(meta.get("options", "{}")),
            certificate=json.loads(meta["certificate"]) if "certificate" in meta else None,
        )
