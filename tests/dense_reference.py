"""A brute-force dense Fisher, independent of the engine and of ``reference.py``.

One input at a time: a forward of that single input (eval mode, float64), then one
``torch.autograd.grad`` per logit gives its Jacobian J (C x P over the trainable parameters). No
vmap, no jacrev, no functional_call, so no batching rule of any layer can leak into the reference.
From the Jacobians, with p = softmax(z) and I(p) = diag(p) - p p^T:

* exact:       (1/N) sum_x diag(J^T I(p) J)
* empirical:   (1/N) sum_x (J^T (e_y - p))^2 with the true label y
* sample:      (1/(N k)) sum_x sum_{j<=k} (J^T (e_{y_j} - p))^2 with y_j ~ p, drawn as the library
               draws them (``draw_labels``)
* upper:       (1/N) sum_x diag(J^T diag(p) J)
* lower:       (1/N) sum_x sum_{j<=r} lambda_j (J^T v_j)^2, (lambda_j, v_j) the top-r eigenpairs of I(p)
* batched:     (1/M) sum_m (grad of the batch-mean log p(y|x))^2, one ordinary backward per batch.

Logits of shape (B, T, C) count each position whose attention mask is 1 and whose label is not
-100 as one input. Batches are tuples ``(x, y)`` (``x`` indexed by inputs along ``batch_dim``)
or mappings of tensors indexed by inputs along dimension 0 (Hugging Face style).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

IGNORE = -100
LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def draw_labels(p: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """The library's label draws for one batch: ``(n_positions, k)`` classes from the flattened
    ``(..., C)`` probabilities, in row-major order, with replacement."""
    flat = p.reshape(-1, p.shape[-1])
    return torch.multinomial(flat.float(), k, replacement=True, generator=generator)


def forward(model: nn.Module, batch: Any) -> Tensor:
    """Logits of a batch: ``model(x)`` for a tuple, ``model(**inputs)`` for a mapping."""
    if isinstance(batch, Mapping):
        out = model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
    else:
        out = model(batch[0])
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find logits in {type(out).__name__}")


def _labels(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping):
        return next((batch[k] for k in LABEL_KEYS if isinstance(batch.get(k), Tensor)), None)
    return batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None


def n_rows(batch: Any, batch_dim: int = 0) -> int:
    if isinstance(batch, Mapping):
        return int(next(v for v in batch.values() if isinstance(v, Tensor)).shape[0])
    return int(batch[0].shape[batch_dim])


def one_input(batch: Any, i: int, batch_dim: int = 0) -> Any:
    """The batch made of input ``i`` alone (its batch dimension kept, of size 1)."""
    if isinstance(batch, Mapping):
        return {k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in batch.items()}
    x, *rest = batch
    return (x.narrow(batch_dim, i, 1), *(r[i : i + 1] for r in rest))


def counted(logits: Tensor, batch: Any, shift: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Logits, the mask of counted positions and the labels (or None), shifted for causal LMs."""
    labels = _labels(batch)
    if labels is not None and tuple(labels.shape) != tuple(logits.shape[:-1]):
        labels = None
    mask = torch.ones(logits.shape[:-1], dtype=torch.bool)
    if logits.ndim == 3 and isinstance(batch, Mapping):
        attn = batch.get("attention_mask")
        if isinstance(attn, Tensor) and attn.shape == logits.shape[:-1]:
            mask &= attn.bool()
    if shift:
        logits, mask = logits[:, :-1], mask[:, 1:]
        labels = None if labels is None else labels[:, 1:]
    if labels is not None:
        mask &= labels != IGNORE
    return logits, mask, labels


@dataclass
class DenseReference:
    """Per-input Jacobians of every counted input, and the diagonals built from them."""

    names: list[str]
    shapes: list[torch.Size]
    jacobians: list[Tensor]  # (C, P) per counted input, in batch order
    probs: list[Tensor]  # (C,) per counted input
    labels: list[int | None]
    batch_probs: list[Tensor]  # (B, [T,] C) per batch: every position, counted or not
    batch_masks: list[Tensor]  # (B, [T]) per batch
    batched_flat: Tensor | None  # None when the batches carry no labels

    @property
    def n_inputs(self) -> int:
        return len(self.jacobians)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = flat[i : i + n].reshape(shape)
            i += n
        return out

    def _kernel_diag(self, kernel: str, rank: int = 1) -> Tensor:
        total = torch.zeros(self.jacobians[0].shape[1], dtype=torch.float64)
        for J, p in zip(self.jacobians, self.probs):
            if kernel == "upper":
                K = torch.diag(p)
            else:
                K = torch.diag(p) - torch.outer(p, p)
                if kernel == "lower":
                    vals, vecs = torch.linalg.eigh(K)
                    vals, vecs = vals.flip(0)[:rank], vecs.flip(1)[:, :rank]
                    K = (vecs * vals) @ vecs.T
            total += ((K @ J) * J).sum(0)  # diag(J^T K J)
        return total / self.n_inputs

    def exact(self) -> dict[str, Tensor]:
        return self.unflatten(self._kernel_diag("fisher"))

    def upper(self) -> dict[str, Tensor]:
        return self.unflatten(self._kernel_diag("upper"))

    def lower(self, rank: int = 1) -> dict[str, Tensor]:
        return self.unflatten(self._kernel_diag("lower", rank))

    def _label_grad(self, j: int, y: int) -> Tensor:
        e = torch.zeros_like(self.probs[j])
        e[y] = 1
        return self.jacobians[j].T @ (e - self.probs[j])

    def empirical(self) -> dict[str, Tensor]:
        total = sum(self._label_grad(j, y).pow(2) for j, y in enumerate(self.labels))  # type: ignore[arg-type]
        return self.unflatten(total / self.n_inputs)  # type: ignore[operator]

    def sample(self, mc_samples: int = 1, seed: int = 0) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        total = torch.zeros(self.jacobians[0].shape[1], dtype=torch.float64)
        j = 0
        for p, mask in zip(self.batch_probs, self.batch_masks):
            draws = draw_labels(p, mc_samples, gen)
            for pos in torch.nonzero(mask.reshape(-1)).flatten().tolist():
                for y in draws[pos].tolist():
                    total += self._label_grad(j, y).pow(2) / mc_samples
                j += 1
        assert j == self.n_inputs
        return self.unflatten(total / self.n_inputs)

    def batched(self) -> dict[str, Tensor]:
        assert self.batched_flat is not None, "the batches have no labels"
        return self.unflatten(self.batched_flat)


