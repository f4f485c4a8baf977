"""Token-level and sequence-level Fisher of language models: `sample` in one backward per
sequence, sequence-level `empirical` and `sample`, and the engine's memory cap.

Ground truth is the brute-force dense reference (one input at a time, one autograd gradient per
logit) on tiny float64 models: a plain causal LM, and GPT-2 and BERT built from `transformers`
configs with random weights.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from dense_reference import DenseReference, dense_reference, draw_labels, max_relative_error
from models import random_gpt2
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lightning_fisher as lf
from lightning_fisher import hf
from lightning_fisher.outputs import FisherInputError

VOCAB, T = 12, 6
RTOL = 1e-6  # the diagonal is stored in float32


class CausalLM(nn.Module):
    """Embedding, a causal running mean over positions, tanh, a vocabulary head: every position's
    logits depend on the earlier positions, so sequence gradients have cross terms."""

    def __init__(self, vocab: int = VOCAB, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype, device=h.device)
        h = h.cumsum(1) / steps[:, None]
        return self.head(torch.tanh(self.mix(h)))


def _ids(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=gen)
    lengths = torch.tensor([T, 4, T, 2, 5, 3][:n])
    return ids, (torch.arange(T) < lengths[:, None]).long()


def plain_case() -> tuple[nn.Module, list[Any], dict[str, Any]]:
    torch.manual_seed(0)
    model = CausalLM().double().eval()
    ids, mask = _ids(5, 1)
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, VOCAB, (5, T), generator=gen).masked_fill(mask == 0, -100)
    return model, [(ids[:3], labels[:3]), (ids[3:], labels[3:])], {}


def gpt2_case() -> tuple[nn.Module, list[Any], dict[str, Any]]:
    pytest.importorskip("transformers")
    model = random_gpt2(VOCAB)
    ids, mask = _ids(5, 3)
    ids = ids.masked_fill(mask == 0, 0)
    batches = [
        hf.with_lm_labels({"input_ids": ids[i:j], "attention_mask": mask[i:j]})
        for i, j in ((0, 3), (3, 5))
    ]
    return model, batches, hf.lm_fisher_kwargs(model)


def bert_case() -> tuple[nn.Module, list[Any], dict[str, Any]]:
    """A masked LM: labels on some positions (-100 on the rest) and right padding."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).double().eval()
    ids, mask = _ids(5, 4)
    gen = torch.Generator().manual_seed(5)
    keep = (torch.rand(ids.shape, generator=gen) < 0.6) & (mask == 1)
    keep[:, 0] = True
    labels = ids.masked_fill(~keep, -100)
    batches = [
        {"input_ids": ids[i:j], "attention_mask": mask[i:j], "labels": labels[i:j]}
        for i, j in ((0, 3), (3, 5))
    ]
    return model, batches, {}


CASES: dict[str, Callable[[], tuple[nn.Module, list[Any], dict[str, Any]]]] = {
    "plain": plain_case,
    "gpt2": gpt2_case,
    "bert": bert_case,
}
_BUILT: dict[str, Any] = {}


def case(name: str) -> tuple[nn.Module, list[Any], dict[str, Any], DenseReference]:
    if name not in _BUILT:
        model, batches, kw = CASES[name]()
        ref = dense_reference(model, batches, shift_labels=kw.get("shift_labels", False))
        _BUILT[name] = (model, batches, kw, ref)
    return _BUILT[name]


# --------------------------------------------------- references built from the dense Jacobians


def _sequences(ref: DenseReference) -> list[list[int]]:
    """Indices (into ref.jacobians) of each sequence's counted positions, sequences with none
    left out."""
    out, j = [], 0
    for mask in ref.batch_masks:
        for row in mask:
            n = int(row.sum())
            if n:
                out.append(list(range(j, j + n)))
            j += n
    assert j == ref.n_inputs
    return out


def _grad(ref: DenseReference, j: int, y: int) -> Tensor:
    e = torch.zeros_like(ref.probs[j])
    e[y] = 1
    return ref.jacobians[j].T @ (e - ref.probs[j])


