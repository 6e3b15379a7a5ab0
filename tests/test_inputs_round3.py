"""Issue 28, round 3 of the adversarial review: what the user names on the command line.

No code from a tokenizer folder without --trust-remote-code (and no prompt on stdin); no input
deleted or changed by the output (--force); saved datasets that name files outside
themselves; settings that are not booleans; text that is not text; budgets and documents that
would hang or exhaust memory; and the one-line errors the review found missing (a config
naming a non-model class, one sample of data, a symlink loop as -o, --quiet, usage mistakes,
a malformed .jsonl, a file size limit hit by report.png).
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import time
from pathlib import Path

import datasets
import pytest
import torch
from conftest import SharedMLP, evagraph_cmd, quiet
from safetensors.torch import save_file
from test_text_data import WORDS, docs, make_tokenizer, write_jsonl

import evagraph
from evagraph.config import AdapterSettings, CalibrationSettings
from evagraph.data import load_tokenizer, text_batches
from evagraph.errors import ConfigError, DataError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("datasets_cache")


def run(*args: str, cwd: Path, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*evagraph_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def corpus(tmp_path: Path, n: int = 24) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in docs(n, lo=5, hi=30)])


# -- 1. code shipped with a tokenizer folder -----------------------------------------------


def evil_tokenizer(path: Path, marker: Path, *, in_tokenizer: bool = False) -> Path:
    """A tokenizer folder whose config names code of its own (auto_map) that creates
    ``marker`` when imported: through config.json (a model type transformers does not know,
    as the review's reproduction) or through tokenizer_config.json's AutoTokenizer."""
    make_tokenizer().save_pretrained(path)
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (path / "configuration_evil.py").write_text(
        code + "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n"
        "    model_type = 'evil'\n"
    )
    (path / "config.json").write_text(
        json.dumps(
            {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
        )
    )
    if in_tokenizer:
        (path / "tokenization_evil.py").write_text(
            code + "from transformers import PreTrainedTokenizerFast\n\n"
            "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        )
        config = json.loads((path / "tokenizer_config.json").read_text())
        config.pop("tokenizer_class", None)
        config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_tokenizer_code_does_not_run_even_if_yes_is_piped_in(tmp_path, hf_dir):
    marker = tmp_path / "MARKER"
    tok = evil_tokenizer(tmp_path / "evil_tok", marker)
    out = tmp_path / "out"
    proc = run(
        "compile", str(hf_dir), "--data", str(corpus(tmp_path)), "--tokenizer", str(tok),
        "--max-length", "16", "--budget", "2", "-o", str(out), "-q",
        cwd=tmp_path, input="y\ny\n",
    )  # fmt: skip
    assert not marker.exists(), proc.stderr
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr


def test_tokenizer_that_needs_its_code_is_refused_naming_the_flag(tmp_path):
    marker = tmp_path / "MARKER"
    tok = evil_tokenizer(tmp_path / "evil_tok", marker, in_tokenizer=True)
    with pytest.raises(ConfigError, match="--trust-remote-code"):
        load_tokenizer(tok)
    assert not marker.exists()
    # The flag does run it: the folder above is a real test of code running.
    load_tokenizer(tok, trust_remote_code=True)
    assert marker.exists()


# -- 4. the output never holds, or lies inside, an input -------------------------------------


def test_force_does_not_delete_the_model_it_compiles(tmp_path, example):
    folder = tmp_path / "d"
    folder.mkdir()
    model = folder / "m.pt2"
    model.write_bytes((example / "tiny_cnn.pt2").read_bytes())
    data = str(example / "calib.safetensors")
    proc = run("compile", str(model), "--data", data, "-o", str(folder), "--force", cwd=tmp_path)
    assert "contains MODEL" in one_line_error(proc)
    assert model.read_bytes() == (example / "tiny_cnn.pt2").read_bytes()
    # nor through a symlink to the folder, nor an OUTDIR inside --data's or MODEL's folder
    (tmp_path / "link").symlink_to(folder)
    proc = run("compile", str(model), "--data", data, "-o", "link", "--force", cwd=tmp_path)
    assert "contains MODEL" in one_line_error(proc)
    assert model.is_file()


@pytest.mark.parametrize("flag", ["--data", "--tokenizer", "MODEL"])
def test_outdir_inside_an_input_directory_is_refused(tmp_path, hf_dir, flag):
    text = corpus(tmp_path)
    data_dir = tmp_path / "ds"
    datasets.load_dataset("json", data_files=str(text), split="train").save_to_disk(data_dir)
    tok = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok)
    inside = {"--data": data_dir, "--tokenizer": tok, "MODEL": hf_dir}[flag] / "out"
    args = ["compile", str(hf_dir), "--data", str(data_dir), "--tokenizer", str(tok)]
    args += ["-o", str(inside), "--force"]
    before = sorted(p.name for p in inside.parent.iterdir())
    assert f"is inside {flag}" in one_line_error(run(*args, cwd=tmp_path))
    assert sorted(p.name for p in inside.parent.iterdir()) == before


# -- 8. a saved dataset names files outside its folder ---------------------------------------


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink", "split"])
def test_saved_dataset_may_not_read_outside_its_folder(tmp_path, how):
    elsewhere = tmp_path / "elsewhere"
    datasets.Dataset.from_dict({"text": ["secret words"]}).save_to_disk(elsewhere)
    arrow = next(elsewhere.glob("*.arrow"))
    ds = tmp_path / "ds"
    if how == "split":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
            ds
        )
        (ds / "dataset_dict.json").write_text(json.dumps({"splits": ["../elsewhere"]}))
    else:
        datasets.Dataset.from_dict({"text": ["a b"]}).save_to_disk(ds)
        state = json.loads((ds / "state.json").read_text())
        name = {"parent": "../elsewhere/" + arrow.name, "absolute": str(arrow)}.get(how, "l.arrow")
        if how == "symlink":
            (ds / "l.arrow").symlink_to(arrow)
        state["_data_files"] = [{"filename": name}]
        (ds / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match="is not inside the directory"):
        text_batches(ds, make_tokenizer())


# -- 9. settings must have their types; text must be text ------------------------------------


@pytest.mark.parametrize(
    "cls,setting",
    [
        (AdapterSettings, {"adjust_scaling_factors": "no"}),
        (AdapterSettings, {"whiten": "yes"}),
        (AdapterSettings, {"whiten": 2}),
        (CalibrationSettings, {"use_label_mask": None}),
    ],
)
def test_boolean_settings_must_be_booleans(cls, setting):
    with pytest.raises(ConfigError, match="must be True or False"):
        cls(**setting)
    with pytest.raises(ConfigError, match="must be True or False"):
        quiet(evagraph.transform, SharedMLP(), [torch.randn(8, 16)], progress=False, **setting)


def test_settings_hold_even_after_the_cli_read_them():
    import evagraph.cli  # noqa: F401  # builds its options from the settings' fields

    with pytest.raises(ConfigError, match="must be True or False"):
        AdapterSettings(whiten="yes")
    with pytest.raises(ConfigError, match="budget x rho must be finite"):
        AdapterSettings(rho=1e308)  # k = round(budget * rho) overflowed


@pytest.mark.parametrize(
    "name,content",
    [
        ("numbers.json", "[1, 2, 3]"),
        ("number.json", '{"text": 5}'),
        ("mixed.jsonl", '{"text": "a cat"}\n{"text": 7}\n'),
        ("numbers.csv", "text\n1\n2\n"),
    ],
)
def test_text_that_is_not_strings_is_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="not text"):
        text_batches(path, make_tokenizer())


# -- 10. no hang, no unbounded memory --------------------------------------------------------


def test_a_budget_beyond_every_layer_width_is_refused_at_once(tmp_path, example):
    start = time.monotonic()
    proc = run(
        "compile", str(example / "tiny_cnn.pt2"), "--data", str(example / "calib.safetensors"),
        "--budget", "1000000000", "-o", str(tmp_path / "o"), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert "budget 1000000000 is more than any target layer's rank can be" in one_line_error(proc)
    assert time.monotonic() - start < 120
    assert not (tmp_path / "o").exists()


def test_a_huge_one_line_document_is_tokenized_only_as_far_as_needed(tmp_path, hf_dir):
    r = random.Random(0)
    huge = " ".join(r.choice(WORDS) for _ in range(3_000_000))  # 12 MB on one .jsonl line
    path = write_jsonl(tmp_path / "huge.jsonl", [{"text": huge}, {"text": "the cat sat"}])
    out = tmp_path / "out"
    proc = run(
        "compile", str(hf_dir), "--data", str(path), "--max-length", "16", "--budget", "2",
        "-o", str(out), "-q", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "adapter.safetensors").is_file()


def test_cut_documents_tokenize_as_the_whole_text_does(tmp_path):
    tok = make_tokenizer()
    r = random.Random(1)
    texts = [" ".join(r.choice(WORDS) for _ in range(n)) for n in (3, 40, 5000, 20000)]
    texts.append("\n".join(texts))  # line breaks at the cut
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": t} for t in texts])
    for length in (7, 64):
        (batch,) = text_batches(path, tok, max_length=length, batch_size=len(texts))
        want = [tok(t, truncation=True, max_length=length)["input_ids"] for t in texts]
        got = [ids[mask.bool()].tolist() for ids, mask in zip(*batch.values(), strict=True)]
        assert got == want
    # packing reads documents whole, in pieces: the same tokens as one call
    packed = text_batches(path, tok, max_length=64, batch_size=10**6, pack=True)
    whole = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    (batch,) = packed
    assert batch["input_ids"].flatten().tolist() == whole[: len(whole) // 64 * 64]


# -- 11. one line for each remaining traceback, and nothing else on stderr -------------------


def test_config_naming_a_non_model_class_is_refused(tmp_path, hf_dir):
    model = tmp_path / "m"
    model.mkdir()
    for f in hf_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["AutoTokenizer"]
    (model / "config.json").write_text(json.dumps(config))
    proc = run("compile", str(model), "--data", str(corpus(tmp_path)), "-o", "o", cwd=tmp_path)
    assert "names architecture 'AutoTokenizer', which is not a transformers model" in (
        one_line_error(proc)
    )


def test_one_sample_gives_rank_0_with_the_reason(tmp_path, example):
    x = torch.randn(1, 3, 32, 32)
    save_file({"x": x}, str(tmp_path / "one.safetensors"))
    out = tmp_path / "o"
    proc = run(
        "compile", str(example / "tiny_cnn.pt2"), "--data", str(tmp_path / "one.safetensors"),
        "--budget", "2", "-o", str(out), "-q", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    few = {n: why for n, why in report["skipped"].items() if "row(s) of calibration" in why}
    assert few and all("saw 1 row(s)" in why for why in few.values())
    assert all(layer["rank"] == 0 for layer in report["layers"] if layer["name"] in few)


def test_symlink_loop_as_output_is_refused_before_any_work(tmp_path, example):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    proc = run(
        "compile", str(example / "tiny_cnn.pt2"), "--data", str(tmp_path / "missing.pt"),
        "-o", "loop", cwd=tmp_path,
    )  # fmt: skip
    assert "symlink loop" in one_line_error(proc)  # refused before the (missing) data is read


def test_quiet_leaves_stderr_empty_for_a_model_directory_and_text(tmp_path, hf_dir):
    proc = run(
        "compile", str(hf_dir), "--data", str(corpus(tmp_path)), "--max-length", "16",
        "--budget", "2", "--max-steps", "2", "-o", "o", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = [line for line in proc.stderr.splitlines() if "evagraph: warning:" not in line]
    assert shown == [], proc.stderr


@pytest.mark.parametrize(
    "args,words",
    [
        ([], "Missing argument 'MODEL'"),
        (["m.pt2", "--budget", "x"], "'x' is not a valid integer"),
        (["m.pt2", "--no-such-flag"], "No such option '--no-such-flag'"),
    ],
)
def test_usage_mistakes_are_one_line(tmp_path, args, words):
    line = one_line_error(run("compile", *args, cwd=tmp_path))
    assert words in line and "evagraph compile --help" in line


def test_malformed_jsonl_is_one_line_with_the_parse_error(tmp_path, hf_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat"}\n{"text": oops\n')
    proc = run("compile", str(hf_dir), "--data", str(bad), "-o", "o", "-q", cwd=tmp_path)
    assert "JSON parse error" in one_line_error(proc)


def _file_limit(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_file_size_limit_writes_no_output_at_all(tmp_path, example):
    pytest.importorskip("matplotlib")  # report.png: the output that used to be let go
    args = ["compile", str(example / "tiny_cnn.pt2"), "--data", str(example / "calib.safetensors")]
    args += ["--format", "safetensors", "-q"]
    proc = run(*args, "-o", "whole", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "whole").iterdir()}
    # a limit under the PNG only: every other file fits
    limit = max(s for name, s in sizes.items() if name != "report.png") + 1
    assert sizes["report.png"] > limit
    proc = run(*args, "-o", "cut", cwd=tmp_path, preexec_fn=_file_limit(limit))
    assert "cannot write output" in one_line_error(proc)
    assert not (tmp_path / "cut").exists()


def test_render_report_passes_a_write_error_on(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from evagraph import render

    model = SharedMLP()
    _, report = quiet(evagraph.transform, model, [torch.randn(32, 16)] * 3, progress=False)

    def full(report, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render, "_png", full)
    with pytest.raises(OSError, match="No space left"):
        render.render_report(report, tmp_path)
