"""Sums of squared per-input gradients, for any model, from one forward and batched backwards.

Given output cotangents u_{k,x} (K columns per input x), this engine computes

    S_i = sum_x sum_k w (J_x^T u_{k,x})_i^2

for every tracked parameter i, where J_x = dz(x)/dtheta. ``exact`` uses the C columns of
L(p) = diag(sqrt p) - p sqrt(p)^T, ``sample`` k columns e_y - p with y ~ p, ``empirical`` one column
e_y - p with the true label.

How: forward hooks record each parameter-owning module's inputs and outputs; one backward per
chunk of columns (``is_grads_batched``) gives the gradient at every such output; a per-module rule
turns (input, output gradient) into per-input parameter gradients:

* closed forms for ``nn.Linear`` (with or without sequence dimensions), ``nn.Conv1d``/``nn.Conv2d``,
  ``nn.Embedding`` and the affine parameters of ``nn.LayerNorm``, ``nn.GroupNorm`` and BatchNorm
  with running statistics. Linear and Conv are products over L positions (sequence, output
  pixels); with fewer positions than columns (L < K) the columns are contracted first (Gram
  route), and with L = 1 they fold, so the whole diagonal costs one weight-gradient-sized matmul;
* any other module (attention with its own weights, custom layers) by ``torch.func.vjp`` of that
  module alone, vectorised with ``vmap`` over inputs and columns.

A parameter used in several places (tied weights, a module called twice) has its per-input
gradients summed over the uses before squaring. Per-input gradients are materialised in chunks
whose size keeps memory under ``max_memory_mib``.

Inputs must have the batch as their first dimension, and the model must treat inputs
independently (true in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclass
class _Call:
    """One call of a module during the forward: its inputs and (cloned) tensor outputs."""

    leaves: list[Any]
    spec: Any
    versions: list[int]
    outputs: list[Tensor]
    out_idx: list[int]
    #: per output: 0 = batch-first, 1 = a leading dim of 1 broadcast over the batch, 2 = no batch dim
    broadcast: list[int] = field(default_factory=list)


@dataclass
class _Handler:
    """Computes per-input gradients of ``names`` (local -> global) of ``module``."""

    module: nn.Module
    path: str
    names: dict[str, str]
    rule: str  # "linear", "conv", "embedding", "norm" or "vjp"
    calls: list[_Call] = field(default_factory=list)


def _uses_default_forward(module: nn.Module, cls: type[nn.Module]) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def _closed_form_rule(module: nn.Module, local_names: set[str]) -> str:
    direct = {n for n, p in module.named_parameters(recurse=False) if p is not None}
    if local_names != direct & local_names or not local_names <= {"weight", "bias"}:
        return "vjp"
    if _uses_default_forward(module, nn.Linear):
        return "linear"
    if (_uses_default_forward(module, nn.Conv2d) or _uses_default_forward(module, nn.Conv1d)) and (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv"
    if _uses_default_forward(module, nn.Embedding) and (
        module.max_norm is None and not module.sparse and not module.scale_grad_by_freq
    ):
        return "embedding"
    if _uses_default_forward(module, nn.LayerNorm) or _uses_default_forward(module, nn.GroupNorm):
        return "norm"
    # BatchNorm is per-input only with running statistics (eval mode): then it is affine in x.
    bn = nn.modules.batchnorm._BatchNorm
    if (
        _uses_default_forward(module, bn)
        and not module.training
        and getattr(module, "running_mean", None) is not None
    ):
        return "norm"
    return "vjp"


class PerInputEngine:
    """Plans, for a model and a set of tracked parameters, how to get per-input gradients.

    Use ``with engine.recording(): out = model(batch)``, then ``engine.accumulate(logits, cot,
    acc, weight)`` with cotangents of shape ``(K, *logits.shape)``; call ``engine.reset()`` before
    the next forward.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        max_memory_mib: float = 1024.0,
    ) -> None:
        self.model = model
        self.params = params
        self.max_bytes = max(1.0, max_memory_mib) * 2**20
        self.handlers: list[_Handler] | None = None
        self._active = False
        self._batch_size = 0

    # Planning -----------------------------------------------------------------------------------
    def plan(self, forward: Callable[[], Any]) -> None:
        """Find which modules run, and assign every tracked parameter to a rule.

        The model sees only the first row of the batch (a pre-hook slices its batch-first
        tensor arguments), so planning costs about one B-th of a forward. Post-processing of the
        one-row output by ``forward`` may then fail on mismatched shapes (masks, labels): that is
        ignored once the model has run. Should the one-row forward itself fail, planning runs
        again on the whole batch.
        """
        fired: dict[str, int] = {}
        done: list[bool] = []

        def first_row(_m: nn.Module, args: Any, kwargs: Any) -> Any:
            leaves, spec = tree_flatten((args, kwargs))
            B = next((t.shape[0] for t in leaves if isinstance(t, Tensor) and t.ndim), 1)
            if B <= 1:
                return None
            leaves = [
                t[:1] if isinstance(t, Tensor) and t.ndim and t.shape[0] == B else t for t in leaves
            ]
            return tree_unflatten(leaves, spec)

        for sliced in (True, False):
            fired.clear()
            done.clear()
            hooks = []
            for path, module in self.model.named_modules(remove_duplicate=False):

                def pre(_m: nn.Module, _a: Any, path: str = path) -> None:
                    fired[path] = fired.get(path, 0) + 1

                hooks.append(module.register_forward_pre_hook(pre))
            if sliced:
                hooks.append(self.model.register_forward_pre_hook(first_row, with_kwargs=True))
            hooks.append(self.model.register_forward_hook(lambda *_: done.append(True)))
            try:
                with torch.no_grad():
                    forward()
                break
            except Exception:
                if not sliced:
                    raise
                if done:  # the model ran; what failed is the handling of its one-row output
                    break
            finally:
                for h in hooks:
                    h.remove()

        by_id = {id(p): name for name, p in self.params.items()}
        modules = dict(self.model.named_modules(remove_duplicate=False))
        assignment: dict[str, dict[str, str]] = {}  # module path -> local name -> global name
        covered: set[str] = set()
        for path, module in modules.items():
            if path not in fired:
                continue
            for local, p in module.named_parameters(recurse=False):
                if id(p) in by_id:
                    assignment.setdefault(path, {})[local] = by_id[id(p)]
                    covered.add(by_id[id(p)])
        # Parameters whose owning module never ran are used by an ancestor's forward (for example
        # nn.MultiheadAttention reading out_proj.weight): the nearest ancestor that ran handles them.
        for global_name in self.params:
            if global_name in covered:
                continue
            parts = global_name.split(".")
            for cut in range(len(parts) - 1, -1, -1):
                anc = ".".join(parts[:cut])
                if anc in fired:
                    assignment.setdefault(anc, {})[".".join(parts[cut:])] = global_name
                    covered.add(global_name)
                    break
        unused = [n for n in self.params if n not in covered]
        self.unused = unused  # parameters the forward never touches: their Fisher is zero
        self.handlers = []
        for path, names in assignment.items():
            module = modules[path]
            rule = _closed_form_rule(module, set(names))
            self.handlers.append(_Handler(module, path, names, rule))
        uses: dict[str, int] = {}
        for h in self.handlers:
            for g in h.names.values():
                uses[g] = uses.get(g, 0) + fired[h.path]
        self.shared = {g for g, n in uses.items() if n > 1}

    # Recording ----------------------------------------------------------------------------------
    @contextmanager
    def recording(self, batch_size: int) -> Iterator[None]:
        """Record the inputs and outputs of every handled module during a forward of
        ``batch_size`` rows.

        An output without the batch dimension, or with a leading dimension of 1 broadcast over
        the batch (position embeddings of Hugging Face's ``position_ids`` of shape (1, T), a
        learned query), is expanded to the batch, so its gradient is per input.
        """
        assert self.handlers is not None, "call plan() first"
        self._batch_size = batch_size
        hooks = []
        for h in self.handlers:

            def hook(_m: nn.Module, args: Any, kwargs: Any, out: Any, h: _Handler = h) -> Any:
                if not self._active:
                    return None
                leaves, spec = tree_flatten((args, kwargs))
                versions = [x._version if isinstance(x, Tensor) else -1 for x in leaves]
                # Clone outputs so that an in-place op downstream (ReLU(inplace=True), x += ...)
                # cannot rewrite the tensor whose gradient we ask for.
                # We keep the original and hand a clone downstream. An output without the batch
                # dimension (position embeddings, a learned query) is shared by all inputs: expand
                # it to the batch so that its gradient stays separable per input.
                flat, out_spec = tree_flatten(out)
                idx = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
                B = self._batch_size
                modes, kept = [], []
                for i in idx:
                    t = flat[i]
                    mode = (
                        0
                        if t.ndim and t.shape[0] == B
                        else (1 if t.ndim and t.shape[0] == 1 else 2)
                    )
                    if mode:
                        t = (t if mode == 1 else t.unsqueeze(0)).expand(B, *t.shape[mode == 1 :])
                    modes.append(mode)
                    kept.append(t)
                    flat[i] = t.clone()
                h.calls.append(_Call(leaves, spec, versions, kept, idx, modes))
                return tree_unflatten(flat, out_spec)

            hooks.append(h.module.register_forward_hook(hook, with_kwargs=True))
        self._active = True
        try:
            yield
        finally:
            self._active = False
            for hk in hooks:
                hk.remove()

    def reset(self) -> None:
        for h in self.handlers or []:
            h.calls.clear()

    # Accumulation -------------------------------------------------------------------------------
    def accumulate(
        self, logits: Tensor, cotangents: Tensor, acc: dict[str, Tensor], weight: float = 1.0
    ) -> None:
        """acc[name] += weight * sum over inputs and columns of squared per-input gradients.

        ``cotangents`` has shape ``(K, *logits.shape)``; column k of input x is
        ``cotangents[k, x]``. Each input's columns must be zero outside that input.
        """
        assert self.handlers is not None
        self._batch_size = logits.shape[0]
        calls = [(h, c) for h in self.handlers for c in h.calls]
        for h, c in calls:
            for leaf, version in zip(c.leaves, c.versions):
                if isinstance(leaf, Tensor) and leaf._version != version:
                    raise RuntimeError(
                        f"The input of module {h.path!r} was modified in place after the module ran; "
                        "per-input gradients would be wrong. Avoid in-place ops on layer inputs."
                    )
        outputs = [o for _, c in calls for o in c.outputs]
        if not outputs:
            return
        per_column = sum(o.numel() * 4 for o in outputs) + cotangents[0].numel() * 4
        k_chunk = max(1, int(self.max_bytes // max(per_column, 1)))
        for start in range(0, cotangents.shape[0], k_chunk):
            cot = cotangents[start : start + k_chunk]
            grads = torch.autograd.grad(
                logits,
                outputs,
                grad_outputs=cot,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            it = iter(grads)
            grad_map: list[tuple[_Handler, _Call, list[Tensor]]] = []
            for h, c in calls:
                gs = [next(it) for _ in c.outputs]
                gs = [
                    torch.zeros((cot.shape[0], *o.shape), dtype=o.dtype, device=o.device)
                    if g is None
                    else g
                    for g, o in zip(gs, c.outputs)
                ]
                grad_map.append((h, c, gs))
            self._accumulate_chunk(grad_map, acc, weight)

    def _accumulate_chunk(
        self,
        grad_map: list[tuple[_Handler, _Call, list[Tensor]]],
        acc: dict[str, Tensor],
        weight: float,
    ) -> None:
        for h, c, gs in grad_map:
            single = {loc: g for loc, g in h.names.items() if g not in self.shared}
            if single:
                self._sum_squares(h, c, gs, single, acc, weight)
        if not self.shared:
            return
        # Shared parameters: per-input gradients summed over every use, then squared.
        B = self._batch_size
        for name in self.shared:
            uses = [
                (h, c, gs, loc) for h, c, gs in grad_map for loc, g in h.names.items() if g == name
            ]
            K = uses[0][2][0].shape[0]
            numel = self.params[name].numel()
            chunk = max(1, int(self.max_bytes // (8 * K * numel * len(uses))))
            for lo in range(0, B, chunk):
                hi = min(B, lo + chunk)
                total = None
                for h, c, gs, loc in uses:
                    part = self._per_input(h, c, gs, {loc: name}, lo, hi)[name]
                    total = part if total is None else total + part
                assert total is not None
                acc[name] += weight * total.pow(2).sum((0, 1))

    # Rules --------------------------------------------------------------------------------------
    def _sum_squares(
        self,
        h: _Handler,
        c: _Call,
        gs: list[Tensor],
        names: dict[str, str],
        acc: dict[str, Tensor],
        weight: float,
    ) -> None:
        g = gs[0]
        if h.rule in ("linear", "conv"):
            self._matmul_sum_squares(h, c, g, names, acc, weight)
            return
        if h.rule == "embedding":
            self._embedding_sum_squares(h, c, g, names, acc, weight)
            return
        B, K = self._batch_size, g.shape[0]
        numel = sum(self.params[n].numel() for n in names.values())
        chunk = max(1, int(self.max_bytes // (8 * K * numel)))
        for lo in range(0, B, chunk):
            per = self._per_input(h, c, gs, names, lo, min(B, lo + chunk))
            for name, t in per.items():
                acc[name] += weight * t.pow(2).sum((0, 1))

    def _input(self, h: _Handler, c: _Call) -> Tensor:
        args, kwargs = tree_unflatten(c.leaves, c.spec)
        x = args[0] if args else next(iter(kwargs.values()))
        if any(c.broadcast):  # shared input (e.g. position ids): the same for every row
            x = x if x.ndim and x.shape[0] == 1 and c.broadcast[0] == 1 else x.unsqueeze(0)
            x = x.expand(self._batch_size, *x.shape[1:])
        if x.shape[0] != self._batch_size:
            raise RuntimeError(
                f"Module {h.path!r} received an input of shape {tuple(x.shape)} whose first dimension "
                f"is not the batch size {self._batch_size}; per-input gradients need batch-first inputs."
            )
        return x.detach()

    def _per_input(
        self, h: _Handler, c: _Call, gs: list[Tensor], names: dict[str, str], lo: int, hi: int
    ) -> dict[str, Tensor]:
        """Per-input gradients for inputs ``lo:hi``, each shaped ``(hi - lo, K, *param.shape)``."""
        dtype = torch.promote_types(next(iter(self.params.values())).dtype, torch.float32)
        if h.rule in ("linear", "conv"):
            gl, cols = self._unfolded(h, c, gs[0], lo, hi, dtype)
            out = {}
            if "weight" in names:
                w = torch.einsum("kbol,bil->bkoi", gl, cols)
                out[names["weight"]] = w.reshape(*w.shape[:2], *self.params[names["weight"]].shape)
            if "bias" in names:
                out[names["bias"]] = gl.sum(-1).transpose(0, 1)
            return out
        if h.rule == "norm":
            return self._norm_per_input(h, c, gs[0], names, lo, hi, dtype)
        if h.rule == "embedding":
            idx = self._input(h, c)[lo:hi]
            g = gs[0][:, lo:hi].to(dtype)
            m: nn.Embedding = h.module  # type: ignore[assignment]
            b, K = idx.shape[0], g.shape[0]
            dense = torch.zeros(
                b, K, m.num_embeddings, m.embedding_dim, dtype=dtype, device=g.device
            )
            flat_idx = idx.reshape(b, -1)
            gk = g.reshape(K, b, -1, m.embedding_dim).transpose(0, 1)  # (b, K, S, D)
            if m.padding_idx is not None:
                gk = gk * (flat_idx != m.padding_idx)[:, None, :, None]
            dense.scatter_add_(2, flat_idx[:, None, :, None].expand_as(gk), gk)
            return {names["weight"]: dense}
        return self._vjp_per_input(h, c, gs, names, lo, hi, dtype)

    def _unfolded(
        self, h: _Handler, c: _Call, g: Tensor, lo: int, hi: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Linear and Conv as matrix products over L positions: output gradients ``gl`` of shape
        (K, b, O, L) and inputs ``cols`` of shape (b, I, L) such that input x's weight gradient for
        column k is gl[k, x] @ cols[x]^T (L = 1 for a Linear without sequence dimensions, the
        sequence for one with, the output pixels of a convolution)."""
        m: Any = h.module
        a = self._input(h, c)[lo:hi].to(dtype)
        g = g[:, lo:hi].to(dtype)
        K, b = g.shape[0], g.shape[1]
        if h.rule == "linear":
            cols = a.reshape(b, -1, a.shape[-1]).transpose(1, 2)
            return g.reshape(K, b, -1, g.shape[-1]).transpose(2, 3), cols
        if isinstance(m, nn.Conv1d):
            a = a.unsqueeze(2)
            ks, st, pd, dl = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
        else:
            ks, st, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation
        cols = F.unfold(a, ks, dilation=dl, padding=pd, stride=st)  # (b, Cin*k, L)
        return g.reshape(K, b, g.shape[2], -1), cols

    def _matmul_sum_squares(
        self,
        h: _Handler,
        c: _Call,
        g: Tensor,
        names: dict[str, str],
        acc: dict[str, Tensor],
        weight: float,
    ) -> None:
        """sum_x sum_k (gl[k,x] @ cols[x]^T)^2 for a Linear or Conv weight, by the cheaper of two
        exact routes:

        * direct, K L O I per input: materialise the per-input gradients of a chunk of inputs,
          square and sum;
        * Gram, L^2 O I per input, when L < K: (G U^T)^2 summed over k equals
          sum_{l,m} (sum_k G_ol G_om) U_il U_im, one (O x b L^2) @ (b L^2 x I) product. L = 1 (a
          Linear without sequence dimensions, a convolution with one output pixel) folds the
          columns: (sum_k g^2)^T @ a^2.
        """
        B, K = self._batch_size, g.shape[0]
        dtype = acc[next(iter(names.values()))].dtype
        n_out = g.shape[-1] if h.rule == "linear" else g.shape[2]
        L = g[0, 0].numel() // n_out
        n_in = cast(Tensor, h.module.weight).numel() // n_out
        gram = L < K
        per_input = (n_out + n_in) * L * L if gram else K * n_out * n_in + n_in * L
        chunk = max(1, int(self.max_bytes // (8 * per_input)))
        for lo in range(0, B, chunk):
            gl, cols = self._unfolded(h, c, g, lo, min(B, lo + chunk), dtype)
            # Per input and column, the bias gradient is gl summed over positions.
            g2 = (gl.squeeze(-1) if L == 1 else gl.sum(-1)).square().sum(0)  # (b, O)
            if "weight" in names:
                if L == 1:
                    w = g2.T @ cols.squeeze(-1).square()
                elif gram:
                    ggt = torch.einsum("kbol,kbom->oblm", gl, gl).reshape(n_out, -1)
                    uut = torch.einsum("bil,bim->blmi", cols, cols).reshape(-1, n_in)
                    w = ggt @ uut
                else:
                    w = torch.einsum("kbol,bil->bkoi", gl, cols).square_().sum((0, 1))
                acc[names["weight"]].add_(w.view_as(acc[names["weight"]]), alpha=weight)
            if "bias" in names:
                acc[names["bias"]].add_(g2.sum(0), alpha=weight)

    def _norm_per_input(
        self,
        h: _Handler,
        c: _Call,
        g: Tensor,
        names: dict[str, str],
        lo: int,
        hi: int,
        dtype: torch.dtype,
    ) -> dict[str, Tensor]:
        """Affine parameters of LayerNorm, GroupNorm and BatchNorm (running statistics).

        y = weight * x_hat + bias with x_hat independent of the parameters, so an input's gradient
        is sum(g * x_hat) for the weight and sum(g) for the bias, the sums running over every
        dimension the parameter is broadcast along (positions for LayerNorm, space for the others).
        """
        m: Any = h.module
        x = self._input(h, c)[lo:hi].to(dtype)
        g = g[:, lo:hi].to(dtype)  # (K, b, *x.shape[1:])
        if isinstance(m, nn.LayerNorm):
            trailing = len(m.normalized_shape)
            var, mean = torch.var_mean(x, tuple(range(-trailing, 0)), unbiased=False, keepdim=True)
            xh = (x - mean) * torch.rsqrt(var + m.eps)
            dims = tuple(range(2, g.ndim - trailing))
        elif isinstance(m, nn.GroupNorm):
            xg = x.reshape(x.shape[0], m.num_groups, -1)
            var, mean = torch.var_mean(xg, -1, unbiased=False, keepdim=True)
            xh = ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(x.shape)
            dims = tuple(range(3, g.ndim))
        else:
            assert m.running_mean is not None and m.running_var is not None
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean, var = (
                m.running_mean.to(dtype).reshape(shape),
                m.running_var.to(dtype).reshape(shape),
            )
            xh = (x - mean) * torch.rsqrt(var + m.eps)
            dims = tuple(range(3, g.ndim))

        def reduce(t: Tensor) -> Tensor:  # (K, b, ...) -> (b, K, *param.shape)
            return (t.sum(dims) if dims else t).transpose(0, 1)

        out = {}
        if "weight" in names:
            out[names["weight"]] = reduce(g * xh)
        if "bias" in names:
            out[names["bias"]] = reduce(g)
        return out

    def _embedding_sum_squares(
        self,
        h: _Handler,
        c: _Call,
        g: Tensor,
        names: dict[str, str],
        acc: dict[str, Tensor],
        weight: float,
    ) -> None:
        m: nn.Embedding = h.module  # type: ignore[assignment]
        idx = self._input(h, c)
        K, B, D, V = g.shape[0], idx.shape[0], m.embedding_dim, m.num_embeddings
        name = names["weight"]
        tok = idx.reshape(B, -1)
        gk = g.reshape(K, B, -1, D).to(acc[name].dtype)
        keep = (
            torch.ones_like(tok, dtype=torch.bool)
            if m.padding_idx is None
            else tok != m.padding_idx
        )
        # Per (column, input, token id): sum the rows of g, square, and add into the token's row.
        unit = torch.arange(K * B, device=tok.device).reshape(K, B, 1)
        key = (unit * V + tok.unsqueeze(0)).expand(K, B, tok.shape[1])[keep.expand(K, -1, -1)]
        rows = gk[keep.expand(K, -1, -1)]
        uniq, inv = torch.unique(key, return_inverse=True)
        sums = torch.zeros(uniq.numel(), D, dtype=rows.dtype, device=rows.device).index_add_(
            0, inv, rows
        )
        acc[name].index_add_(0, uniq % V, weight * sums.pow(2))

    def _vjp_per_input(
        self,
        h: _Handler,
        c: _Call,
        gs: list[Tensor],
        names: dict[str, str],
        lo: int,
        hi: int,
        dtype: torch.dtype,
    ) -> dict[str, Tensor]:
        from torch.func import functional_call, vjp, vmap

        B = self._batch_size
        leaves = [x.detach() if isinstance(x, Tensor) else x for x in c.leaves]
        shared = any(c.broadcast)
        batched = [
            i
            for i, x in enumerate(leaves)
            if not shared and isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == B
        ]
        modules = dict(h.module.named_modules())
        primals = {}
        for loc in names:
            owner, _, attr = loc.rpartition(".")
            primals[loc] = getattr(modules[owner], attr).detach()

        def one(vals: list[Tensor], cots: list[Tensor]) -> dict[str, Tensor]:
            def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
                ls = list(leaves)
                for i, v in zip(batched, vals):
                    ls[i] = v.unsqueeze(0)
                args, kwargs = tree_unflatten(ls, c.spec)
                out = functional_call(h.module, p, tuple(args), kwargs, strict=False)
                flat = tree_flatten(out)[0]
                return tuple(flat[i] for i in c.out_idx)

            pullback = vjp(f, primals)[1]
            # A batch-first output of one row takes a (1, ...) cotangent; a shared one without
            # batch dimension takes the row's slice as it is.
            return vmap(
                lambda *cs: pullback(
                    tuple(x if m == 2 else x.unsqueeze(0) for x, m in zip(cs, modes))
                )[0]
            )(*cots)

        modes = c.broadcast or [0] * len(c.outputs)
        vals = [leaves[i][lo:hi] for i in batched]
        cots = [g[:, lo:hi] for g in gs]
        per = vmap(one, in_dims=(0, 1))(vals, cots)
        return {names[loc]: t.to(dtype) for loc, t in per.items()}