def sequence_empirical(ref: DenseReference) -> dict[str, Tensor]:
    """(1/N_seq) sum_s (sum_t g_{y_t})^2 with the true labels."""
    seqs = _sequences(ref)
    total = sum(sum(_grad(ref, j, ref.labels[j]) for j in s).pow(2) for s in seqs)  # type: ignore[arg-type,misc]
    return ref.unflatten(total / len(seqs))  # type: ignore[operator]


def sequence_sample_sum(ref: DenseReference, k: int, seed: int) -> Tensor:
    """sum_s (1/k) sum_j (sum_t g_{y_tj})^2, with the library's draws (every position of a
    batch, row-major, then the counted ones used)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(ref.jacobians[0].shape[1], dtype=torch.float64)
    j = 0
    for p, mask in zip(ref.batch_probs, ref.batch_masks):
        draws = draw_labels(p, k, gen).reshape(*mask.shape, k)
        for b in range(mask.shape[0]):
            ts = torch.nonzero(mask[b]).flatten().tolist()
            for d in range(k):
                g = sum(_grad(ref, j + i, int(draws[b, t, d])) for i, t in enumerate(ts))
                if ts:
                    total += g.pow(2) / k  # type: ignore[union-attr]
            j += len(ts)
    return total


def moments(ref: DenseReference) -> tuple[Tensor, Tensor, Tensor]:
    """Per parameter entry, over y ~ p at every counted position: the token Fisher's sum
    sum_t E[g_t^2], and the variances of one draw's sum of squares of the two routes,
    Var_position = sum_t (E[g_t^4] - E[g_t^2]^2) and
    Var_sequence = Var_position + 2 sum_s sum_{t != t'} E[g_t^2] E[g_t'^2]."""
    P = ref.jacobians[0].shape[1]
    f_sum, var_pos, cross = (torch.zeros(P, dtype=torch.float64) for _ in range(3))
    for s in _sequences(ref):
        fs = []
        for j in s:
            p = ref.probs[j]
            G = ref.jacobians[j].T @ (torch.eye(p.numel(), dtype=p.dtype) - p).T  # (P, C): g_y
            m2, m4 = (G.pow(2) * p).sum(1), (G.pow(4) * p).sum(1)
            fs.append(m2)
            var_pos += m4 - m2.pow(2)
        F = torch.stack(fs)
        f_sum += F.sum(0)
        cross += F.sum(0).pow(2) - F.pow(2).sum(0)
    return f_sum, var_pos, var_pos + 2 * cross


def estimate(name: str, method: str, **kw: Any) -> lf.FisherDiagonal:
    model, batches, extra, _ = case(name)
    return lf.estimate_fisher(model, batches, method=method, **extra, **kw)


# ------------------------------------------------------------------------ exact agreement


@pytest.mark.parametrize("name", list(CASES))
def test_sequence_granularity_matches_the_dense_reference(name: str) -> None:
    _, _, _, ref = case(name)
    n_seq = len(_sequences(ref))
    emp = estimate(name, "empirical", granularity="sequence")
    assert emp.n_samples == n_seq and emp.options["granularity"] == "sequence"
    err, where = max_relative_error(dict(emp.items()), sequence_empirical(ref))
    assert err <= RTOL, f"sequence empirical on {name}: {err:.2e} on {where}"

    k, seed = 3, 11
    want = sequence_sample_sum(ref, k, seed)
    seq = estimate(name, "sample", granularity="sequence", mc_samples=k, seed=seed)
    assert seq.n_samples == n_seq
    err, where = max_relative_error(dict(seq.items()), ref.unflatten(want / n_seq))
    assert err <= RTOL, f"sequence sample on {name}: {err:.2e} on {where}"
    # token-level sample, one backward per sequence: the same columns over N tokens
    tok = estimate(name, "sample", mc_samples=k, seed=seed)
    assert tok.n_samples == ref.n_inputs
    err, where = max_relative_error(dict(tok.items()), ref.unflatten(want / ref.n_inputs))
    assert err <= RTOL, f"token sample (sequence route) on {name}: {err:.2e} on {where}"
    # the per-position route is the per-position estimate of the dense reference
    pos = estimate(name, "sample", mc_samples=k, seed=seed, token_route="position")
    err, where = max_relative_error(dict(pos.items()), ref.sample(k, seed))
    assert err <= RTOL, f"token sample (position route) on {name}: {err:.2e} on {where}"
    # token-level empirical is still per position
    err, where = max_relative_error(dict(estimate(name, "empirical").items()), ref.empirical())
    assert err <= RTOL, f"token empirical on {name}: {err:.2e} on {where}"


def test_sequence_and_token_differ_by_the_cross_terms() -> None:
    """F_seq - (N_tok / N_seq) F_tok = (1/N_seq) sum_s sum_{t != t'} g_t g_t' for `empirical`:
    not zero on a model whose positions interact."""
    _, _, _, ref = case("plain")
    n_seq = len(_sequences(ref))
    seq = estimate("plain", "empirical", granularity="sequence").flatten().double()
    tok = estimate("plain", "empirical").flatten().double()
    cross = torch.zeros_like(seq)
    for s in _sequences(ref):
        gs = torch.stack([_grad(ref, j, ref.labels[j]) for j in s])  # type: ignore[arg-type]
        cross += gs.sum(0).pow(2) - gs.pow(2).sum(0)
    torch.testing.assert_close(seq - tok * ref.n_inputs / n_seq, cross / n_seq)
    assert cross.abs().max() > 1e-2 * seq.abs().max()


# ------------------------------------------------------------------ unbiasedness and variance

DRAWS, REPEATS = 100, 20


def _repeats(name: str, route: str, seeds: range) -> Tensor:
    """Independent estimates (one per seed, ``DRAWS`` draws each) from one shared pass."""
    model, batches, extra, _ = case(name)
    fds = lf.estimate_fishers(
        model,
        batches,
        [{"method": "sample", "seed": s} for s in seeds],
        mc_samples=DRAWS,
        token_route=route,
        **extra,
    )
    return torch.stack([fd.flatten().double() for fd in fds])


@pytest.mark.parametrize("name", ["plain", "gpt2"])
def test_sequence_route_is_unbiased_for_the_token_fisher(name: str) -> None:
    """The mean of many one-backward-per-sequence estimates is within a few standard errors of
    the exact token-level Fisher (a 10% bias would not be)."""
    _, _, _, ref = case(name)
    exact = torch.cat([t.reshape(-1) for t in ref.exact().values()])
    f_sum, _, var_seq = moments(ref)
    torch.testing.assert_close(f_sum / ref.n_inputs, exact)  # the moments' own check
    est = _repeats(name, "sequence", range(REPEATS))
    mean = est.mean(0)
    # the variance of the mean, predicted from the dense reference: Var_seq / (N^2 DRAWS REPEATS)
    se = (var_seq / (ref.n_inputs**2 * DRAWS * REPEATS)).sqrt()
    keep = se > 1e-8 * se.max()
    z = ((mean - exact)[keep] / se[keep]).pow(2).mean()
    assert z < 3, f"mean squared z-score {z:.2f} (about 1 when unbiased)"
    z_biased = ((mean - 1.1 * exact)[keep] / se[keep]).pow(2).mean()
    assert z_biased > 10, f"the test cannot see a 10% bias (z^2 {z_biased:.2f})"


def test_measured_variances_of_the_two_routes_match_their_formulas() -> None:
    """Per entry, one draw of the sequence route has variance Var_position + 2 sum_{t != t'}
    F_t F_t' (the cross terms): measured over repeats of both routes on the plain LM."""
    _, _, _, ref = case("plain")
    _, var_pos, var_seq = moments(ref)
    n, reps = ref.n_inputs, 24
    measured = {
        route: _repeats("plain", route, range(100, 100 + reps)).var(0) * DRAWS * n**2
        for route in ("sequence", "position")
    }
    for route, want in (("sequence", var_seq), ("position", var_pos)):
        keep = want > 1e-6 * want.max()
        ratio = float((measured[route][keep] / want[keep]).mean())
        assert 0.6 < ratio < 1.5, f"{route}: measured / predicted variance {ratio:.2f}"
    ratio = float((var_seq / var_pos)[var_pos > 1e-6 * var_pos.max()].median())
    assert ratio > 1.5, f"the cross terms add little variance here ({ratio:.2f}x)"


# ------------------------------------------------------------------------ options


def test_granularity_and_route_are_validated() -> None:
    with pytest.raises(FisherInputError, match="granularity must be one of"):
        lf.FisherOptions(granularity="sentence")
    with pytest.raises(FisherInputError, match="token_route must be one of"):
        lf.FisherOptions(token_route="row")
    model, batches, _, _ = case("plain")
    for method in ("exact", "batched", "hutchinson", "upper", "lower"):
        with pytest.raises(FisherInputError, match=rf"method='{method}' does not take granularity"):
            lf.estimate_fisher(model, batches, method=method, granularity="sequence")
    with pytest.raises(FisherInputError, match="method='empirical' does not take token_route"):
        lf.estimate_fisher(model, batches, method="empirical", token_route="sequence")


def test_row_outputs_are_the_same_under_both_granularities() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    for method in ("empirical", "sample"):
        a = lf.estimate_fisher(model, [(x, y)], method=method, seed=1)
        b = lf.estimate_fisher(model, [(x, y)], method=method, seed=1, granularity="sequence")
        assert a.n_samples == b.n_samples == 7
        torch.testing.assert_close(a.flatten(), b.flatten(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------ the memory cap


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the storages that operations allocate while it is active (views of
    their inputs excluded) and the peak of those still alive; freed storages are noticed at the
    next operation, so the peak errs high."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        seen = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                st = t.untyped_storage()
                if st._cdata not in seen and st._cdata not in self.live:
                    self.live[st._cdata] = (StorageWeakRef(st), st.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _peak_bytes(run: Callable[[], Any]) -> int:
    """The peak of the bytes allocated by ``run()`` and alive at once."""
    with _LiveBytes() as mode:
        run()
    return mode.peak


@pytest.mark.parametrize(
    ("method", "kw"),
    [("empirical", {}), ("sample", {"token_route": "position"}), ("sample", {})],
    ids=["empirical-position", "sample-position", "sample-sequence"],
)
def test_engine_buffers_stay_under_the_cap(method: str, kw: dict[str, Any]) -> None:
    """Every call of the engine (cotangent chunk handed in + everything it allocates) stays under
    ``max_memory_mib`` on a token-level pass whose unchunked buffers are far larger."""
    from lightning_fisher.estimators.per_input import PerInputEngine

    torch.manual_seed(0)
    vocab, width, B, L = 400, 48, 6, 24
    model = CausalLM(vocab, width).double().eval()
    ids = torch.randint(0, vocab, (B, L))
    cap = 3.0  # MiB; one position's cotangent is B L C 8 bytes = 0.44 MiB, all of them 10.5 MiB
    peaks: list[int] = []
    mp = pytest.MonkeyPatch()
    for name in ("accumulate", "accumulate_positions"):  # dense columns, and split at the head
        original = getattr(PerInputEngine, name)

        def measured(
            self: PerInputEngine, logits: Tensor, cot: Tensor, *a: Any, _f: Any = original, **k: Any
        ) -> Any:
            out: list[Any] = []
            peaks.append(
                cot.nbytes + _peak_bytes(lambda: out.append(_f(self, logits, cot, *a, **k)))
            )
            return out[0]

        mp.setattr(PerInputEngine, name, measured)
    try:
        capped = lf.estimate_fisher(
            model, [(ids, ids)], method=method, max_memory_mib=cap, seed=1, **kw
        )
    finally:
        mp.undo()
    free = lf.estimate_fisher(model, [(ids, ids)], method=method, max_memory_mib=1024, seed=1, **kw)
    torch.testing.assert_close(capped.flatten(), free.flatten(), rtol=1e-10, atol=0)
    assert peaks and max(peaks) <= cap * 2**20, (
        f"peak {max(peaks) / 2**20:.2f} MiB above the cap {cap} MiB"
    )
    # the measurement sees the engine's real buffers (a quarter of the cap at least)
    assert max(peaks) > cap * 2**20 / 4, f"peak {max(peaks) / 2**20:.2f} MiB"


def test_a_cap_below_one_column_is_refused_before_allocating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning_fisher.estimators.per_input import PerInputEngine

    # the dense per-position columns (split at the head, a column is (B, C) only)
    monkeypatch.setattr(PerInputEngine, "head_split", False)
    torch.manual_seed(0)
    model = CausalLM(4000, 16).double().eval()
    ids = torch.randint(0, 4000, (4, 40))
    # one position's cotangent: 4 x 40 x 4000 x 8 bytes = 4.9 MiB, over a quarter of 8 MiB
    with pytest.raises(FisherInputError, match=r"Pass max_memory_mib >= \d+.*method=.sample."):
        lf.estimate_fisher(model, [(ids, ids)], method="empirical", max_memory_mib=8)
    # per sequence: one column's output gradients (the logits') take 4.9 MiB, over half of 8 MiB
    with pytest.raises(FisherInputError, match=r"Pass max_memory_mib >= \d+"):
        lf.estimate_fisher(model, [(ids, ids)], method="sample", max_memory_mib=8)


def _scale_benchmark(tmp_path: Path, only: str, seq_len: int) -> dict[str, dict[str, Any]]:
    """Rows of the H200 benchmark's code path on CPU (tiny configs), by method."""
    pytest.importorskip("transformers")
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import lm_fisher_scale

    args = ["--quick", "--only", only, "--seq-len", str(seq_len), "--batch", "2", "--repeats", "1"]
    assert lm_fisher_scale.main([*args, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "lm_fisher_scale_quick.json").read_text())
    assert "| gpt2-small" in (tmp_path / "lm_fisher_scale_quick.md").read_text()
    return {r["method"]: r for r in report["rows"]}


def test_scale_benchmark_writes_its_rows(tmp_path: Path) -> None:
    """One model, a step and token-level `sample`."""
    rows = _scale_benchmark(tmp_path, "small:sample", 8)
    assert set(rows) == {"train-step", "sample"}
    fields = {"model", "params", "dtype", "seq_len", "method", "granularity", "seconds"}
    for r in rows.values():
        assert fields | {"ratio_to_step", "peak_mib"} <= set(r) and "gpt2-small" in r["model"]
        assert r["seconds"] > 0 and r["seq_len"] == 8
    assert rows["sample"]["granularity"] == "token"
    assert (
        rows["sample"]["ratio_to_step"] == rows["sample"]["seconds"] / rows["train-step"]["seconds"]
    )


def test_scale_benchmark_sets_the_position_route_against_its_floor(tmp_path: Path) -> None:
    """The per-position row against T backwards of the batch (its arithmetic)."""
    rows = _scale_benchmark(tmp_path, "small:backward,small:empirical-token", 6)
    assert set(rows) == {"train-step", "backward", "empirical"}
    b = rows["backward"]["seconds"]
    assert b > 0 and rows["backward"]["ratio_to_step"] == b / rows["train-step"]["seconds"]
    report = json.loads((tmp_path / "lm_fisher_scale_quick.json").read_text())
    cut, uncut = [r for r in report["rows"] if r["method"] == "empirical"]  # the row order
    for e in (cut, uncut):
        floor = f"floor 6 x backward = {6 * b:.1f} s, {e['seconds'] / (6 * b):.2f}x of it"
        assert floor in e["note"]
    assert "runs the causal cut" in cut["note"] and "causal=False" in uncut["note"]


def test_host_profile_benchmark_writes_its_rows(tmp_path: Path) -> None:
    """The host/device profile of the single-backward LM passes: every row, its counts."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import lm_host_profile

    args = ["--quick", "--batch", "2", "--seq-len", "8", "--repeats", "1", "--top", "3"]
    assert lm_host_profile.main([*args, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "lm_host_profile_quick.json").read_text())
    assert set(report["rows"]) == set(lm_host_profile.ROWS)
    for r in report["rows"].values():
        assert r["wall_ms_min"] > 0 and r["host_ms"] > 0 and r["casts"] >= 0
        assert len(r["top_cpu_ops"]) == 3 and r["top_cpu_ops"][0]["calls"] >= 1
    text = (tmp_path / "lm_host_profile_quick.md").read_text()
    assert "| sample-token |" in text and "Top ops by self CPU time, sample-sequence" in text
