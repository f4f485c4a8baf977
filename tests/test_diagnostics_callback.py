"""FisherDiagnostics in short fits: what each logger receives, and that the logged values are right."""

from __future__ import annotations

import csv
import json
import struct
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from test_diagnostics import assert_png
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_fisher as lf
from lightning_fisher.callbacks.diagnostics import CSV_FIGURE_DIR

#: Names every evaluation logs for the tiny model below (layers ``net.0`` and ``net.2``).
EXPECTED = [
    f"fisher/{m}/trace{layer}"
    for m in ("hutchinson", "hutchinson_upper", "hutchinson_lower", "empirical")
    for layer in ("", "/net.0", "/net.2")
] + [
    "fisher/bounds/lower_over_f",
    "fisher/bounds/f_over_upper",
    "fisher/kernel/lambda_max",
    "fisher/kernel/trace",
    "fisher/kernel/one_minus_pmax",
    "fisher/kernel/lower_over_lambda_max",
    "fisher/kernel/lambda_max_over_upper",
    "fisher/frac_below/net.0",
    "fisher/frac_below/net.2",
    "fisher/hutchinson/cv",
    "fisher/empirical/rel_gap",
]


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loaders() -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=gen), torch.randint(0, 4, (96,), generator=gen)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    return train, val


def fit(
    logger: Any,
    callback: lf.FisherDiagnostics,
    epochs: int = 2,
    val: bool = True,
    ckpt_path: Path | None = None,
    **kwargs: Any,
) -> tuple[L.Trainer, Tiny]:
    torch.manual_seed(0)
    model = Tiny()
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        **kwargs,
    )
    train, val_loader = loaders()
    trainer.fit(model, train, val_loader if val else None, ckpt_path=ckpt_path)
    return trainer, model


def callback(**kwargs: Any) -> lf.FisherDiagnostics:
    """Hutchinson bounds (the tiny model's 4 classes would get the deterministic ones)."""
    kwargs.setdefault("deterministic_bounds_max_classes", 0)
    return lf.FisherDiagnostics(max_batches=2, probes=3, seed=5, **kwargs)


