"""The hand-off to training: an evagraph-initialised model trained by Hugging Face's
``Trainer`` and TRL's ``SFTTrainer``, as a PEFT model (``to_peft``) and as the native adapted
model, for a few steps on CPU, on a float base and (with bitsandbytes) on a 4-bit nf4 one. The
loss goes down, only the adapters move, and what is saved is the adapter alone, which loads
back onto an untouched base."""

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


def adapted_llama(path: Path, model=None):
    """The tokenizer, the base model (loaded from ``path`` unless given) and its adapted
    copy, calibrated on three batches of TEXTS."""
    tok = T.AutoTokenizer.from_pretrained(path)
    model = model if model is not None else T.AutoModelForCausalLM.from_pretrained(path)
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


def train_with_trainer(model, tok, out: Path):
    """Hugging Face's ``Trainer`` on the tokenized texts (causal LM), trained; the loss went
    down."""
    trainer = T.Trainer(
        model=model,
        args=arguments(T.TrainingArguments, out),
        train_dataset=token_dataset(tok),
        data_collator=T.DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    return assert_learned(trainer)


def train_with_sft(model, tok, out: Path):
    """TRL's ``SFTTrainer`` on the raw texts, trained; the loss went down."""
    trl = pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(
            model=model,
            args=arguments(trl.SFTConfig, out),
            train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
            processing_class=tok,
        )
        trainer.train()
    return assert_learned(trainer)


def assert_learned(trainer):
    first, *_, last = losses(trainer)
    assert last < first - 0.05, losses(trainer)
    return trainer


def assert_adapter_only(directory: Path) -> None:
    saved = {p.name for p in directory.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert not saved & {"model.safetensors", "pytorch_model.bin"}  # no copy of the base


@torch.no_grad()
def logits(model, tok) -> torch.Tensor:
    model.eval()
    batch = dict(tok(TEXTS[:4], return_tensors="pt", padding=True))
    # bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward in eval mode
    # without grad, which changes the outputs' rounding: compare after it.
    model(**batch)
    return model(**batch).logits


def test_trainer_trains_the_peft_model_and_saves_only_the_adapter(llama_dir, tmp_path):
    tok, base, adapted = adapted_llama(llama_dir)
    peft_model = evagraph.to_peft(adapted)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer = train_with_trainer(peft_model, tok, tmp_path / "run")
    for n, p in base.named_parameters():  # the base weights PEFT shares did not move
        assert torch.equal(p, before[n]), n

    trainer.save_model(str(tmp_path / "adapter"))
    assert_adapter_only(tmp_path / "adapter")
    fresh = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded, tok), logits(peft_model, tok))


def test_trainer_trains_the_native_model_and_save_peft_writes_the_adapter(llama_dir, tmp_path):
    tok, base, adapted = adapted_llama(llama_dir)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    train_with_trainer(adapted, tok, tmp_path / "run")
    assert trainable and all(".lora." in n for n in trainable)
    for n, p in adapted.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n

    evagraph.save_peft(adapted, tmp_path / "adapter")
    fresh = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded, tok), logits(adapted, tok))


def test_trl_sft_trainer_trains_the_peft_model(llama_dir, tmp_path):
    tok, _, adapted = adapted_llama(llama_dir)
    trainer = train_with_sft(evagraph.to_peft(adapted), tok, tmp_path / "sft")
    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved


@pytest.fixture(scope="module")
def llama64_dir(tmp_path_factory) -> Path:
    # 64 wide: bitsandbytes' CPU 4-bit kernel fails on 32-wide inputs
    return save_tiny_llama(tmp_path_factory.mktemp("llama64") / "my-llama", hidden=64)


def nf4_base(path: Path):
    bnb_config = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return T.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config)


def packed_weights(model) -> dict[str, torch.Tensor]:
    """Copies of the model's frozen weights as stored: 4-bit ones packed, with their scales."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            out[n] = torch.Tensor(p.data).clone()
            state = getattr(p, "quant_state", None)
            if state is not None:
                out[n + ".absmax"] = state.absmax.clone()
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trainer", "calibrated_on"), [("Trainer", "float"), ("SFTTrainer", "nf4")]
)
def test_trainers_train_on_a_4bit_base(llama64_dir, trainer, calibrated_on, tmp_path):
    """QLoRA: the adapters (calibrated on the float model, or on the nf4 one itself) on a base
    loaded in nf4 by bitsandbytes, trained as a PEFT model on CPU: the loss goes down, the
    packed base weights do not move, and the saved adapter loads onto a fresh nf4 base.
    Nothing runs the model in eval mode under no_grad before training: bitsandbytes would
    repack its 4-bit weights for a kernel without backward (README, "Quantized bases")."""
    pytest.importorskip("bitsandbytes")
    if calibrated_on == "float":
        tok, _, float_adapted = adapted_llama(llama64_dir)
        base = nf4_base(llama64_dir)
        evagraph.save_adapter(float_adapted, tmp_path / "eva")
        adapted = evagraph.apply_adapter(base, tmp_path / "eva")
    else:
        tok, base, adapted = adapted_llama(llama64_dir, nf4_base(llama64_dir))
    before = packed_weights(base)
    assert any(n.endswith(".absmax") for n in before)
    peft_model = evagraph.to_peft(adapted)
    train = train_with_trainer if trainer == "Trainer" else train_with_sft
    train(peft_model, tok, tmp_path / "run").save_model(str(tmp_path / "adapter"))
    after = packed_weights(base)
    for n, w in before.items():
        assert torch.equal(after[n], w), n

    assert_adapter_only(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(nf4_base(llama64_dir), str(tmp_path / "adapter"))
    trained, reloaded = lora_weights(peft_model), lora_weights(loaded)
    assert trained.keys() == reloaded.keys()
    for n, w in trained.items():
        assert torch.equal(reloaded[n].to(w.dtype), w), n
    # TRL casts the LoRA weights on a quantized base to bfloat16 (QLoRA's recipe) and PEFT
    # loads them back as float32: the same values, computed in another precision.
    expected = logits(peft_model, tok)
    tol = {} if trainer == "Trainer" else {"rtol": 0, "atol": 2e-2 * float(expected.abs().max())}
    torch.testing.assert_close(logits(loaded, tok), expected, **tol)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}