def _flat_grad(out: Tensor, params: list[Tensor], retain: bool) -> Tensor:
    grads = torch.autograd.grad(out, params, retain_graph=retain, allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
            for g, p in zip(grads, params)
        ]
    )


def dense_reference(
    model: nn.Module, batches: list[Any], batch_dim: int = 0, shift_labels: bool = False
) -> DenseReference:
    """Brute-force Jacobians of every input of ``batches`` (the model must be float64)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    js: list[Tensor] = []
    ps: list[Tensor] = []
    ys: list[int | None] = []
    batch_probs, batch_masks = [], []
    batched = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    has_labels = True
    try:
        for batch in batches:
            rows_p, rows_mask, label_grads = [], [], []
            for i in range(n_rows(batch, batch_dim)):
                row = one_input(batch, i, batch_dim)
                z, mask, labels = counted(forward(model, row), row, shift_labels)
                assert z.dtype == torch.float64, "build the models in float64"
                assert z.shape[0] == 1, f"one input gave logits of shape {tuple(z.shape)}"
                z, mask = z[0], mask[0]
                labels = None if labels is None else labels[0]
                p = torch.softmax(z.detach(), -1)
                rows_p.append(p)
                rows_mask.append(mask)
                z2, p2, m2 = (
                    z.reshape(-1, z.shape[-1]),
                    p.reshape(-1, z.shape[-1]),
                    mask.reshape(-1),
                )
                y2 = None if labels is None else labels.reshape(-1)
                for t in torch.nonzero(m2).flatten().tolist():
                    J = torch.stack(
                        [_flat_grad(z2[t, c], params, True) for c in range(z2.shape[-1])]
                    )
                    js.append(J)
                    ps.append(p2[t])
                    y = None if y2 is None else int(y2[t])
                    ys.append(y)
                    if y is not None:
                        e = torch.zeros_like(p2[t])
                        e[y] = 1
                        label_grads.append(J.T @ (e - p2[t]))
            batch_probs.append(torch.stack(rows_p))
            batch_masks.append(torch.stack(rows_mask))
            if not label_grads or any(y is None for y in ys):
                has_labels = False
                continue
            # BATCHED: one ordinary forward and backward of the whole batch.
            z, mask, labels = counted(forward(model, batch), batch, shift_labels)
            assert labels is not None
            logp = torch.log_softmax(z, -1)
            mean = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].mean()
            g = _flat_grad(mean, params, False)
            # The zoo entry itself must be right: inputs independent, sliced on their batch dim.
            from_inputs = torch.stack(label_grads).mean(0)
            err = (g - from_inputs).abs().max() / from_inputs.abs().max().clamp_min(1e-300)
            assert err < 1e-9, f"batch gradient != sum of per-input gradients (rel {err:.1e})"
            batched += g.pow(2)
    finally:
        for m, mode in was:
            m.training = mode
    return DenseReference(
        names=names,
        shapes=[p.shape for p in params],
        jacobians=js,
        probs=ps,
        labels=ys,
        batch_probs=batch_probs,
        batch_masks=batch_masks,
        batched_flat=batched / len(batches) if has_labels else None,
    )


def max_relative_error(got: Mapping[str, Tensor], want: Mapping[str, Tensor]) -> tuple[float, str]:
    """The largest per-parameter error max|got - want| / max|want|, and its parameter.

    A parameter whose reference diagonal is zero up to float64 round-off (e.g. a key bias, to which
    softmax attention is invariant) is measured against 1e-10 of the largest entry of all.
    """
    assert set(got) == set(want), (
        f"parameters differ: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    )
    scale = max(float(w.abs().max()) for w in want.values())
    worst, where = 0.0, ""
    for name, w in want.items():
        g = got[name].detach().to(torch.float64)
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        denom = max(float(w.abs().max()), 1e-10 * scale, 1e-300)
        err = float((g - w).abs().max()) / denom
        if math.isnan(err):
            return math.inf, name
        if err > worst or not where:
            worst, where = err, name
    return worst, where
