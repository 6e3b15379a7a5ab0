"""Text calibration data (``evagraph.data.text_batches``, ``compile --data corpus.jsonl``):
each reader, truncation, padding and packing, sampling, errors, padding left out of the
statistics, bounded memory on a large file, and the CLI end to end.

A tiny word-level tokenizer is built locally (no network) and saved with a random-init
Llama into one Hugging Face directory."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from conftest import evagraph_cmd, exact_pca, quiet, subspace_similarity

import evagraph
from evagraph.data import open_data, text_batches
from evagraph.errors import ConfigError, DataError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("datasets_cache")

# fmt: off
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "and", "then", "it", "was",
         "good", "bad", "day", "night", "big", "small", "red"]
# fmt: on
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def make_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + ["user", "assistant"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )  # a BOS, as Llama's: left out of chat-template text, which writes its own
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
        unk_token="<unk>",
    )  # fmt: skip
    if chat:
        fast.chat_template = CHAT
    return fast


def save_tiny_llama(path: Path, hidden: int = 32) -> Path:
    """Save ``make_tokenizer()`` and a tiny random Llama (seed 0, ``hidden`` wide) into one
    Hugging Face directory, as ``compile MODEL_DIR`` reads it (also the README tests'
    ``./my-llama``)."""
    tok = make_tokenizer()
    tok.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def tok():
    return make_tokenizer()


def docs(n: int, seed: int = 0, lo: int = 2, hi: int = 12) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi))) for _ in range(n)]


def rows(batches, tok) -> list[list[int]]:
    """Every sample's tokens, padding left out."""
    out = []
    for b in batches:
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            out.append(ids[mask.bool()].tolist())
    return out


def encoded(texts, tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in texts]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- readers ------------------------------------------------------------------------------


def test_txt_documents_are_separated_by_blank_lines(tmp_path, tok):
    texts = docs(7)
    path = tmp_path / "corpus.txt"
    # lines within a document; runs of blank lines (and a whitespace-only one) separate them
    path.write_text("\n\n\n".join(t.replace(" on ", " on\n") for t in texts) + "\n  \n\n")
    batches = text_batches(path, tok, batch_size=3)
    assert len(batches) == 3 and len(list(batches)) == 3  # sized, and re-iterable
    assert rows(batches, tok) == encoded(texts, tok)  # a newline is whitespace to it


def test_txt_one_document_per_line(tmp_path, tok):
    texts = docs(5)
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(texts[:2]) + "\n\n" + "\n".join(texts[2:]) + "\n")
    batches = text_batches(path, tok, batch_size=2, one_per_line=True)
    assert len(batches) == 3
    assert rows(batches, tok) == encoded(texts, tok)  # the blank line is no document


def test_table_formats_read_the_text_column(tmp_path, tok):
    texts = docs(6)
    table = datasets.Dataset.from_dict({"id": list(range(6)), "body": texts})
    table.to_csv(str(tmp_path / "c.csv"), index=False)
    table.to_parquet(str(tmp_path / "c.parquet"))
    write_jsonl(tmp_path / "c.jsonl", [{"id": i, "body": t} for i, t in enumerate(texts)])
    (tmp_path / "c.json").write_text(json.dumps([{"body": t} for t in texts]))
    table.save_to_disk(str(tmp_path / "saved"))
    for name in ("c.csv", "c.parquet", "c.jsonl", "c.json", "saved"):
        got = rows(text_batches(tmp_path / name, tok, text_column="body", batch_size=4), tok)
        assert got == encoded(texts, tok), name
    got = rows(text_batches(table, tok, text_column="body", batch_size=4), tok)
    assert got == encoded(texts, tok)  # a datasets.Dataset


def test_jsonl_messages_are_rendered_with_the_chat_template(tmp_path, tok):
    chats = [
        [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on"}],
        [{"role": "user", "content": "a dog ran"}],
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in chats])
    got = rows(text_batches(path, tok, batch_size=8), tok)
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in chats]
    assert rendered[1] == "user a dog ran </s> "
    assert got == [tok(t, add_special_tokens=False)["input_ids"] for t in rendered]

    with pytest.raises(ConfigError, match="no chat template"):
        text_batches(path, make_tokenizer(chat=False))


# -- shapes, sampling ------------------------------------------------------------------------


