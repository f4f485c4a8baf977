"""Run one continual-learning experiment: tasks in sequence, EWC optional, metrics after each task.

``run_continual(config)`` is what the CLI (``python -m recipes.run``), the demo and the reproduction
grid call. Each task is one ``trainer.fit``; the same ``lf.EWC`` callback instance is passed to every
task's trainer, so it consolidates at the end of each fit and penalises drift on the next ones.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

import lightning_fisher as lf

from .data import (
    RandomBatches,
    Task,
    load_arrays,
    permuted_class_order,
    split_tasks,
    task_loader,
)
from .metrics import AccuracyMatrix, average_accuracy, backward_transfer, forgetting
from .models import MLP, ReducedResNet18
from .module import TaskIncrementalModule

#: Rows of the published table: name -> (estimator, its options). ``NONE`` trains without EWC.
TABLE_METHODS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "NONE": (None, {}),
    "EXACT": ("exact", {}),
    "EXACT(n=500)": ("exact", {"max_samples": 500}),
    "SAMPLE": ("sample", {}),
    "EMPIRICAL": ("empirical", {}),
    "BATCHED": ("batched", {}),
    "HUTCHINSON": ("hutchinson", {}),
    "SQUISHER": ("squisher", {}),
}
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class RecipeConfig:
    """Everything one run needs; the YAML files in ``recipes/configs`` set these fields."""

    dataset: str = "mnist"  # digits | mnist | cifar10
    data_dir: str | None = None  # folder holding mnist/ and cifar10/ (this project: ../shared/data)
    download: bool = False  # fetch the official copy with `datasets` when local files are missing
    cache_dir: str | None = None  # decoded CIFAR-10 cache (default ~/.cache/lightning_fisher)
    model: str = "mlp"  # mlp | resnet18
    hidden: list[int] = field(default_factory=lambda: [400, 400])  # MLP widths
    channels: list[int] = field(default_factory=lambda: [20, 20, 40, 80, 160])  # ResNet widths
    normalise: bool = False  # per-channel standardisation with the training set's statistics
    classes_per_task: int = 2
    # Which classes form each task: "sorted" (0-1, 2-3, ...), "permuted" (a random permutation
    # per seed, as van de Ven's code does for every seed but 0; see data.permuted_class_order),
    # or an explicit comma-separated order such as "4,6,0,5,3,9,2,7,8,1".
    class_order: str = "sorted"
    n_tasks: int | None = None  # first n tasks only (all if None)
    max_train_per_task: int | None = None  # subsample training data (quick runs, tests)
    method: str = "NONE"  # a row of TABLE_METHODS (EXACT, EXACT(n=500), ..., SQUISHER)
    lam: float = 0.0  # EWC strength lambda
    mode: str = "online"  # online | separate
    gamma: float = 1.0  # online EWC decay
    iters: int = 2000  # optimizer steps per task
    batch_size: int = 128
    fisher_batch_size: int = 256  # batch size of the Fisher pass (BATCHED: its mini-batch size)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    reset_optimizer: bool = True  # a fresh Adam per task; False carries its state across tasks
    seed: int = 0
    accelerator: str = "auto"  # auto | cpu | gpu
    precision: str = "32-true"
    logger: str = "none"  # none | csv | tensorboard (written under output_dir)
    output_dir: str = "outputs/run"

    def replace(self, **changes: Any) -> RecipeConfig:
        return dataclasses.replace(self, **changes)


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners (GPU available, tips, max_steps reached): a grid makes
    thousands of fits. Called by the command-line entry points, not by ``run_continual``."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*infer the `batch_size`.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def load_config(path: str | Path, **overrides: Any) -> RecipeConfig:
    """A ``RecipeConfig`` from a YAML file (a bare name like ``split_mnist`` looks in
    ``recipes/configs``), with keyword overrides applied on top."""
    import yaml

    p = Path(path)
    if not p.exists() and (CONFIG_DIR / f"{p.name}.yaml").exists():
        p = CONFIG_DIR / f"{p.name}.yaml"
    if not p.exists():
        known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"Config {path} not found; give a YAML path or one of: {known}.")
    values = yaml.safe_load(p.read_text()) or {}
    names = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{p}: unknown config keys {unknown}; valid keys are {sorted(names)}.")
    values.update(overrides)
    return RecipeConfig(**values)


def data_device(accelerator: str) -> torch.device:
    """Where to preload the tensors: the GPU when the trainer will use one."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def class_order(cfg: RecipeConfig, n_classes: int) -> list[int] | None:
    """The class order of the config for its seed (``None``: the natural order)."""
    spec = str(cfg.class_order).strip()
    if spec == "sorted":
        return None
    if spec == "permuted":
        return permuted_class_order(n_classes, cfg.seed)
    try:
        return [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"Unknown class_order {cfg.class_order!r}; give sorted, permuted or a comma-separated "
            f"order of the {n_classes} classes."
        ) from None