def test_csv_logger_values_are_right_and_figures_are_pngs(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    cb = callback()
    trainer, model = fit(logger, cb)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fisher/hutchinson/trace")]
    assert len(rows) == 2 and set(EXPECTED) <= set(rows[0])
    last = {k: float(v) for k, v in rows[-1].items() if v != ""}
    assert last["step"] == trainer.global_step

    # The last evaluation saw the final weights: the logged traces are estimate_fisher's, same seeds.
    _, val = loaders()
    for method in ("hutchinson", "hutchinson_upper", "hutchinson_lower"):
        runs = [
            lf.estimate_fisher(model, val, method, probes=1, seed=5 + i, max_batches=2)
            for i in range(3)
        ]
        assert last[f"fisher/{method}/trace"] == pytest.approx(
            sum(r.trace() for r in runs) / 3, rel=1e-5
        )
        layer = runs[0].layer_traces()["net.0"]
        assert (
            last[f"fisher/{method}/trace/net.0"]
            == pytest.approx(sum(r.layer_traces()["net.0"] for r in runs) / 3, rel=1e-5)
            and layer > 0
        )
    emp = lf.estimate_fisher(model, val, "empirical", max_batches=2)
    assert last["fisher/empirical/trace"] == pytest.approx(emp.trace(), rel=1e-5)
    for row in rows:
        lower, f, upper = (
            float(row[f"fisher/{m}/trace"])
            for m in ("hutchinson_lower", "hutchinson", "hutchinson_upper")
        )
        assert lower <= f <= upper
        assert 0 < float(row["fisher/bounds/lower_over_f"]) <= 1
        assert 0 < float(row["fisher/bounds/f_over_upper"]) <= 1

    figures = Path(logger.log_dir) / CSV_FIGURE_DIR
    names = sorted(p.name for p in figures.iterdir())
    # By default figures are drawn once, at the end of training (last evaluation: step 8).
    assert names == ["bounds.png", "layer_density_step000008.png"]
    for p in figures.iterdir():
        assert_png(p.read_bytes())
    assert [h["step"] for h in cb.history] == [4.0, 8.0]


def test_tensorboard_scalars_histograms_and_figures(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    fit(logger, callback(figure_every_n=1))
    acc = EventAccumulator(
        logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert set(EXPECTED) <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("fisher/hutchinson/trace")] == [4, 8]
    assert {"fisher/log10_diag/net.0", "fisher/log10_diag/net.2"} <= set(tags["histograms"])
    hist = acc.Histograms("fisher/log10_diag/net.0")[-1].histogram_value
    assert hist.num == 6 * 8 + 8  # every positive entry of the layer's weight and bias
    assert {"fisher/layer_density", "fisher/bounds"} <= set(tags["images"])
    images = acc.Images("fisher/layer_density")
    assert [e.step for e in images] == [4, 8]
    assert_png(images[-1].encoded_image_string)


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B transaction log (LevelDB log format: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _wandb_history(path: Path, evaluations: int, timeout: float = 60.0) -> dict[str, list[Any]]:
    """Every history key of the run with its values, once all evaluations are in the file: W&B's
    service process writes the file asynchronously, so it may lag behind ``wandb.finish()``."""
    deadline = time.monotonic() + timeout
    while True:
        history: dict[str, list[Any]] = {}
        try:
            for rec in _wandb_records(path):
                if rec.WhichOneof("record_type") == "history":
                    for item in rec.history.item:
                        key = item.key or "/".join(item.nested_key)
                        history.setdefault(key, []).append(json.loads(item.value_json))
        except Exception:  # a record still being written
            history = {}
        done = len(history.get("fisher/hutchinson/trace", [])) >= evaluations
        if done or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def test_wandb_offline_run_has_scalars_histograms_images_and_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cb = callback()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(WandbLogger(save_dir=str(tmp_path), offline=True, project="lf-test"), cb)
    finally:
        wandb.finish()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    history = _wandb_history(next(run.glob("run-*.wandb")), len(cb.history))
    assert set(EXPECTED) <= set(history)
    assert history["fisher/hutchinson/trace"] == [h["hutchinson/trace"] for h in cb.history]
    assert history["fisher/log10_diag/net.0/_type"][0] == "histogram"
    assert history["fisher/layer_density/_type"][0] == "images/separated"
    images = list((run / "files" / "media" / "images").rglob("*.png"))
    assert {p.name.split("_")[0] for p in images} >= {"layer", "bounds"}
    for p in images:
        assert_png(p.read_bytes())
    (table, *_) = sorted((run / "files" / "media" / "table").rglob("*.table.json"))
    content = json.loads(table.read_text())
    assert [row[0] for row in content["data"]] == ["net.0", "net.2"]
    assert "trace/hutchinson" in content["columns"]


class Recorder(Logger):
    """A logger of another kind: it only has log_metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))


def test_other_logger_gets_scalars_and_no_logger_warns_once(tmp_path: Path) -> None:
    rec = Recorder()
    fit(rec, callback())
    logged = [m for _, m in rec.metrics if "fisher/hutchinson/trace" in m]
    assert len(logged) == 2 and set(EXPECTED) <= set(logged[0])

    cb = callback()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(False, cb, epochs=3)
    assert sum("no logger" in str(w.message) for w in caught) == 1
    assert len(cb.history) == 3 and cb.last is not None
    assert cb.last.values["hutchinson/trace"] == cb.history[-1]["hutchinson/trace"]
    assert set(cb.figures()) == {"layer_density", "bounds"}


def test_step_schedule_without_duplicates_and_loader_choice() -> None:
    cb = callback(every_n_epochs=None, every_n_steps=3)
    fit(False, cb)
    assert [h["step"] for h in cb.history] == [3.0, 6.0]
    both = callback(every_n_epochs=1, every_n_steps=4)  # epoch ends fall on steps 4 and 8 too
    fit(False, both)
    assert [h["step"] for h in both.history] == [4.0, 8.0]

    train, _ = loaders()
    explicit = callback(dataloader=train)
    fit(False, explicit, epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = callback()
        fit(False, fallback, epochs=1, val=False)  # no validation loader: the training one is used
    assert any("no validation dataloader" in str(w.message) for w in caught)
    assert fallback.history[-1]["hutchinson/trace"] == explicit.history[-1]["hutchinson/trace"]


def test_history_survives_a_checkpoint(tmp_path: Path) -> None:
    cb = callback()
    trainer, _ = fit(False, cb)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    restored = callback()
    fit(False, restored, epochs=3, ckpt_path=tmp_path / "a.ckpt")
    assert restored.history[:2] == cb.history
    assert [h["step"] for h in restored.history] == [4.0, 8.0, 12.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": None, "every_n_steps": None}, "every_n_epochs or every_n_steps"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"dataloader": "test"}, "'val', 'train'"),
        ({"probes": 0}, "probes"),
        ({"methods": ("exact", "nope")}, "nope"),
        ({"threshold": 0.0}, "threshold"),
        ({"rank": 0}, "rank"),
        ({"eigenvalues": -1}, "eigenvalues"),
        ({"deterministic_bounds_max_classes": -2}, "deterministic_bounds_max_classes"),
        ({"slq_iters": 0}, "slq_iters"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lf.FisherDiagnostics(**kwargs)


def test_deepspeed_is_refused_at_setup() -> None:
    # FSDP2 and FSDP1 are supported (tests/test_fsdp_diagnostics.py, tests/test_fsdp1_diagnostics.py)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(lf.FisherInputError, match=r"DeepSpeedStrategy.*ZeRO"):
        lf.FisherDiagnostics().setup(trainer, None, "fit")  # type: ignore[arg-type]


def test_deterministic_bounds_certificate_and_spectrum_by_default_classes(tmp_path: Path) -> None:
    """4 classes: exact, upper and lower with the certificate; with the spectrum options the top
    eigenvalues and the SLQ density are logged and drawn."""
    logger = CSVLogger(tmp_path)
    cb = lf.FisherDiagnostics(
        max_batches=2, seed=5, eigenvalues=2, spectral_density=True, slq_starts=2, slq_iters=8
    )
    _, model = fit(logger, cb)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fisher/exact/trace")]
    assert len(rows) == 2
    last = {k: float(v) for k, v in rows[-1].items() if v != ""}
    assert not any(k.startswith("fisher/hutchinson") for k in last)
    assert last["fisher/bounds/deterministic"] == 1.0 and last["fisher/n_classes"] == 4.0
    assert last["fisher/bounds/order_violations"] == 0.0
    assert last["fisher/lower/trace"] <= last["fisher/exact/trace"] <= last["fisher/upper/trace"]
    _, val = loaders()
    lower = lf.estimate_fisher(model, val, "lower", max_batches=2)
    assert lower.certificate is not None
    assert last["fisher/lower/trace"] == pytest.approx(lower.trace(), rel=1e-5)
    assert last["fisher/certificate/tail_eigen_mass"] == pytest.approx(
        lower.certificate["tail_eigen_mass"], rel=1e-6
    )
    top = lf.top_eigenvalues(model, val, k=2, max_batches=2, seed=5)
    for i in (1, 2):
        assert last[f"fisher/eig_{i}"] == pytest.approx(float(top.eigenvalues[i - 1]), rel=1e-6)
    assert last["fisher/eig_1"] >= last["fisher/eig_2"] > 0
    assert {"fisher/spectral_mean", "fisher/spectral_trace", "fisher/spectral_mass_below"} <= set(
        last
    )
    names = sorted(p.name for p in (Path(logger.log_dir) / CSV_FIGURE_DIR).iterdir())
    assert names == ["bounds.png", "layer_density_step000008.png", "spectrum_step000008.png"]
    assert set(cb.figures()) == {"layer_density", "bounds", "spectrum"}