def test_truncation_and_padding(tmp_path, tok):
    texts = ["the cat sat", "a " * 40, "dog"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    (b,) = text_batches(path, tok, max_length=8, batch_size=3)
    assert b["input_ids"].shape == (3, 8) and b["attention_mask"].tolist()[0] == [1] * 4 + [0] * 4
    assert b["input_ids"][0, 4:].eq(tok.pad_token_id).all()
    assert b["attention_mask"][1].all() and b["attention_mask"][2].sum() == 2  # <s> dog
    (b,) = text_batches(path, tok, max_length=100, batch_size=3)
    assert b["input_ids"].shape == (3, 41)  # padded to the batch's longest
    tok.pad_token = None  # no pad token: eos pads
    (b,) = text_batches(path, tok, max_length=8, batch_size=3)
    assert b["input_ids"][0, 4:].eq(tok.eos_token_id).all()


def test_pack_cuts_full_chunks_without_padding(tmp_path, tok):
    texts = docs(30, seed=1)
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    stream = [i for ids in encoded(texts, tok) for i in ids + [tok.eos_token_id]]
    batches = text_batches(path, tok, max_length=16, batch_size=4, pack=True)
    full = len(stream) // 16
    assert len(batches) == -(-full // 4)
    got = [b for b in batches]
    assert all(b["attention_mask"].all() and b["input_ids"].shape[1] == 16 for b in got)
    assert torch.cat([b["input_ids"] for b in got]).flatten().tolist() == stream[: full * 16]
    some = text_batches(path, tok, max_length=16, batch_size=4, pack=True, num_samples=6)
    assert len(some) == 2 and [len(b["input_ids"]) for b in some] == [4, 2]
    with pytest.raises(DataError, match="fewer than max_length"):
        len(text_batches(path, tok, max_length=10**6, pack=True))


def test_num_samples_and_a_seeded_shuffle(tmp_path, tok):
    texts = docs(40, seed=2)
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in texts])
    first = text_batches(path, tok, batch_size=4, num_samples=10)
    assert len(first) == 3 and rows(first, tok) == encoded(texts[:10], tok)

    def shuffled(seed):
        return rows(
            text_batches(path, tok, batch_size=4, num_samples=10, shuffle=True, seed=seed), tok
        )

    a, b, c = shuffled(0), shuffled(0), shuffled(1)
    assert a == b and a != c and a != encoded(texts[:10], tok)
    assert all(r in encoded(texts, tok) for r in a) and len(a) == 10


# -- errors ---------------------------------------------------------------------------------


def test_errors_are_one_line_and_name_the_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "cols.jsonl", [{"body": "the cat", "id": 1}])
    with pytest.raises(DataError, match="no column 'text'.*columns: body, id") as info:
        text_batches(path, tok)
    assert "cols.jsonl" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty.txt is an empty file"):
        text_batches(tmp_path / "empty.txt", tok)
    (tmp_path / "blank.txt").write_text("\n\n  \n\n")
    with pytest.raises(DataError, match="blank.txt holds no documents"):
        text_batches(tmp_path / "blank.txt", tok, one_per_line=True)
    (tmp_path / "notdata").mkdir()
    with pytest.raises(DataError, match="notdata is a directory but not a saved dataset"):
        text_batches(tmp_path / "notdata", tok)
    with pytest.raises(DataError, match="not found"):
        text_batches(tmp_path / "nope.jsonl", tok)


def test_open_data_dispatches_and_refuses_text_options_for_tensors(tmp_path, hf_dir):
    torch.save({"x": torch.randn(10, 4)}, tmp_path / "x.pt")
    assert len(open_data(tmp_path / "x.pt", 4)) == 3
    with pytest.raises(ConfigError, match="--max-length, --pack: not an option for a file"):
        open_data(tmp_path / "x.pt", 4, max_length=8, pack=True)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in docs(5)])
    with pytest.raises(ConfigError, match="--tokenizer"):
        open_data(path, 4)
    assert len(open_data(path, 4, default_tokenizer=hf_dir)) == 2


# -- padding is left out of the statistics ---------------------------------------------------


