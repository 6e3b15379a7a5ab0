"""The hand-off to training: an evagraph-initialised model trained by Hugging Face's
``Trainer`` and TRL's ``SFTTrainer``, as a PEFT model (``to_peft``) and as the native adapted
model, for a few steps on CPU. The loss goes down, only the adapters move, and what is saved is
the adapter alone, which loads back onto an untouched base."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from test_text_data import save_tiny_llama

import evagraph

T = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

TEXTS = [
    "the cat sat on the mat and then it ran far",
    "a big dog was good and the small cat was bad",
] * 16


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "my-llama")


def adapted_llama(path: Path):
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModelForCausalLM.from_pretrained(path)
    batches = [dict(tok(TEXTS[i : i + 4], return_tensors="pt", padding=True)) for i in (0, 4, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, _ = evagraph.transform(model, batches, budget=4, progress=False)
    return tok, model, adapted


def arguments(cls, out: Path, **extra):
    return cls(
        str(out), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=10, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        seed=0, **extra,
    )  # fmt: skip


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def token_dataset(tok):
    data = datasets.Dataset.from_dict({"text": TEXTS})
    return data.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])


def test_trainer_trains_the_peft_model_and_saves_only_the_adapter(llama_dir, tmp_path):
    tok, base, adapted = adapted_llama(llama_dir)
    peft_model = evagraph.to_peft(adapted)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer = T.Trainer(
        model=peft_model,
        args=arguments(T.TrainingArguments, tmp_path / "run"),
        train_dataset=token_dataset(tok),
        data_collator=T.DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    first, *_, last = losses(trainer)
    assert last < first - 0.05, losses(trainer)
    for n, p in base.named_parameters():  # the base weights PEFT shares did not move
        assert torch.equal(p, before[n]), n

    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert not saved & {"model.safetensors", "pytorch_model.bin"}  # no copy of the base
    fresh = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    batch = dict(tok(TEXTS[:4], return_tensors="pt", padding=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, peft_model.eval()(**batch).logits)


def test_trainer_trains_the_native_model_and_save_peft_writes_the_adapter(llama_dir, tmp_path):
    tok, base, adapted = adapted_llama(llama_dir)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    trainer = T.Trainer(
        model=adapted,
        args=arguments(T.TrainingArguments, tmp_path / "run"),
        train_dataset=token_dataset(tok),
        data_collator=T.DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    first, *_, last = losses(trainer)
    assert last < first - 0.05, losses(trainer)
    assert trainable and all(".lora." in n for n in trainable)
    for n, p in adapted.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n

    evagraph.save_peft(adapted, tmp_path / "adapter")
    fresh = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    batch = dict(tok(TEXTS[:4], return_tensors="pt", padding=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted.eval()(**batch).logits)


def test_trl_sft_trainer_trains_the_peft_model(llama_dir, tmp_path):
    trl = pytest.importorskip("trl")
    tok, _, adapted = adapted_llama(llama_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(
            model=evagraph.to_peft(adapted),
            args=arguments(trl.SFTConfig, tmp_path / "sft"),
            train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
            processing_class=tok,
        )
        trainer.train()
    first, *_, last = losses(trainer)
    assert last < first - 0.05, losses(trainer)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