def build_tasks(cfg: RecipeConfig) -> list[Task]:
    """Load the data set and split it into tasks on the run's device."""
    arrays = load_arrays(cfg.dataset, cfg.data_dir, cfg.download, cfg.cache_dir)
    return split_tasks(
        arrays,
        cfg.classes_per_task,
        cfg.n_tasks,
        cfg.normalise,
        cfg.max_train_per_task,
        data_device(cfg.accelerator),
        class_order(cfg, int(arrays["train"].y.max()) + 1),
    )


def build_net(cfg: RecipeConfig, tasks: list[Task]) -> nn.Module:
    """The network of the config, with one output unit per class of the benchmark."""
    n_classes = max(max(t.classes) for t in tasks) + 1
    x = tasks[0].x_train
    if cfg.model == "mlp":
        return MLP(x[0].numel(), cfg.hidden, n_classes)
    if cfg.model == "resnet18":
        return ReducedResNet18(cfg.channels, n_classes, in_channels=x.shape[1])
    raise ValueError(f"Unknown model {cfg.model!r}; choose mlp or resnet18.")


def make_ewc(cfg: RecipeConfig, module: TaskIncrementalModule) -> Any:
    """The ``lf.EWC`` callback of the config's method, or ``None`` for ``NONE``."""
    if cfg.method not in TABLE_METHODS:
        raise ValueError(
            f"Unknown method {cfg.method!r}; choose one of {', '.join(TABLE_METHODS)}."
        )
    method, options = TABLE_METHODS[cfg.method]
    if method is None:
        return None
    return lf.EWC(
        lam=cfg.lam,
        method=method,
        mode=cfg.mode,
        gamma=cfg.gamma,
        # Only the finished task's output units count, as in the multi-head protocol.
        classes=lambda batch: module.active_classes,
        fisher_kwargs={"seed": cfg.seed},
        log_penalty=cfg.logger != "none",  # logging costs a reduction per step
        **options,
    )


def make_logger(cfg: RecipeConfig, task: int) -> Any:
    if cfg.logger == "none":
        return False
    if cfg.logger == "csv":
        return L.pytorch.loggers.CSVLogger(cfg.output_dir, name="logs", version=f"task{task}")
    if cfg.logger == "tensorboard":
        return L.pytorch.loggers.TensorBoardLogger(
            cfg.output_dir, name="logs", version=f"task{task}"
        )
    raise ValueError(f"Unknown logger {cfg.logger!r}; choose none, csv or tensorboard.")


def evaluate(
    module: TaskIncrementalModule, tasks: list[Task], after: int, acc: AccuracyMatrix
) -> None:
    """Accuracy on the test set of every task seen so far, each within its own head."""
    module.to(tasks[0].x_test.device)  # Lightning moves the module back to the CPU after fit
    for j, task in enumerate(tasks[: after + 1]):
        preds = module.task_predictions(task.x_test, task.classes)
        acc.update(after, j, preds.cpu(), task.y_test.cpu())


def run_continual(cfg: RecipeConfig, tasks: list[Task] | None = None) -> dict[str, Any]:
    """Train on the tasks in sequence and return the metrics.

    Returns a dict with ``matrix`` (R[i][j], percent), ``avg_acc``, ``forgetting``, ``bwt``
    (percent points), ``fisher_seconds`` (one entry per consolidation), ``train_seconds``, and the
    final ``ewc`` callback (``None`` without EWC) under ``callback`` and the trained
    ``TaskIncrementalModule`` under ``module``.
    """
    tasks = tasks if tasks is not None else build_tasks(cfg)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    module = TaskIncrementalModule(
        build_net(cfg, tasks), cfg.lr, (cfg.beta1, cfg.beta2), cfg.reset_optimizer
    )
    ewc = make_ewc(cfg, module)
    acc = AccuracyMatrix(len(tasks))
    fisher_seconds: list[float] = []
    train_seconds = 0.0
    for t, task in enumerate(tasks):
        module.active_classes = task.classes
        if ewc is not None:
            ewc.dataloader = task_loader(task.x_train, task.y_train, cfg.fisher_batch_size)
        trainer = L.Trainer(
            accelerator=cfg.accelerator,
            devices=1,
            precision=cfg.precision,  # type: ignore[arg-type]
            max_epochs=1,
            max_steps=cfg.iters,
            logger=make_logger(cfg, t),
            callbacks=[ewc] if ewc is not None else [],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        batches = RandomBatches(
            task.x_train, task.y_train, cfg.batch_size, cfg.iters, cfg.seed * 1000 + t
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=batches)
        train_seconds += time.perf_counter() - start
        if ewc is not None:
            fisher_seconds.append(ewc.fisher_seconds)  # the consolidation ran inside fit
        evaluate(module, tasks, t, acc)
    # torchmetrics squeezes a one-element result to a scalar: keep the T x T shape for T = 1 too.
    matrix = acc.compute().reshape(len(tasks), len(tasks)) * 100.0
    return {
        "matrix": matrix.tolist(),
        "avg_acc": float(average_accuracy(matrix)),
        "forgetting": float(forgetting(matrix)),
        "bwt": float(backward_transfer(matrix)),
        "fisher_seconds": fisher_seconds,
        "train_seconds": train_seconds - sum(fisher_seconds),
        "callback": ewc,
        "module": module,
    }