def test_padding_rows_are_left_out_of_the_statistics(tmp_path, hf_dir, tok):
    """The components of ``calibrate`` on padded text batches are the exact PCA of the layer
    inputs at the real tokens only."""
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    # very uneven lengths: most positions of a batch are padding
    texts = docs(48, seed=3, lo=1, hi=6) + docs(16, seed=4, lo=25, hi=30)
    random.Random(0).shuffle(texts)
    path = write_jsonl(tmp_path / "pad.jsonl", [{"text": t} for t in texts])
    batches = text_batches(path, tok, max_length=32, batch_size=8)
    layer = "model.layers.0.self_attn.q_proj"
    state = quiet(
        evagraph.calibrate, model, batches, budget=2, rho=2, statistic="exact",
        targets=[layer], progress=False,
    )  # fmt: skip
    group = state.layer_group[layer]

    seen, padded = [], []

    def hook(module, args):
        padded.append(args[0].reshape(-1, args[0].shape[-1]))
        seen.append(args[0][mask.bool()])

    handle = model.get_submodule(layer).register_forward_pre_hook(hook)
    used = [i for a, b in state.batches[group] for i in range(a, b)]
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if i in used:
                mask = batch["attention_mask"]
                model(**batch)
    handle.remove()
    real = torch.cat(seen)
    assert state.components[group].n_rows == len(real) < len(torch.cat(padded)) * 0.6
    k = 3
    ref, ratio = exact_pca(real, k)
    got = state.components[group]
    assert subspace_similarity(got.components[:k], ref) > 0.999
    torch.testing.assert_close(got.explained_variance_ratio[:k], ratio, rtol=1e-3, atol=1e-4)
    wrong, _ = exact_pca(torch.cat(padded), k)  # the test can tell: padding moves the PCA
    assert subspace_similarity(wrong, ref) < 0.99


# -- a large file, bounded memory ------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, threading, time
    sys.path.insert(0, sys.argv[3])
    from test_text_data import make_tokenizer
    from evagraph.data import text_batches

    def anon():  # resident anonymous memory, MB
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024

    tok = make_tokenizer()
    next(iter(text_batches(sys.argv[2], tok, batch_size=2)))  # imports done, code warm
    start = peak = anon()

    def poll():
        global peak
        while True:
            peak = max(peak, anon())
            time.sleep(0.002)

    threading.Thread(target=poll, daemon=True).start()
    batches = text_batches(sys.argv[1], tok, max_length=64, batch_size=4)
    it = iter(batches)
    for _ in range(3):
        b = next(it)
    assert b["input_ids"].shape == (4, 64), b["input_ids"].shape
    time.sleep(0.05)
    print(len(batches), peak - start)
    """
)


@pytest.mark.slow
def test_a_large_text_file_is_read_with_bounded_memory(tmp_path):
    """A ~200 MB .txt of which three batches are consumed: the memory the reading takes stays
    far below the file's size. Measured as the peak resident *anonymous* memory of a child
    process (polled), not ``ru_maxrss``: the Arrow copy is memory-mapped, and the mapped file
    pages that a pass over it leaves resident count in RSS though they are page cache that
    the kernel drops at will, not memory the reader holds."""
    path = tmp_path / "big.txt"
    r = random.Random(0)
    para = "\n".join(" ".join(r.choice(WORDS) for _ in range(12)) for _ in range(40)) + "\n\n"
    with path.open("w") as f:
        for _ in range(200_000_000 // len(para)):
            f.write(para)
    size_mb = path.stat().st_size / 2**20
    small = tmp_path / "small.txt"
    small.write_text("the cat\n\nthe dog\n")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(small), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, grew = proc.stdout.split()
    assert int(n) > 5000  # batches: every document counted, though only three were tokenized
    assert float(grew) < size_mb / 4, f"grew {grew} MB reading a {size_mb:.0f} MB file"


# -- the command line ------------------------------------------------------------------------


def test_cli_compiles_a_model_directory_on_a_jsonl_corpus(tmp_path, hf_dir):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in docs(40, lo=5, hi=40)])
    out = tmp_path / "out"
    cmd = [*evagraph_cmd(), "compile", str(hf_dir), "--data", str(corpus), "--max-length", "32"]
    proc = subprocess.run(
        [*cmd, "--budget", "2", "--rho", "2", "-o", str(out), "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["batches"] and any(layer["rank"] for layer in report["layers"])
    assert (out / "adapter.safetensors").is_file()
