"""The Fisher's other users: merging, FISH masks and pruning, Task2Vec (with the Squisher)."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from lightning_fisher import FisherDiagonal, FisherInputError
from lightning_fisher.masks import MaskedUpdate, random_mask, top_k_mask

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*number of training batches.*")


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def rand_fisher(model: nn.Module, seed: int) -> FisherDiagonal:
    g = torch.Generator().manual_seed(seed)
    return FisherDiagonal(
        {k: torch.rand(p.shape, generator=g) for k, p in model.named_parameters()}, 10, "exact"
    )


# Merging ------------------------------------------------------------------------------------
def test_merge_equals_hand_computed_weighted_average_with_floor() -> None:
    a, b, c = tiny(0), tiny(1), tiny(2)
    fa, fb, fc = rand_fisher(a, 10), rand_fisher(b, 11), rand_fisher(c, 12)
    # entries below the floor in one model, and one entry where every Fisher is 0
    fa["0.weight"][0, 0] = 0.0
    for f in (fa, fb, fc):
        f["3.bias"][1] = 0.0
    eps, w = 0.05, [1.0, 2.0, 0.5]
    out = lf.fisher_merge([a, b, c], [fa, fb, fc], weights=w, epsilon=eps)
    for name, _ in a.named_parameters():
        thetas = [dict(m.named_parameters())[name].detach().double() for m in (a, b, c)]
        fs = [f[name].double().clamp_min(eps) * wi for f, wi in zip((fa, fb, fc), w)]
        want = sum(f * t for f, t in zip(fs, thetas)) / sum(fs)
        torch.testing.assert_close(out[name].double(), want, rtol=1e-6, atol=1e-7)
    # the all-zero entry: every Fisher is floored to eps, so the weighted plain average
    thetas = [m[3].bias[1].item() for m in (a, b, c)]
    plain = sum(wi * t for wi, t in zip(w, thetas)) / sum(w)
    assert out["3.bias"][1].item() == pytest.approx(plain, rel=1e-6)
    # BatchNorm's running mean: the weighted plain average; integer counters from model 0
    rm = sum(wi * m[1].running_mean for wi, m in zip(w, (a, b, c))) / sum(w)
    torch.testing.assert_close(out["1.running_mean"], rm)


def test_merge_without_floor_falls_back_to_plain_average_where_all_fishers_are_zero() -> None:
    a, b = tiny(0), tiny(1)
    fa, fb = rand_fisher(a, 1), rand_fisher(b, 2)
    fa["0.bias"].zero_()
    fb["0.bias"].zero_()
    out = lf.fisher_merge([a, b], [fa, fb], epsilon=0.0)
    torch.testing.assert_close(out["0.bias"], (a[0].bias + b[0].bias).detach() / 2)
    assert torch.isfinite(out["0.weight"]).all()


def test_equal_fishers_give_the_plain_average_and_normalisation_undoes_scale() -> None:
    a, b = tiny(0), tiny(1)
    f = rand_fisher(a, 3)
    out = lf.fisher_merge([a, b], [f, f])
    for name, p in a.named_parameters():
        want = (p + dict(b.named_parameters())[name]).detach() / 2
        torch.testing.assert_close(out[name], want)
    # the Squisher's scale (B x exp_avg_sq) cancels with normalisation
    fb = rand_fisher(b, 4)
    ref = lf.fisher_merge([a, b], [f, fb], normalize="l2")
    scaled = lf.fisher_merge([a, b], [f * 1e4, fb * 3.0], normalize="l2")
    unnormalised = lf.fisher_merge([a, b], [f * 1e4, fb * 3.0])
    for name, _ in a.named_parameters():
        torch.testing.assert_close(scaled[name], ref[name])
    assert not torch.allclose(unnormalised["0.weight"], ref["0.weight"])


def test_merge_into_a_module_in_place_with_a_subset() -> None:
    a, b, target = tiny(0), tiny(1), tiny(5)
    fa, fb = rand_fisher(a, 1), rand_fisher(b, 2)
    head_before = target[3].weight.detach().clone()
    body = ["0.weight", "0.bias"]
    out = lf.fisher_merge([a, b], [fa, fb], names=body, into=target, average_buffers=False)
    assert out["0.weight"] is target[0].weight
    want = (fa["0.weight"] * a[0].weight + fb["0.weight"] * b[0].weight) / (
        fa["0.weight"] + fb["0.weight"]
    )
    torch.testing.assert_close(target[0].weight.detach(), want.detach())
    assert torch.equal(target[3].weight, head_before)


def test_merge_accepts_the_squisher() -> None:
    models, fishers = [], []
    for seed in (0, 1):
        m = tiny(seed)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        models.append(m)
        fishers.append(lf.fisher_from_optimizer(opt, m, batch_size=16))
    out = lf.fisher_merge(models, fishers, normalize="mean")
    f0, f1 = (f["3.weight"].clamp_min(1e-8 * 0) for f in fishers)
    c0, c1 = (f.flatten().double().mean() for f in fishers)
    w0, w1 = (f0.double() / c0).clamp_min(1e-8), (f1.double() / c1).clamp_min(1e-8)
    want = (w0 * models[0][3].weight.double() + w1 * models[1][3].weight.double()) / (w0 + w1)
    torch.testing.assert_close(out["3.weight"], want.float().detach())


def test_merge_refuses_mismatches() -> None:
    a, b = tiny(0), tiny(1)
    fa, fb = rand_fisher(a, 1), rand_fisher(b, 2)
    with pytest.raises(FisherInputError, match="one Fisher per model"):
        lf.fisher_merge([a, b], [fa])
    other = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(FisherInputError, match="shape"):
        lf.fisher_merge([a, other], [fa, fa])
    with pytest.raises(FisherInputError, match="different parameters"):
        lf.fisher_merge([a, b], [fa, {"0.weight": fb["0.weight"]}])
    with pytest.raises(FisherInputError, match="no parameter"):
        lf.fisher_merge([a, {"0.bias": b[0].bias}], [fa, fb])
    with pytest.raises(FisherInputError, match="negative"):
        lf.fisher_merge([a, b], [fa, fb * -1.0])
    with pytest.raises(FisherInputError, match="normalize"):
        lf.fisher_merge([a, b], [fa, fb], normalize="max")  # type: ignore[arg-type]
    with pytest.raises(FisherInputError, match="weights"):
        lf.fisher_merge([a, b], [fa, fb], weights=[0.0, 0.0])


# Masks --------------------------------------------------------------------------------------
def test_fish_mask_keeps_the_exact_fraction_global_and_per_layer() -> None:
    g = torch.Generator().manual_seed(0)
    fisher = {"a": torch.rand(10, 10, generator=g), "b": torch.rand(30, generator=g) * 10}
    glob = lf.fish_mask(fisher, 0.2)
    assert sum(int(m.sum()) for m in glob.values()) == 26  # round(0.2 * 130)
    # global: every kept entry beats every dropped one
    kept = torch.cat([fisher[k][glob[k]] for k in fisher])
    dropped = torch.cat([fisher[k][~glob[k]] for k in fisher])
    assert kept.min() > dropped.max()
    assert int(glob["b"].sum()) > int(glob["a"].sum())  # "b" is 10x larger
    per = lf.fish_mask(fisher, 0.2, per_layer=True)
    assert int(per["a"].sum()) == 20 and int(per["b"].sum()) == 6
    for k in fisher:
        assert fisher[k][per[k]].min() > fisher[k][~per[k]].max()


def test_fish_mask_breaks_ties_toward_the_lower_index() -> None:
    values = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    assert top_k_mask(values, 3).tolist() == [False, True, True, True, False, False]
    fisher = {"x": torch.ones(4), "y": torch.ones(4)}
    mask = lf.fish_mask(fisher, 0.5)
    assert mask["x"].all() and not mask["y"].any()
    rand = random_mask(fisher, 0.25, generator=torch.Generator().manual_seed(0))
    assert int(rand["x"].sum() + rand["y"].sum()) == 2
    assert all(int(m.sum()) == 1 for m in random_mask(fisher, 0.25, per_layer=True).values())


def test_fish_mask_refuses_bad_input() -> None:
    with pytest.raises(FisherInputError, match="fraction"):
        lf.fish_mask({"a": torch.ones(3)}, 1.5)
    with pytest.raises(FisherInputError, match="NaN"):
        lf.fish_mask({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(FisherInputError, match="No entries"):
        lf.fish_mask({"a": torch.ones(3)}, 0.5, names=["b"])


def test_pruning_scores_and_prune_compatibility() -> None:
    model = tiny(0)
    fisher = rand_fisher(model, 7)
    names = ["0.weight", "3.weight"]
    scores = lf.fisher_pruning_scores(model, fisher, names=names)
    torch.testing.assert_close(
        scores["0.weight"], 0.5 * model[0].weight.detach() ** 2 * fisher["0.weight"]
    )
    before = {n: dict(model.named_parameters())[n].detach().clone() for n in names}
    keep = lf.fisher_prune(model, scores, 0.5)
    n_total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in keep.values()) == n_total - round(0.5 * n_total)
    # torch.nn.utils.prune's layout: weight_orig parameter, weight_mask buffer, masked weight
    assert prune.is_pruned(model)
    assert torch.equal(model[0].weight_mask.bool(), keep["0.weight"])
    assert torch.equal(model[0].weight, before["0.weight"] * keep["0.weight"])
    kept = torch.cat([scores[k][keep[k]] for k in names])
    dropped = torch.cat([scores[k][~keep[k]] for k in names])
    assert kept.min() >= dropped.max()
    # pruning again combines with the existing mask; prune.remove makes it permanent
    prune.l1_unstructured(model[3], "weight", amount=0.25)
    assert int(model[3].weight_mask.sum()) <= int(keep["3.weight"].sum())
    prune.remove(model[0], "weight")
    assert isinstance(model[0].weight, nn.Parameter)
    assert int((model[0].weight == 0).sum()) >= int((~keep["0.weight"]).sum())
    with pytest.raises(FisherInputError, match="shape"):
        lf.fisher_pruning_scores(model, {"3.bias": torch.ones(5)})


# FishMask callback --------------------------------------------------------------------------
class Net(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)


def loader() -> DataLoader[tuple[Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16)


def trainer(tmp_path: Any, steps: int, **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kw,
    )


def _masks(model: Net) -> dict[str, Tensor]:
    fisher = {
        k: torch.rand(p.shape, generator=torch.Generator().manual_seed(1))
        for k, p in model.named_parameters()
        if k != "net.2.bias"  # unmasked: trains freely
    }
    return lf.fish_mask(fisher, 0.1)


def test_fish_mask_callback_freezes_masked_entries_bitwise_under_adamw(tmp_path: Any) -> None:
    model = Net()
    masks = _masks(model)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    cb = lf.FishMask(masks)
    trainer(tmp_path, 12, enable_checkpointing=False, callbacks=[cb]).fit(model, loader())
    opt_state = model.trainer.optimizers[0].state
    assert int(masks["net.0.weight"].sum()) > 0
    for k, p in model.named_parameters():
        if k in masks:
            m = masks[k]
            assert torch.equal(p.detach()[~m], before[k][~m]), k  # bitwise
            if m.any():  # the kept entries trained
                assert (p.detach()[m] != before[k][m]).all(), k
            assert (opt_state[p]["exp_avg"][~m] == 0).all()
            assert (opt_state[p]["exp_avg_sq"][~m] == 0).all()
        else:
            assert not torch.equal(p.detach(), before[k])
    assert cb.trainable_fraction == pytest.approx(
        sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    )
    # without the callback AdamW's weight decay alone moves every entry
    free = Net()
    trainer(tmp_path, 2, enable_checkpointing=False).fit(free, loader())
    assert (free.net[0].weight != before["net.0.weight"]).all()


def test_fish_mask_from_a_fisher_and_bad_input(tmp_path: Any) -> None:
    model = Net()
    fisher = rand_fisher(model, 3)
    cb = lf.FishMask(fisher=fisher, keep=0.05, per_layer=True)
    assert int(cb.masks["net.0.weight"].sum()) == round(0.05 * 96)
    with pytest.raises(FisherInputError, match="exactly one"):
        lf.FishMask()
    with pytest.raises(FisherInputError, match="keep"):
        lf.FishMask(fisher=fisher)
    with pytest.raises(FisherInputError, match="bool"):
        lf.FishMask({"net.0.weight": torch.ones(16, 6)})
    bad = lf.FishMask({"net.0.weight": torch.ones(6, 16, dtype=torch.bool)})
    with pytest.raises(FisherInputError, match="shape"):
        trainer(tmp_path, 1, enable_checkpointing=False, callbacks=[bad]).fit(Net(), loader())
    with pytest.raises(FisherInputError, match="snapshot"):
        MaskedUpdate({}).after_step(model, [])


def test_fish_mask_checkpoint_round_trip(tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Net()
    masks = _masks(model)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True, every_n_train_steps=4)
    trainer(tmp_path, 4, callbacks=[lf.FishMask(masks), ckpt]).fit(model, loader())
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("FishMask"))
    for k, m in masks.items():
        assert torch.equal(state["masks"][k], m)
    # resume in a new Trainer with a callback built from another mask: the checkpoint's wins
    other = {k: ~m for k, m in masks.items()}
    cb = lf.FishMask(other)
    resumed = Net(seed=9)
    trainer(tmp_path, 10, callbacks=[cb]).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "ck" / "last.ckpt")
    )
    assert resumed.trainer.global_step == 10
    for k, p in resumed.named_parameters():
        if k in masks:
            assert torch.equal(cb.masks[k].cpu(), masks[k])
            assert torch.equal(p.detach()[~masks[k]], before[k][~masks[k]]), k


# Task2Vec -----------------------------------------------------------------------------------
def test_task_embedding_averages_filters_and_normalises() -> None:
    fisher = {
        "conv.weight": torch.arange(24.0).reshape(2, 3, 2, 2),
        "conv.bias": torch.tensor([1.0, 3.0]),
    }
    e = lf.task_embedding(fisher, normalize=None)
    torch.testing.assert_close(e, torch.tensor([5.5, 17.5, 1.0, 3.0], dtype=torch.float64))
    s = lf.task_embedding(fisher)
    assert s.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(s, e / e.sum())
    assert lf.task_embedding(fisher, per_filter=False).numel() == 26
    with pytest.raises(FisherInputError, match="negative"):
        lf.task_embedding({"w": torch.tensor([-1.0, 1.0])})


def test_task2vec_distance_properties() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(50, generator=g) + 0.01 for _ in range(3))
    assert lf.task2vec_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    assert lf.task2vec_distance(a, 7.0 * a) == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert lf.task2vec_distance(a, b) == pytest.approx(lf.task2vec_distance(b, a))
    for x, y in ((a, b), (a, c), (b, c)):
        assert 0.0 < lf.task2vec_distance(x, y) <= 1.0
    # hand-computed: u = a/(a+b), v = b/(a+b), 1 - cos(u, v)
    a64, b64 = a.double(), b.double()
    u, v = a64 / (a64 + b64), b64 / (a64 + b64)
    want = 1 - float(u @ v / (u.norm() * v.norm()))
    assert lf.task2vec_distance(a, b) == pytest.approx(want, rel=1e-9)
    # disjoint supports are as far apart as it gets
    assert lf.task2vec_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 1.0
    # a task near a is closer to a than an unrelated one
    near = a * (1 + 0.05 * torch.rand(50, generator=g))
    assert lf.task2vec_distance(a, near) < lf.task2vec_distance(a, b)
    with pytest.raises(FisherInputError, match="one shape"):
        lf.task2vec_distance(a, a[:3])


def test_benchmark_report_aggregates_seeds_and_compares_with_the_paper() -> None:
    from benchmarks.squisher_applications import _row, aggregate, verdicts

    raw = []
    for seed, (f, s, b) in enumerate(((80.0, 84.0, 70.0), (82.0, 86.0, 72.0))):
        raw += [
            _row("merging", "x", "FISHER", "mean_acc", seed, f),
            _row("merging", "x", "SQUISHER", "mean_acc", seed, s),
            _row("merging", "x", "BASELINE", "mean_acc", seed, b),
            _row("pruning", "p", "FISHER", "acc_finetuned", seed, f),
            _row("pruning", "p", "SQUISHER", "acc_finetuned", seed, s),
            _row("pruning", "p", "BASELINE", "acc_finetuned", seed, b),
        ]
    rows = aggregate(raw)
    fisher = next(r for r in rows if r["application"] == "merging" and r["method"] == "FISHER")
    assert fisher["value"] == 81.0 and fisher["n_seeds"] == 2
    assert fisher["sem"] == pytest.approx(1.0)  # stdev sqrt(2) over sqrt(2) seeds
    said = verdicts(rows)
    assert "beats" in said["merging"] and "the paper's ordering" in said["merging"]
    assert "the opposite of the paper" in said["pruning"]
    assert "fish_mask" not in said  # nothing measured, nothing claimed
