"""The per-layer rules of the per-input engine: per-input parameter gradients of one module call.

A rule turns one recorded call of a module (its inputs, and the gradients at its outputs for
K columns, ``_Ctx``) into the per-input gradients of the module's own parameters, or straight
into their squares summed over inputs and columns:

* closed forms for ``nn.Linear``, ``transformers``' ``Conv1D``, ``nn.Conv1d``/``nn.Conv2d``
  (products over L positions; with L < K the columns are contracted first, the Gram route, and
  with L = 1 they fold), ``nn.Embedding`` (rows looked up), the affine parameters of the norms and
  ``nn.PReLU``;
* ``vjp``: any other module by ``torch.func.vjp`` of that module alone, vectorised over inputs
  and columns;
* ``loop``: the module re-run on one input at a time with ordinary autograd.

``_RULES`` maps each name to its rule and ``_NEXT`` gives the route a failed check falls back to
(closed form or vjp -> loop -> the engine's whole-model route). The engine
(``per_input.PerInputEngine``) records the calls, runs the backwards and checks the rules.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from .per_input import PerInputEngine


#: A tensor whose batch dimension could not be found (its size is not the batch size in one dim).
UNKNOWN = -1


@dataclass
class _Call:
    """One call of a module during the forward: its inputs, the outputs whose gradient we take and
    the batch dimension of each (None: shared by all inputs)."""

    leaves: list[Any]
    spec: Any
    versions: list[int]
    outputs: list[Tensor]
    out_idx: list[int]
    out_shapes: list[Any]
    leaf_dims: list[int | None] = field(default_factory=list)
    out_dims: list[int | None] = field(default_factory=list)
    #: the outputs as handed on to the rest of the forward (clones, or ``outputs`` themselves)
    #: with their version then, until the recording is finished; whether they are clones
    handed: list[tuple[Tensor, int]] = field(default_factory=list)
    cloned: bool = True

    def modified(self) -> bool:
        """Whether an output handed on was modified in place since (by the forward after it)."""
        return any(t._version != v for t, v in self.handed)

    def input_index(self) -> int | None:
        """Index (among the leaves) of the module's first tensor argument."""
        return next((i for i, t in enumerate(self.leaves) if isinstance(t, Tensor)), None)


@dataclass
class _Handler:
    """Computes per-input gradients of ``names`` (local -> global) of ``module``."""

    module: nn.Module
    path: str
    names: dict[str, str]
    rule: str  # a key of _RULES: "linear", "hf_conv1d", "conv", ..., "vjp", "loop"
    calls: list[_Call] = field(default_factory=list)


@dataclass
class _Ctx:
    """What a rule needs for one recorded call: the batch of B inputs and the output gradients
    ``grads`` (one per output, ``(K, *output.shape)``)."""

    engine: PerInputEngine
    handler: _Handler
    call: _Call
    grads: list[Tensor]
    names: dict[str, str]
    #: dtype of the per-input products (the model's own for bfloat16 models)
    dtype: torch.dtype
    #: dtype of the squares and of every sum over inputs or columns (default: ``dtype``)
    acc: torch.dtype | None = None
    #: per input, whether its output gradients are nonzero at one position at most in every
    #: column (``_one_position`` of that input), read for many calls at once
    #: (``_read_one_position``); None: decided per chunk of inputs
    one_position: list[bool] | None = None
    #: per column, one past the last position where its output gradients are nonzero for any
    #: input (``_column_ends``), on the device and as read with ``one_position``; None: the
    #: direct route reads them itself
    ends: tuple[Tensor, list[int]] | None = None

    @property
    def acc_dtype(self) -> torch.dtype:
        """Dtype of the squares and of every sum over inputs or columns (float32 or float64)."""
        return self.acc or self.dtype

    @property
    def square_bytes(self) -> int:
        """Bytes per entry of a per-input gradient while it is squared: the product and, in
        ``acc_dtype``, its square (a cast copy squared in place for 16-bit products)."""
        return _square_bytes(self.dtype, self.acc_dtype)

    @property
    def module(self) -> Any:
        return self.handler.module

    @property
    def B(self) -> int:
        return self.engine._batch_size

    @property
    def K(self) -> int:
        return self.grads[0].shape[0]

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype the module's first input had in the model (before any cast of :meth:`x`)."""
        i = self.call.input_index()
        assert i is not None
        return cast(Tensor, self.call.leaves[i]).dtype

    def x(self, lo: int, hi: int) -> Tensor:
        """Rows lo:hi of the module's first input, batch first."""
        i = self.call.input_index()
        assert i is not None
        d = self.call.leaf_dims[i]
        assert d is not None and d >= 0
        x = cast(Tensor, self.call.leaves[i])
        return _rows(x.detach() if x.requires_grad else x, d, lo, hi).to(self.dtype)

    def g(self, lo: int, hi: int, j: int = 0) -> Tensor:
        """Gradient at output j for rows lo:hi, shaped (K, hi - lo, ...)."""
        d = self.call.out_dims[j]
        assert d is not None and d >= 0
        g = self.grads[j]
        g = g.movedim(1 + d, 1) if d else g
        return (g if lo == 0 and hi >= g.shape[1] else g[:, lo:hi]).to(self.dtype)

    def param(self, local: str) -> Tensor:
        return self.engine.params[self.names[local]]

    def chunk(self, bytes_per_input: float) -> int:
        """Inputs per chunk of a rule's per-input buffers (refused when one does not fit)."""
        return self.engine.fit(
            bytes_per_input, self.engine.rule_bytes, f"module {self.handler.path!r}"
        )


def _rows(t: Tensor, d: int, lo: int, hi: int) -> Tensor:
    """Rows lo:hi of ``t`` along dimension ``d``, moved first; no view op where none is needed
    (a GPU pass of a small model is bound by the ops it dispatches)."""
    t = t.movedim(d, 0) if d else t
    return t if lo == 0 and hi >= t.shape[0] else t[lo:hi]


# Per-layer rules ------------------------------------------------------------------------------


def _square_bytes(dtype: torch.dtype, acc_dtype: torch.dtype) -> int:
    """Bytes per entry of a tensor in ``dtype`` and its square in ``acc_dtype`` (``_squared``)."""
    return 2 * acc_dtype.itemsize if dtype == acc_dtype else dtype.itemsize + acc_dtype.itemsize


def _squared(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t^2 in ``dtype``: a 16-bit ``t`` is cast first (a copy, squared in place), so no square
    is rounded to 16 bits."""
    return t.pow(2) if t.dtype == dtype else t.to(dtype).square_()


class _Rule:
    """Turns (inputs, output gradients) of one module call into per-input parameter gradients."""

    name: ClassVar[str]
    #: the rule needs the batch as dimension 0 of input and output (channels at dim 1)
    batch_first_only: ClassVar[bool] = False
    #: per-input gradients in the engine's ``product_dtype`` (matrix products, lookups, a
    #: module's own vjp); False: in the accumulation dtype (elementwise products summed over
    #: positions, where a 16-bit sum of rounded terms could cancel badly)
    model_dtype_products: ClassVar[bool] = True

    def applies(self, module: nn.Module, local_names: set[str]) -> bool:
        return False

    def layout_ok(self, module: nn.Module, call: _Call) -> bool:
        """Whether this call's batch dimensions suit the rule."""
        i = call.input_index()
        if i is None or not call.out_dims:
            return False
        d_in, d_out = call.leaf_dims[i], call.out_dims[0]
        if d_in is None or d_in == UNKNOWN or d_in != d_out or len(call.outputs) != 1:
            return False
        return d_in == 0 or not self.batch_first_only

    def per_input(self, ctx: _Ctx, lo: int, hi: int) -> dict[str, Tensor]:
        """Per-input gradients of inputs lo:hi, each ``(hi - lo, K, *param.shape)``."""
        raise NotImplementedError

    def signed_sum(self, ctx: _Ctx, s: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """For one column (K = 1): sum_b s_b g_b per parameter from this rule's per-input
        gradients g_b, and a scale of their size (sum_b ||g_b||^2 or a bound of it, a 0-d
        tensor) for the round-off tolerance."""
        numel = sum(ctx.engine.params[n].numel() for n in ctx.names.values())
        chunk = ctx.chunk(ctx.square_bytes * numel)
        got: dict[str, Tensor] = {}
        scale: dict[str, Tensor] = {}
        for lo in range(0, ctx.B, chunk):
            for n, t in self.per_input(ctx, lo, min(ctx.B, lo + chunk)).items():
                t = t[:, 0].detach().to(ctx.acc_dtype)
                sign = s[lo : lo + t.shape[0]].reshape(-1, *([1] * (t.ndim - 1)))
                got[n] = (sign * t).sum(0) + got[n] if n in got else (sign * t).sum(0)
                sq = t.pow(2).sum()
                scale[n] = scale[n] + sq if n in scale else sq
        return got, scale

    def subtract_signed_sum(
        self, ctx: _Ctx, s: Tensor, diff: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """diff[name] -= :meth:`signed_sum` in place; returns its scales."""
        got, scale = self.signed_sum(ctx, s)
        for n, t in got.items():
            diff[n].sub_(t)
        return scale

    def sum_squares(self, ctx: _Ctx, acc: dict[str, Tensor], weight: float) -> None:
        """acc += weight * sum over inputs and columns of the squared per-input gradients."""
        numel = sum(ctx.engine.params[n].numel() for n in ctx.names.values())
        chunk = ctx.chunk(ctx.square_bytes * ctx.K * numel)
        for lo in range(0, ctx.B, chunk):
            for name, t in self.per_input(ctx, lo, min(ctx.B, lo + chunk)).items():
                acc[name] += weight * _squared(t, ctx.acc_dtype).sum((0, 1))


def _default_forward(module: nn.Module, *classes: type[nn.Module]) -> bool:
    return any(isinstance(module, c) and type(module).forward is c.forward for c in classes)


def _direct(module: nn.Module, local_names: set[str], allowed: set[str]) -> bool:
    direct = {n for n, p in module.named_parameters(recurse=False) if p is not None}
    return local_names <= direct and local_names <= allowed


class _MatmulRule(_Rule):
    """Linear and Conv as matrix products over L positions: input x's weight gradient for column
    k is G_kx U_x^T, G_kx (O x L) the output gradient and U_x (I x L) the input (the unfolded
    patches of a convolution); the bias gradient is G_kx summed over positions. A weight stored
    as (I, O) (``weight_transposed``) gets the transpose, U_x G_kx^T."""

    #: the weight is stored (in, out), as in y = x @ W + b
    weight_transposed: ClassVar[bool] = False

    def _weight_shaped(self, w: Tensor, shape: torch.Size) -> Tensor:
        """(..., O, I) products reshaped to (..., *shape), transposed first for an (I, O) weight."""
        if self.weight_transposed:
            w = w.transpose(-1, -2)
        return w if w.shape[-2:] == shape else w.reshape(*w.shape[:-2], *shape)

    def unfolded(self, ctx: _Ctx, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Output gradients ``gl`` (K, b, O, L) and inputs ``cols`` (b, I, L)."""
        raise NotImplementedError

    def output_grads(self, ctx: _Ctx) -> Tensor:
        """The output gradients ``gl`` (K, B, O, L) of :meth:`unfolded` for the whole batch."""
        return self.unfolded(ctx, 0, ctx.B)[0]

    def sizes(self, ctx: _Ctx) -> tuple[int, int, int]:
        """(O, L, I) of :meth:`unfolded`, from the shapes alone."""
        gl, cols = self.unfolded(ctx, 0, 1)
        return gl.shape[2], gl.shape[3], cols.shape[1]

    def per_input(self, ctx: _Ctx, lo: int, hi: int) -> dict[str, Tensor]:
        gl, cols = self.unfolded(ctx, lo, hi)
        out = {}
        if "weight" in ctx.names:
            w = torch.einsum("kbol,bil->bkoi", gl, cols)
            out[ctx.names["weight"]] = self._weight_shaped(w, ctx.param("weight").shape)
        if "bias" in ctx.names:
            out[ctx.names["bias"]] = gl.sum(-1).transpose(0, 1)
        return out

    def _signed_factors(self, ctx: _Ctx, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The signed output gradients (O x BL) and the inputs (BL x I) whose product is
        sum_b s_b G_b U_b^T, and the unsigned ``gl`` (K, B, O, L) and ``cols`` (B, I, L)."""
        gl, cols = self.unfolded(ctx, 0, ctx.B)
        g = gl[0] * s.reshape(-1, 1, 1)  # (B, O, L)
        flat_g = g.permute(1, 0, 2).reshape(g.shape[1], -1)
        flat_u = cols.permute(0, 2, 1).reshape(-1, cols.shape[1])
        return flat_g, flat_u, gl, cols

    def _scales(self, ctx: _Ctx, gl: Tensor, cols: Tensor) -> dict[str, Tensor]:
        """sum_b ||G_b||^2 ||U_b||^2 for the weight, sum_b ||G_b 1||^2 for the bias."""
        scale = {}
        g0, cols = gl[0].to(ctx.acc_dtype), cols.to(ctx.acc_dtype)
        if "weight" in ctx.names:
            scale[ctx.names["weight"]] = (g0.pow(2).sum((1, 2)) * cols.pow(2).sum((1, 2))).sum()
        if "bias" in ctx.names:
            scale[ctx.names["bias"]] = g0.sum(-1).pow(2).sum()
        return scale

    def signed_sum(self, ctx: _Ctx, s: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """sum_b s_b G_b U_b^T as one (O x BL) @ (BL x I) product of the signed output gradients
        with the inputs (no per-input gradient materialised); scale sum_b ||G_b||^2 ||U_b||^2."""
        flat_g, flat_u, gl, cols = self._signed_factors(ctx, s)
        got = {}
        if "weight" in ctx.names:
            got[ctx.names["weight"]] = self._weight_shaped(
                flat_g @ flat_u, ctx.param("weight").shape
            )
        if "bias" in ctx.names:
            got[ctx.names["bias"]] = flat_g.sum(1)
        return got, self._scales(ctx, gl, cols)

    def subtract_signed_sum(
        self, ctx: _Ctx, s: Tensor, diff: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The weight's product subtracted straight into ``diff`` (one addmm, no parameter-sized
        temporary) where ``diff`` is a plain (O x I) or (I x O) matrix in memory."""
        flat_g, flat_u, gl, cols = self._signed_factors(ctx, s)
        if "weight" in ctx.names:
            target = diff[ctx.names["weight"]]
            rows, cols_ = (
                (flat_u.shape[1], flat_g.shape[0])
                if self.weight_transposed
                else (
                    flat_g.shape[0],
                    flat_u.shape[1],
                )
            )
            a, b = (flat_u.t(), flat_g.t()) if self.weight_transposed else (flat_g, flat_u)
            a, b = a.to(target.dtype), b.to(target.dtype)  # 16-bit products: the check in fp32
            if target.is_contiguous() and target.numel() == rows * cols_:
                target.view(rows, cols_).addmm_(a, b, alpha=-1)
            elif target.ndim == 2 and target.t().is_contiguous():  # a transposed gradient
                target.t().addmm_(b.t(), a.t(), alpha=-1)
            else:
                target.sub_(self._weight_shaped(flat_g @ flat_u, target.shape))
        if "bias" in ctx.names:
            diff[ctx.names["bias"]].sub_(flat_g.sum(1))
        return self._scales(ctx, gl, cols)

    def sum_squares(self, ctx: _Ctx, acc: dict[str, Tensor], weight: float) -> None:
        """sum_x sum_k (G_kx U_x^T)^2 by the cheapest exact route that applies:

        * direct, K L O I per input: materialise the per-input gradients of a chunk of inputs,
          square and sum (columns whose gradients end early cut short, ``_direct_squares``);
        * Gram, L^2 O I per input, when L < K: (G U^T)^2 summed over k equals
          sum_{l,m} (sum_k G_ol G_om) U_il U_im, one (O x b L^2) @ (b L^2 x I) product. L = 1
          folds the columns: (sum_k g^2)^T @ a^2.
        * one position, L O I per input, when L >= K and every column's output gradient G_kx
          is nonzero at one position l at most (a vocabulary head under per-position columns):
          (G_kx U_x^T)^2 = sum_l G_kx,ol^2 U_x,il^2, one (O x b L) @ (b L x I) product of
          sum_k G^2 with U^2.
        """
        B, K, acc_dtype = ctx.B, ctx.K, ctx.acc_dtype
        n_out, L, n_in = self.sizes(ctx)
        gram = L < K
        if L == 1:  # the columns fold: their squares (K, b, O) and the inputs' (b, I), no product
            per_input = K * n_out + n_in
        elif gram:
            per_input = (n_out + n_in) * L * L
        else:
            per_input = K * n_out * n_in + n_in * L
        if ctx.dtype == acc_dtype:
            chunk = ctx.chunk(ctx.square_bytes * per_input)
        else:
            # 16-bit products: every route but the direct one works on float32 copies of the
            # output gradients and inputs; the direct one squares a cast copy of its products.
            a = acc_dtype.itemsize
            copies = a * (K * n_out * L + n_in * L)
            own = a * per_input if gram or L == 1 else ctx.square_bytes * K * n_out * n_in
            chunk = ctx.chunk(copies + own)
        for lo in range(0, B, chunk):
            gl, cols = self.unfolded(ctx, lo, min(B, lo + chunk))
            # the bias's per-input gradients (in the products' dtype), squared in acc_dtype
            g2 = _squared(gl.squeeze(-1) if L == 1 else gl.sum(-1), acc_dtype).sum(0)  # (b, O)
            if "weight" in ctx.names:
                if L == 1:
                    w = g2.T @ _squared(cols.squeeze(-1), acc_dtype)
                elif gram:
                    glf, colsf = gl.to(acc_dtype), cols.to(acc_dtype)
                    ggt = torch.einsum("kbol,kbom->oblm", glf, glf).reshape(n_out, -1)
                    uut = torch.einsum("bil,bim->blmi", colsf, colsf).reshape(-1, n_in)
                    w = ggt @ uut
                elif _route_one_position(ctx, gl, lo):
                    g2l = _squared(gl, acc_dtype).sum(0)  # (b, O, L)
                    flat_g = g2l.permute(1, 0, 2).reshape(n_out, -1)
                    w = flat_g @ _squared(cols, acc_dtype).permute(0, 2, 1).reshape(-1, n_in)
                else:
                    w = _direct_squares(gl, cols, acc_dtype, ctx.ends)
                target = acc[ctx.names["weight"]]
                target.add_(self._weight_shaped(w, target.shape), alpha=weight)
            if "bias" in ctx.names:
                acc[ctx.names["bias"]].add_(g2.sum(0), alpha=weight)


def _folded_bytes(ctx: _Ctx) -> int | None:
    """The bytes :func:`_folded_sum_squares` allocates for this call of a Linear (or ``Conv1D``)
    at one position per input (L = 1) whose products are in the accumulation dtype; None for any
    other call."""
    rule = _RULES[ctx.handler.rule]
    if not isinstance(rule, _LinearRule) or ctx.dtype != ctx.acc_dtype:
        return None
    n_out, L, n_in = rule.sizes(ctx)
    if L != 1:
        return None
    return ctx.B * ctx.square_bytes * (ctx.K * n_out + n_in)


def _folded_sum_squares(ctxs: list[_Ctx], acc: dict[str, Tensor], weight: float) -> None:
    """The L = 1 route of :meth:`_MatmulRule.sum_squares` for several layers at once, the
    elementwise steps of all of them as one op each (squares of the output gradients g (K, B, O)
    and of the inputs a (B, I), the final additions into ``acc``): per layer, the weight gets
    (sum_k g^2)^T @ a^2 and the bias sum_b sum_k g^2, the same products in the same order as
    the rule's, so the same numbers, with fewer ops dispatched."""
    gs, xs = [], []
    for ctx in ctxs:
        gl, cols = cast(_LinearRule, _RULES[ctx.handler.rule]).unfolded(ctx, 0, ctx.B)
        gs.append(gl.squeeze(-1))
        if "weight" in ctx.names:
            xs.append(cols.squeeze(-1))
    g_sq = torch._foreach_mul(gs, gs)
    x_sq = iter(torch._foreach_mul(xs, xs)) if xs else iter(())
    targets, values = [], []
    for ctx, g2k in zip(ctxs, g_sq):
        g2 = g2k.sum(0)  # (B, O)
        if "weight" in ctx.names:
            target = acc[ctx.names["weight"]]
            rule = cast(_LinearRule, _RULES[ctx.handler.rule])
            targets.append(target)
            values.append(rule._weight_shaped(g2.T @ next(x_sq), target.shape))
        if "bias" in ctx.names:
            targets.append(acc[ctx.names["bias"]])
            values.append(g2.sum(0))
    torch._foreach_add_(targets, values, alpha=weight)


#: column blocks of the direct route, each cut at its last position with a nonzero gradient
_DIRECT_BLOCKS = 8


def _column_ends(gl: Tensor) -> Tensor:
    """(K,): for each column of output gradients ``gl`` (K, b, O, L), one past the last position
    where it is nonzero for some input (0 for a zero column)."""
    L = gl.shape[-1]
    nz = gl.any(2).any(1)  # (K, L); ``any`` reads NaN as nonzero, as ``!= 0`` does
    return torch.where(nz.any(1), L - nz.flip(1).int().argmax(1), 0)


def _direct_squares(
    gl: Tensor,
    cols: Tensor,
    dtype: torch.dtype | None = None,
    ends: tuple[Tensor, list[int]] | None = None,
) -> Tensor:
    """sum over columns k and inputs x of (G_kx U_x^T)^2, (O, I), from output gradients ``gl``
    (K, b, O, L) and inputs ``cols`` (b, I, L): the products in their dtype, squared and summed
    in ``dtype`` (default: that of ``gl``). A column whose output gradients vanish beyond
    position e needs only the first e positions (under per-position columns of a causal model,
    column t reaches positions <= t): the columns go in blocks sorted by e, each block's product
    cut at its largest e, about half the work of the full product there. ``ends``: the columns'
    e (``_column_ends``, over these inputs or more) on the device and as already read; else
    they are computed and read here."""
    K, L = gl.shape[0], gl.shape[-1]
    dtype = dtype or gl.dtype
    if K < 2 * _DIRECT_BLOCKS:
        return _square_in_place(torch.einsum("kbol,bil->bkoi", gl, cols), dtype).sum((0, 1))
    if ends is None:
        ends_t = _column_ends(gl)
        ends_read = ends_t.tolist()
    else:
        ends_t, ends_read = ends
    if all(e == L for e in ends_read):
        return _square_in_place(torch.einsum("kbol,bil->bkoi", gl, cols), dtype).sum((0, 1))
    order = torch.argsort(ends_t)
    ends_sorted = sorted(ends_read)  # the values in ``order``'s order, whatever it does with ties
    step = -(-K // _DIRECT_BLOCKS)
    w = gl.new_zeros(gl.shape[2], cols.shape[1], dtype=dtype)
    for k0 in range(0, K, step):
        e = max(ends_sorted[k0 : k0 + step])
        if e:
            g = gl[order[k0 : k0 + step], ..., :e]
            w += _square_in_place(torch.einsum("kbol,bil->bkoi", g, cols[..., :e]), dtype).sum(
                (0, 1)
            )
    return w


def _square_in_place(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh product ``t`` squared in ``dtype``: in place when it is in ``dtype`` already."""
    return t.square_() if t.dtype == dtype else t.to(dtype).square_()


def _one_position(gl: Tensor) -> bool:
    """Whether every (column, input) of output gradients ``gl`` (K, b, O, L) is nonzero at one
    position at most."""
    return bool(((gl != 0).any(2).sum(-1) <= 1).all())


def _one_position_inputs(gl: Tensor) -> Tensor:
    """Per input, (b,) bool: whether each of its columns of output gradients ``gl`` (K, b, O, L)
    is nonzero at one position at most (``_one_position`` of that input alone; ``any`` reads a
    nonzero entry, NaN included, as ``!= 0`` does, without a bool copy of ``gl``)."""
    return (gl.any(2).sum(-1) <= 1).all(0)


def _route_one_position(ctx: _Ctx, gl: Tensor, lo: int) -> bool:
    """Whether the inputs lo:lo + b of ``gl`` (K, b, O, L) take the one-position product: from
    the flags read for the whole batch when there are some, else read now."""
    if ctx.one_position is None:
        return _one_position(gl)
    return all(ctx.one_position[lo : lo + gl.shape[1]])


def _read_one_position(ctxs: Sequence[_Ctx]) -> None:
    """Set ``one_position`` on every call whose matrix rule will ask for it (a weight, L > 1
    positions, not the Gram route), and with many columns the direct route's column ends
    (``ends``), for all of them with one device-to-host read: each read waits for the device,
    and reads per layer made a GPU pass of a deep model wait once or twice per layer."""
    need = []
    for ctx in ctxs:
        rule = _RULES[ctx.handler.rule]
        if isinstance(rule, _MatmulRule) and "weight" in ctx.names:
            _, L, _ = rule.sizes(ctx)
            if L > 1 and L >= ctx.K:
                need.append((ctx, rule))
    if not need:
        return
    flags, ends = [], []
    for ctx, rule in need:
        gl = rule.output_grads(ctx)
        flags.append(_one_position_inputs(gl).long())
        # the direct route's column blocks (many columns) take their ends from the same read
        many = ctx.K >= 2 * _DIRECT_BLOCKS
        ends.append(_column_ends(gl) if many else gl.new_zeros(0, dtype=torch.long))
    read = torch.cat([t for pair in zip(flags, ends) for t in pair]).tolist()
    at = 0
    for (ctx, _), f, e in zip(need, flags, ends):
        ctx.one_position = [bool(v) for v in read[at : at + f.numel()]]
        at += f.numel()
        if e.numel():
            ctx.ends = (e, read[at : at + e.numel()])
        at += e.numel()


class _LinearRule(_MatmulRule):
    """``nn.Linear`` on (B, ..., I): L = the product of the middle dimensions (1 without them)."""

    name = "linear"

    def applies(self, module: nn.Module, local_names: set[str]) -> bool:
        return _default_forward(module, nn.Linear) and _direct(
            module, local_names, {"weight", "bias"}
        )

    def layout_ok(self, module: nn.Module, call: _Call) -> bool:
        i = call.input_index()
        x = call.leaves[i] if i is not None else None
        return (
            super().layout_ok(module, call)
            and isinstance(x, Tensor)
            and call.leaf_dims[cast(int, i)] != x.ndim - 1
        )

    def unfolded(self, ctx: _Ctx, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        a, g = ctx.x(lo, hi), ctx.g(lo, hi)
        if a.ndim == 2 and g.ndim == 3:  # (b, I) and (K, b, O): L = 1, one view each
            return g.unsqueeze(-1), a.unsqueeze(-1)
        K, b = g.shape[0], g.shape[1]
        cols = a.reshape(b, -1, a.shape[-1]).transpose(1, 2)
        return g.reshape(K, b, -1, g.shape[-1]).transpose(2, 3), cols

    def output_grads(self, ctx: _Ctx) -> Tensor:
        g = ctx.g(0, ctx.B)  # the inputs are not needed (nor their cast copy)
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).transpose(2, 3)

    def sizes(self, ctx: _Ctx) -> tuple[int, int, int]:
        x = cast(Tensor, ctx.call.leaves[cast(int, ctx.call.input_index())])
        g = ctx.grads[0]
        b = g.shape[1 + cast(int, ctx.call.out_dims[0])]
        n_out = g.shape[-1]
        return n_out, g.numel() // max(1, g.shape[0] * b * n_out), x.shape[-1]


class _HFConv1DRule(_LinearRule):
    """``transformers``' ``Conv1D`` (GPT-2's attention and MLP projections): y = x @ W + b with W
    of shape (I, O), a Linear whose weight is stored transposed, so input x's weight gradient for
    column k is U_x G_kx^T (I x O)."""

    name = "hf_conv1d"
    weight_transposed = True

    def applies(self, module: nn.Module, local_names: set[str]) -> bool:
        # An instance exists only once transformers is imported: never import it here.
        utils = sys.modules.get("transformers.pytorch_utils")
        cls = getattr(utils, "Conv1D", None)
        return (
            cls is not None
            and _default_forward(module, cls)
            and _direct(module, local_names, {"weight", "bias"})
            and cast(Tensor, cast(Any, module).weight).ndim == 2
        )


class _ConvRule(_MatmulRule):
    """``nn.Conv1d``/``nn.Conv2d`` (zero padding, one group): U_x = the unfolded input patches,
    L = the output pixels."""

    name = "conv"
    batch_first_only = True

    def applies(self, module: nn.Module, local_names: set[str]) -> bool:
        m: Any = module
        return (
            _default_forward(module, nn.Conv1d, nn.Conv2d)
            and _direct(module, local_names, {"weight", "bias"})
            and m.groups == 1
            and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)
        )

    def unfolded(self, ctx: _Ctx, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        m = ctx.module
        a, g = ctx.x(lo, hi), ctx.g(lo, hi)
        K, b = g.shape[0], g.shape[1]
        if isinstance(m, nn.Conv1d):
            a = a.unsqueeze(2)
            ks, st, pd, dl = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
        else:
            ks, st, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation
        cols = F.unfold(a, ks, dilation=dl, padding=pd, stride=st)  # (b, Cin*k, L)
        return g.reshape(K, b, g.shape[2], -1), cols

    def output_grads(self, ctx: _Ctx) -> Tensor:
        g = ctx.g(0, ctx.B)  # no unfolded inputs: only the gradients' positions are read
        return g.reshape(g.shape[0], g.shape[1], g.shape[2], -1)

    def sizes(self, ctx: _Ctx) -> tuple[int, int, int]:
        m, g = ctx.module, ctx.grads[0]  # g: (K, B, O, *output positions)
        return g.shape[2], math.prod(g.shape[3:]), m.in_channels * math.prod(m.kernel_size)


class _EmbeddingRule(_Rule):
    """``nn.Embedding``: input x's gradient of row v is the sum of the output gradients at the
    positions where x looks up token v (none for ``padding_idx``). ``max_norm`` renormalises the
    weight in place before the lookup and is not differentiated, so the formula is the same."""

    name = "embedding"

    def applies(self, module: nn.Module, local_names: set[str]) -> bool:
        m: Any = module
        return (
            _default_forward(module, nn.Embedding)
            and _direct(module, local_names, {"weight"})
            and not m.sparse
            and not m.scale_grad_by_freq
        )

    def per_input(self, ctx: _Ctx, lo: int, hi: int) -> dict[str, Tensor]:
        m = ctx.module
        i = ctx.call.input_index()
        d = cast(int, ctx.call.leaf_dims[cast(int, i)])
        idx = cast(Tensor, ctx.call.leaves[cast(int, i)]).movedim(d, 0)[lo:hi]
        g = ctx.g(lo, hi)
        b, K = idx.shape[0], g.shape[0]
        dense = torch.zeros(
            b, K, m.num_embeddings, m.embedding_dim, dtype=ctx.dtype, device=g.device
        )
        flat_idx = idx.reshape(b, -1)
        gk = g.reshape(K, b, -1, m.embedding_dim).transpose(0, 1)  # (b, K, S, D)
        if m.padding_idx is not None:
            gk = gk * (flat_idx != m.padding_idx)[:, None, :, None]
        dense.scatter_add_(2, flat_idx[:, None, :, None].expand_as(gk), gk)
        return {ctx.names["weight"]: dense}

    def _rows(self, ctx: _Ctx) -> tuple[Tensor, Tensor]:
        """Token ids (B, S) and output gradients (K, B, S, D), padding rows zeroed."""
        m = ctx.module
        i = cast(int, ctx.call.input_index())
        d = cast(int, ctx.call.leaf_dims[i])
        tok = cast(Tensor, ctx.call.leaves[i]).movedim(d, 0)[: ctx.B].reshape(ctx.B, -1)
        gk = ctx.grads[0].movedim(1 + cast(int, ctx.call.out_dims[0]), 1)[:, : ctx.B]
        gk = gk.reshape(ctx.K, ctx.B, -1, m.embedding_dim).to(ctx.dtype)
        if m.padding_idx is not None:
            gk = gk * (tok != m.padding_idx)[None, :, :, None]
        return tok, gk

    def signed_sum(self, ctx: _Ctx, s: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """sum_b s_b g_b: every looked-up row's gradient, signed by its input, added into its
        token's row; scale: sum of the squared row gradients (times the tokens per input)."""
        tok, gk = self._rows(ctx)
        name = ctx.names["weight"]
        signed = (gk[0] * s.reshape(-1, 1, 1)).reshape(-1, gk.shape[-1]).to(ctx.acc_dtype)
        got = torch.zeros(ctx.param("weight").shape, dtype=ctx.acc_dtype, device=gk.device)
        got.index_add_(0, tok.reshape(-1), signed)
        return {name: got}, {name: _squared(gk[0], ctx.acc_dtype).sum() * tok.shape[1]}

    def sum_squares(self, ctx: _Ctx, acc: dict[str, Tensor], weight: float) -> None:
        """Per (column, input, token id): sum the rows of g, square, add into the token's row."""
        m = ctx.module
        name = ctx.names["weight"]
        i = cast(int, ctx.call.input_index())
        d = cast(int, ctx.call.leaf_dims[i])
        idx = cast(Tensor, ctx.call.leaves[i]).movedim(d, 0)
        K, B, D, V = ctx.K, ctx.B, m.embedding_dim, m.num_embeddings
        tok = idx.reshape(B, -1)
        gk = ctx.grads[0].movedim(1 + cast(int, ctx.call.out_dims[0]), 1)
        gk = gk.reshape(K, B, -1, D).to(acc[name].dtype)
        if m.padding_idx is not None:  # padding rows add nothing (their segments sum to 0)
            gk = torch.where((tok != m.padding_idx)[None, :, :, None], gk, 0)
        unit = torch.arange(K * B, device=tok.device).reshape(K, B, 1)
        key = (unit * V + tok.unsqueeze(0)).expand(K, B, tok.shape[1]).reshape(-1)
        inv, seg_key, _ = _segments(key)
        rows = gk.reshape(-1, D)
        sums = torch.zeros_like(rows).index_add_(0, inv, rows)
        acc[name].index_add_(0, seg_key % V, weight * sums.pow(2))


def _segments(key: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.unique(key, return_inverse=True)`` without reading the number of distinct values
    from the device (one wait for the device per call): for n keys, n segments, the first R
    (the distinct keys, ascending) as unique gives them, the rest empty. Returns each key's
    segment (n,), each segment's key (n,; 0 for the empty ones) and which segments are used (n,
    bool). Sums into the segments by ``index_add_`` add the same entries in the same order as
    into unique's; the empty segments get nothing, so they add zeros wherever they go."""
    n = key.shape[0]
    sorted_key, order = torch.sort(key, stable=True)
    start = torch.ones(n, dtype=torch.bool, device=key.device)
    torch.ne(sorted_key[1:], sorted_key[:-1], out=start[1:])
    seg = start.cumsum(0) - 1
    inv = torch.empty_like(seg).scatter_(0, order, seg)
    seg_key = torch.zeros_like(sorted_key).scatter_(0, seg, sorted_key)
    used = torch.arange(n, device=key.device) <= seg[-1:]
    return inv, seg_key, used


def _tied_pair(ctxs: list[_Ctx]) -> bool:
    """Whether the uses ``ctxs`` of one parameter are the pair :func:`_tied_sum_squares` takes:
    one ``nn.Embedding`` call and one ``nn.Linear`` call, a 2-d weight, the same columns."""
    if sorted(c.handler.rule for c in ctxs) != ["embedding", "linear"]:
        return False
    lin = next(c for c in ctxs if c.handler.rule == "linear")
    emb = next(c for c in ctxs if c.handler.rule == "embedding")
    return lin.param(next(iter(lin.names))).ndim == 2 and lin.K == emb.K


def _tied_sum_squares(ctxs: list[_Ctx], acc: dict[str, Tensor], weight: float) -> bool:
    """acc += weight * sum over inputs and columns of the squared per-input gradients of one
    parameter W (V x D) used by one ``nn.Embedding`` call and one ``nn.Linear`` call (tied input
    and output embeddings), without a per-input V x D gradient.

    Input x's gradient for column k is A + S: A = G U^T from the Linear (G: V x L output
    gradients, U: D x L inputs), S from the embedding, nonzero only on the rows of the tokens x
    looks up (row v: the output gradients summed over the positions reading token v). Entrywise
    (A + S)^2 = A^2 + S^2 + 2 A S: the first two by the two uses' own rules, the cross term on the
    touched rows only, where A's row v is G_v U^T (K R L D per input, R distinct tokens).
    Returns False, doing nothing, when the uses are not exactly one such pair.
    """
    if not _tied_pair(ctxs):
        return False
    lin = next(c for c in ctxs if c.handler.rule == "linear")
    emb = next(c for c in ctxs if c.handler.rule == "embedding")
    target = acc[next(iter(lin.names.values()))]
    _RULES["linear"].sum_squares(lin, acc, weight)
    _RULES["embedding"].sum_squares(emb, acc, weight)
    tok, gk = cast(_EmbeddingRule, _RULES["embedding"])._rows(emb)  # (B, S), (K, B, S, D)
    K, B, _, D = gk.shape
    rule = cast(_MatmulRule, _RULES["linear"])
    # One input at a time: the Linear's rule above already held a larger chunk of its buffers.
    for x in range(B):
        gl, cols = rule.unfolded(lin, x, x + 1)  # (K, 1, V, L), (1, D, L)
        # the S positions' tokens in S segments, the first R the distinct tokens
        inv, uniq, used = _segments(tok[x])
        s_rows = gk.new_zeros(K, inv.numel(), D).index_add_(1, inv, gk[:, x])
        a_rows = gl[:, 0, uniq] @ cols[0].T  # (K, S, D)
        cross = (a_rows.to(target.dtype) * s_rows.to(target.dtype)).sum(0)
        target.index_add_(0, uniq, torch.where(used[:, None], cross, 0), alpha=2 * weight)
    return True


@functools.cache
def rms_norm_default_eps(dtype: torch.dtype) -> float:
    """The eps that ``torch.rms_norm(x, shape, eps=None)`` adds for inputs of ``dtype``.

    torch releases differ: some take ``finfo(dtype).eps`` (2^-7 for bf16), later ones that of the
    float32 they compute in. Found once per dtype from one probe, x = 2^-10, where the two give
    1/sqrt(1 + eps 2^20) far apart.
    """
    probe = torch.full((1, 4), 2.0**-10, dtype=dtype)
    got = float(torch.rms_norm(probe, [4], None, None)[0, 0])
    candidates = {torch.finfo(dtype).eps, torch.finfo(torch.float32).eps}
    return min(candidates, key=lambda eps: abs(got - 1.0 / math.sqrt(1.0 + eps * 2.0**20)))


class _NormRule(_Rule):
    """Affine parameters of LayerNorm, RMSNorm, GroupNorm and BatchNorm (running statistics).

    y = weight * x_hat + bias with x_hat independent of the parameters, so an input's gradient is
    sum(g * x_hat) for the weight and sum(g) for the bias, the sums running over every dimension
    the parameter is broadcast along (positions for LayerNorm/RMSNorm, space for the others).
    """

    name = "norm"
    model_dtype_products = False

    def applies(self, module: nn.Module, local_names: set[str]) -> bool:
        if not _direct(module, local_names, {"weight", "bias"}):
            return False
        rms = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
        if _default_forward(module, nn.LayerNorm, nn.GroupNorm, *rms):
            return True
        # BatchNorm is per-input only with running statistics (eval mode): then it is affine in x.
        bn = nn.modules.batchnorm._BatchNorm
        return (
            _default_forward(module, bn)
            and not module.training
            and getattr(module, "running_mean", None) is not None
        )

    def layout_ok(self, module: nn.Module, call: _Call) -> bool:
        if not super().layout_ok(module, call):
            return False
        i = cast(int, call.input_index())
        d, x = cast(int, call.leaf_dims[i]), cast(Tensor, call.leaves[i])
        shape = getattr(module, "normalized_shape", None)
        if shape is not None:  # the batch must not be a normalised dimension
            return d < x.ndim - len(shape)
        return d == 0

    def per_input(self, ctx: _Ctx, lo: int, hi: int) -> dict[str, Tensor]:
        m = ctx.module
        x, g = ctx.x(lo, hi), ctx.g(lo, hi)  # g: (K, b, *x.shape[1:])
        if hasattr(m, "normalized_shape"):
            dims_n = tuple(range(-len(m.normalized_shape), 0))
            if isinstance(m, nn.LayerNorm):
                var, mean = torch.var_mean(x, dims_n, unbiased=False, keepdim=True)
                xh = (x - mean) * torch.rsqrt(var + m.eps)
            else:
                eps = m.eps if m.eps is not None else rms_norm_default_eps(ctx.input_dtype)
                xh = x * torch.rsqrt(x.pow(2).mean(dims_n, keepdim=True) + eps)
            dims = tuple(range(2, g.ndim - len(m.normalized_shape)))
        elif isinstance(m, nn.GroupNorm):
            xg = x.reshape(x.shape[0], m.num_groups, -1)
            var, mean = torch.var_mean(xg, -1, unbiased=False, keepdim=True)
            xh = ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(x.shape)
            dims = tuple(range(3, g.ndim))
        else:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean = m.running_mean.to(ctx.dtype).reshape(shape)
            var = m.running_var.to(ctx.dtype).reshape(shape)
            xh = (x - mean) * torch.rsqrt(var + m.eps)
            dims = tuple(range(3, g.ndim))

        def reduce(t: Tensor) -> Tensor:  # (K, b, ...) -> (b, K, *param.shape)
            return (t.sum(dims) if dims else t).transpose(0, 1)

        out = {}
        if "weight" in ctx.names:
            out[ctx.names["weight"]] = reduce(g * xh)
        if "bias" in ctx.names:
            out[ctx.names["bias"]] = reduce(g)
        return out


class _PReLURule(_Rule):
    """``nn.PReLU``: y = max(x, 0) + w min(x, 0), so an input's weight gradient is
    sum g * min(x, 0) over every position (one shared weight) or over every position of each
    channel (dimension 1)."""

    name = "prelu"
    model_dtype_products = False
    batch_first_only = True

    def applies(self, module: nn.Module, local_names: set[str]) -> bool:
        return _default_forward(module, nn.PReLU) and _direct(module, local_names, {"weight"})

    def per_input(self, ctx: _Ctx, lo: int, hi: int) -> dict[str, Tensor]:
        x, g = ctx.x(lo, hi), ctx.g(lo, hi)
        t = (g * x.clamp_max(0)).transpose(0, 1)  # (b, K, ...)
        if ctx.param("weight").numel() == 1:
            w = t.reshape(*t.shape[:2], -1).sum(-1, keepdim=True)
        else:
            w = t.reshape(*t.shape[:3], -1).sum(-1)
        return {ctx.names["weight"]: w.reshape(*t.shape[:2], *ctx.param("weight").shape)}


def _primals(ctx: _Ctx) -> dict[str, Tensor]:
    modules = dict(ctx.module.named_modules())
    out = {}
    for loc in ctx.names:
        owner, _, attr = loc.rpartition(".")
        out[loc] = getattr(modules[owner], attr).detach()
    return out


class _VjpRule(_Rule):
    """Any module: ``torch.func.vjp`` of the module on one input (its batch dimensions sliced to
    size 1), vectorised with ``vmap`` over inputs and columns."""

    name = "vjp"

    def layout_ok(self, module: nn.Module, call: _Call) -> bool:
        return (
            bool(call.out_dims)
            and all(d is not None and d != UNKNOWN for d in call.out_dims)
            and UNKNOWN not in call.leaf_dims
        )

    def per_input(self, ctx: _Ctx, lo: int, hi: int) -> dict[str, Tensor]:
        from torch.func import functional_call, vjp, vmap

        c = ctx.call
        leaves = [x.detach() if isinstance(x, Tensor) else x for x in c.leaves]
        batched = [(i, d) for i, d in enumerate(c.leaf_dims) if d is not None]
        out_dims = cast(list[int], c.out_dims)
        primals = _primals(ctx)

        def one(vals: list[Tensor], cots: list[Tensor]) -> dict[str, Tensor]:
            def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
                ls = list(leaves)
                for (i, d), v in zip(batched, vals):
                    ls[i] = v.unsqueeze(d)
                args, kwargs = tree_unflatten(ls, c.spec)
                out = functional_call(ctx.module, p, tuple(args), kwargs, strict=False)
                flat = tree_flatten(out)[0]
                return tuple(flat[i] for i in c.out_idx)

            pullback = vjp(f, primals)[1]
            return vmap(
                lambda *cs: pullback(tuple(x.unsqueeze(d) for x, d in zip(cs, out_dims)))[0]
            )(*cots)

        vals = [leaves[i].movedim(d, 0)[lo:hi] for i, d in batched]
        cots = [g.movedim(1 + d, 1)[:, lo:hi] for g, d in zip(ctx.grads, out_dims)]
        per = vmap(one, in_dims=(0, 1))(vals, cots)
        # Other parameters of the module stay attached to the graph: keep only the values.
        return {ctx.names[loc]: t.detach().to(ctx.dtype) for loc, t in per.items()}


class _LoopRule(_VjpRule):
    """Any module: re-run it on one input at a time (batch dimensions sliced to size 1) with
    ordinary autograd, one backward per column."""

    name = "loop"

    def per_input(self, ctx: _Ctx, lo: int, hi: int) -> dict[str, Tensor]:
        from torch.func import functional_call

        c = ctx.call
        locs = list(ctx.names)
        out: dict[str, list[Tensor]] = {ctx.names[loc]: [] for loc in locs}
        out_dims = cast(list[int], c.out_dims)
        for x in range(lo, hi):
            ls = [
                (t.detach().narrow(d, x, 1) if d is not None else t.detach())
                if isinstance(t, Tensor)
                else t
                for t, d in zip(c.leaves, c.leaf_dims)
            ]
            args, kwargs = tree_unflatten(ls, c.spec)
            with torch.enable_grad():
                prim = {k: v.clone().requires_grad_() for k, v in _primals(ctx).items()}
                res = functional_call(ctx.module, prim, tuple(args), kwargs, strict=False)
                flat = tree_flatten(res)[0]
                outs = [flat[i] for i in c.out_idx]
                cols = []
                for k in range(ctx.K):
                    cots = [g[k].narrow(d, x, 1) for g, d in zip(ctx.grads, out_dims)]
                    gs = torch.autograd.grad(
                        outs, list(prim.values()), cots, retain_graph=True, allow_unused=True
                    )
                    cols.append(
                        [torch.zeros_like(p) if g is None else g for g, p in zip(gs, prim.values())]
                    )
            for j, loc in enumerate(locs):
                out[ctx.names[loc]].append(torch.stack([col[j] for col in cols]))
        return {n: torch.stack(v).to(ctx.dtype) for n, v in out.items()}


_CLOSED_FORMS: list[_Rule] = [
    _LinearRule(),
    _HFConv1DRule(),
    _ConvRule(),
    _EmbeddingRule(),
    _NormRule(),
    _PReLURule(),
]
_RULES: dict[str, _Rule] = {r.name: r for r in [*_CLOSED_FORMS, _VjpRule(), _LoopRule()]}
#: route after a failed check: a closed form or vjp -> loop over inputs -> the whole model
_NEXT = {**{r.name: "loop" for r in _CLOSED_FORMS}, "vjp": "loop", "loop": "model"}


def _closed_form_rule(module: nn.Module, local_names: set[str]) -> str:
    return next((r.name for r in _CLOSED_FORMS if r.applies(module, local_names)), "vjp")


# The engine -----------------------------------------------------------------------------------
