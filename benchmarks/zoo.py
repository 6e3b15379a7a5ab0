"""Model zoo sweep: the same checks over one timm model per family and one transformers model
per model type, so coverage is measured, not assumed (slow; opt in).

    python benchmarks/zoo.py --timm --out /tmp/zoo_timm.json           # every timm family
    python benchmarks/zoo.py --hf --limit 50 --out /tmp/zoo_hf.json    # 50 HF model types
    python benchmarks/zoo.py --only resnet18,llama --out /tmp/zoo.json
    python benchmarks/zoo.py --from-json /tmp/zoo_timm.json /tmp/zoo_hf.json --write-results

Takes a selection of models (``--timm``: the smallest-named variant of each module of
``timm.list_modules()``; ``--hf``: one head per ``CONFIG_MAPPING_NAMES`` type, causal LM, else
sequence classification, else image classification, else the base model; ``--only``: names of
either kind). Each is built tiny from its config with random weights (hidden 32, 2 layers,
images 32-64 where the family allows), run once as a user would, then
``evagraph.transform(model, batches, budget=2, rho=2)`` and six checks:

- ``init_equal``: the adapted model's output equals the model's (B = 0 at init);
- ``lora_only``: exactly the LoRA parameters require grad, and some layer was adapted;
- ``merge``: ``evagraph.merge(adapted)`` computes what ``adapted`` does once B is non-zero;
- ``class_kept``: ``type(adapted) is type(model)``;
- ``peft``: ``evagraph.to_peft(adapted)`` computes the same (``n/a`` where evagraph refuses
  the export with a ``ConfigError``: adapters spliced into a graph, dilated convolutions);
- ``skipped``: every linear/conv module is an adapted layer or in ``report.skipped`` with a
  reason.

Returns (writes) a JSON file (``--out``, atomically): the command, the machine and one record
per model: status (``ran`` or ``not attempted`` with the reason), class, parameters, seconds
and per check ``pass``/``fail``/``error``/``n/a`` with a message. ``--write-results`` puts a
"## Model zoo sweep (issue 17)" section (pass rates, a per-model table with the failure
reasons, the commands) into benchmarks/results.md, replacing an earlier one.

Models run in a worker process, one at a time, each under ``--timeout`` seconds
(``signal.alarm``); a worker that crashes or stops answering is killed and restarted after the
model it was on, which is recorded as an error: no model stops the sweep.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

CHECKS = ("init_equal", "lora_only", "merge", "class_kept", "peft", "skipped")
SECTION = "## Model zoo sweep (issue 17)"

# Tiny sizes, set only where a config has the attribute (names vary across model types).
HF_SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd"), 32),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers"), 2
    ),
    "decoder_layers": 2,
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads"), 4),
    **dict.fromkeys(("encoder_attention_heads", "decoder_attention_heads"), 4),
    "num_key_value_heads": 2,
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner"), 64),
    **dict.fromkeys(("encoder_ffn_dim", "decoder_ffn_dim"), 64),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels"), 8),
    # MoE: few experts, so every expert sees tokens
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts"), 4),
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "image_size": 32,
    "patch_size": 8,
    "max_source_positions": 16,
    "max_target_positions": 16,
}
VOCAB = 100  # token ids drawn below this (every vocabulary is larger)


# ----------------------------------------------------------------------------- selection


def _size_key(name: str) -> tuple:
    """Smaller-sounding timm names first: test_ models, then size words (a word's trailing
    number, as in s12 or b0, breaks ties), then the first number in the name."""
    words = ["atto", "femto", "pico", "nano", "xxs", "xxsmall", "micro", "tiny", "xs"]
    words += ["xsmall", "mini", "small", "s", "lite", "", "base", "b", "medium", "m", "large"]
    words += ["l", "xl", "huge", "h", "giant", "g", "gigantic", "e", "xxl"]
    ranks = []
    for token in name.split("_"):
        match = re.fullmatch(r"([a-z]+)(\d*)", token)
        if match and match[1] in words:
            ranks.append((words.index(match[1]), int(match[2] or 0)))
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    test = 0 if name.startswith("test_") else 1
    size = min(ranks, default=(words.index(""), 0))
    return (test, size, numbers[:1] or [0], len(name), name)


def timm_cases() -> list[dict]:
    import timm

    cases = []
    for module in timm.list_modules():
        names = timm.list_models(module=module)
        if names:
            cases.append({"source": "timm", "name": min(names, key=_size_key), "family": module})
    return cases


def hf_cases() -> list[dict]:
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    heads = (
        ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        ma.MODEL_MAPPING_NAMES,
    )
    cases = []
    for model_type in CONFIG_MAPPING_NAMES:
        cls = next((h[model_type] for h in heads if model_type in h), None)
        case = {"source": "hf", "name": model_type, "family": model_type, "class": cls}
        if cls is None:
            case["not_attempted"] = "no causal-LM, classification or base model class"
        elif isinstance(cls, (tuple, list)):
            case["class"] = cls[0]
        cases.append(case)
    return cases


def select(args: argparse.Namespace) -> list[dict]:
    cases = []
    if args.timm or args.only:
        cases += timm_cases()
    if args.hf or args.only:
        cases += hf_cases()
    if args.only:
        wanted = args.only.split(",")
        timm_names = {c["name"] for c in cases if c["source"] == "timm"}
        families = {(c["source"], c["family"]): c for c in cases}
        picked = []
        for w in wanted:  # "hf:TYPE", "timm:MODULE", an HF type, else a timm model name
            source, _, name = w.rpartition(":")
            if (source or "hf", name) in families and name not in timm_names:
                picked.append(families[source or "hf", name])
            elif source == "timm" and ("timm", name) in families:
                picked.append(families["timm", name])
            else:
                picked.append({"source": "timm", "name": name, "family": name})
        cases = picked
    return cases[: args.limit] if args.limit else cases


# ----------------------------------------------------------------------------- building


def token_batches(n: int = 3, batch: int = 2, length: int = 8, **extra: Any) -> list[dict]:
    """Token batches whose second row ends in padding (attention_mask 0), as in the tests."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, length - 3 :] = 0
        ids = torch.randint(3, VOCAB, (batch, length), generator=g)
        # eos (id 2) ends every row: BART-style classifiers pool there and need one per row
        ids[0, -1], ids[1, length - 4] = 2, 2  # the last unpadded token
        b = {"input_ids": ids, "attention_mask": mask}
        out.append({**b, **{k: make(g) for k, make in extra.items()}})
    return out


def images(size: int, channels: int = 3, n: int = 3, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, channels, size, size, generator=g) for _ in range(n)]


def call(model: torch.nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def main_output(out: Any) -> torch.Tensor:
    """The tensor a user would look at: logits, else the last hidden state, else the first."""
    if torch.is_tensor(out):
        return out
    for key in ("logits", "last_hidden_state", "prediction_logits"):
        value = getattr(out, key, None)
        if torch.is_tensor(value):
            return value
    values = out.values() if isinstance(out, dict) else out
    for value in values if isinstance(values, (list, tuple)) or hasattr(values, "__iter__") else []:
        if torch.is_tensor(value) and value.is_floating_point():
            return value
    raise TypeError(f"no tensor output in {type(out).__name__}")


def build_timm(name: str) -> tuple[torch.nn.Module, list]:
    """The model at img_size 64 if it takes that, else at 64 x 64 inputs, else its own size."""
    import timm

    errors = []
    for kwargs in (dict(img_size=64), {}):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
        except Exception as err:  # noqa: BLE001 - any failure: try the next way
            errors.append(f"{kwargs}: {one_line(err)}")
            continue
        reinit_near_zero(model)
        own = model.pretrained_cfg.get("input_size", (3, 224, 224))
        for size in dict.fromkeys((64, own[-1])):
            batches = images(size, channels=own[0])
            try:
                with torch.no_grad():
                    main_output(model(batches[0]))
                return model, batches
            except Exception as err:  # noqa: BLE001
                errors.append(f"{kwargs} at {size}px: {one_line(err)}")
    raise RuntimeError("; ".join(errors))


@torch.no_grad()
def reinit_near_zero(model: torch.nn.Module) -> None:
    """Give weights that timm initialises to (near) zero (zero-init heads and last norms of
    residual branches, layer scale 1e-5) ordinary values: otherwise perturbing B does not
    reach the output and the merge and PEFT checks would prove nothing."""
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "bias" in leaf or not p.is_floating_point() or p.numel() == 0:
            continue
        if float(p.abs().max()) < 1e-3:
            p.copy_(torch.ones_like(p) if p.dim() == 1 else 0.02 * torch.randn_like(p))


def tiny_config(model_type: str, **extra: Any) -> Any:
    """The type's default config with HF_SIZES applied where it has the attribute, to its
    sub-configs (text, vision, ...) too; passed to the constructor so derived fields follow."""
    from transformers import AutoConfig, PretrainedConfig

    default = AutoConfig.for_model(model_type)

    def sizes(config: PretrainedConfig) -> dict:
        out = {}
        for key, value in HF_SIZES.items():
            current = getattr(config, key, None)
            if isinstance(current, int) and not isinstance(current, bool):
                out[key] = value
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            current = getattr(config, key, None)
            if key == "pad_token_id" and current is None or isinstance(current, int):
                out[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
        if getattr(config, "is_encoder_decoder", False) or "decoder_start_token_id" in vars(config):
            out["decoder_start_token_id"] = 1
        return out

    kwargs = sizes(default)
    for key in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, key, None)
        if isinstance(sub, PretrainedConfig):
            kwargs[key] = {**sub.to_dict(), **sizes(sub)}
    return AutoConfig.for_model(model_type, **kwargs, **extra)


def hf_batches(model: torch.nn.Module) -> list:
    config = model.config
    params = inspect.signature(model.forward).parameters
    kind = getattr(model, "main_input_name", "input_ids")
    if kind == "input_ids":
        extra = {}
        seq2seq = getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params
        # a seq2seq classifier derives its decoder inputs from input_ids
        if seq2seq and "SequenceClassification" not in type(model).__name__:
            extra["decoder_input_ids"] = lambda g: torch.randint(3, VOCAB, (2, 5), generator=g)
        return token_batches(**extra)
    if kind == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return [{"pixel_values": x} for x in images(size, getattr(config, "num_channels", 3))]
    if kind == "input_values":
        g = torch.Generator().manual_seed(0)
        return [{"input_values": torch.randn(2, 1600, generator=g)} for _ in range(3)]
    if kind == "input_features":
        bins = getattr(config, "num_mel_bins", 16)
        frames = 2 * getattr(config, "max_source_positions", 16)
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(3):
            b = {"input_features": torch.randn(2, bins, frames, generator=g)}
            if "decoder_input_ids" in params and getattr(config, "is_encoder_decoder", False):
                b["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
            out.append(b)
        return out
    raise NotAttempted(f"main input {kind!r} has no tiny batch here")


def build_hf(case: dict) -> tuple[torch.nn.Module, list]:
    import transformers

    cls = getattr(transformers, case["class"], None)
    if cls is None:
        raise NotAttempted(f"transformers has no {case['class']} (optional dependency?)")
    extra = {"num_labels": 3} if "Classification" in case["class"] else {}
    try:
        config = tiny_config(case["name"], **extra)
    except Exception as err:  # noqa: BLE001
        raise NotAttempted(f"no tiny config: {one_line(err)}") from err
    torch.manual_seed(0)
    model = cls(config).eval()
    batches = hf_batches(model)
    with torch.no_grad():
        main_output(call(model, batches[0]))
    return model, batches


class NotAttempted(Exception):
    """The model has no tiny-config path here (missing class, input kind, dependency)."""


class Timeout(Exception):
    pass


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- checks


def compare(a: Any, b: Any, tol: float = 1e-4) -> tuple[bool, str]:
    """Equal within tol relative to the outputs' scale; the message gives the difference."""
    x, y = main_output(a).detach().double(), main_output(b).detach().double()
    if x.shape != y.shape:
        return False, f"shapes {tuple(x.shape)} vs {tuple(y.shape)}"
    scale = max(1.0, float(y.abs().max()))
    diff = float((x - y).abs().max()) if x.numel() else 0.0
    return diff <= tol * scale, f"max abs diff {diff:.3g} (output scale {scale:.3g})"


def run_checks(model: torch.nn.Module, batches: list) -> dict:
    import evagraph
    from evagraph.lora import LoraAdapter
    from evagraph.passes.layer_graph import _module_layer

    checks: dict[str, dict] = {}

    def record(name: str, ok: bool | None, message: str = "") -> None:
        status = "n/a" if ok is None else ("pass" if ok else "fail")
        checks[name] = {"status": status, "message": message}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted, report = evagraph.transform(model, batches, budget=2, rho=2, progress=False)
    batch = batches[0]
    info = {"capture": report.capture, "adapted": len(report.layers), "skipped": report.skipped}
    # weights held as bare 3-D parameters (fused MoE experts), which no check above sees
    convs = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}
    experts = {r.name.rpartition("[")[0] for r in report.layers if r.name.endswith("]")}
    bare = [
        n
        for n, p in model.named_parameters()
        if p.dim() == 3
        and min(p.shape) > 1
        and id(p) not in convs  # not cls/pos tokens
        and n not in experts  # fused experts adapted one by one
    ]
    if bare:
        info["note"] = (
            f"{len(bare)} 3-D weight(s) outside Linear/Conv modules not adapted: {bare[0]}"
        )

    def guarded(name: str, fn) -> None:
        try:
            fn()
        except Timeout:
            raise
        except Exception as err:  # noqa: BLE001 - a check's error is its result
            checks[name] = {"status": "error", "message": one_line(err)}

    def init_equal() -> None:
        with torch.no_grad():
            record("init_equal", *compare(call(adapted, batch), call(model, batch)))

    adapters = [m for m in adapted.modules() if isinstance(m, LoraAdapter)]

    def lora_only() -> None:
        lora = {id(p) for m in adapters for p in m.parameters()}
        trainable = {id(p) for p in adapted.parameters() if p.requires_grad}
        extra = [n for n, p in adapted.named_parameters() if p.requires_grad and id(p) not in lora]
        if not adapters:
            record("lora_only", False, "no layer adapted")
        else:
            ok = trainable == lora
            record(
                "lora_only", ok, f"{len(adapters)} adapters" + (f"; also {extra[:3]}" * (not ok))
            )

    def class_kept() -> None:
        ok = type(adapted) is type(model)
        name = lambda t: f"{t.__module__}.{t.__qualname__}"  # noqa: E731
        record("class_kept", ok, f"{name(type(adapted))} vs {name(type(model))}")

    def skipped() -> None:
        adaptable = {n for n, m in model.named_modules() if _module_layer(m) is not None}
        named = {layer.name for layer in report.layers} | set(report.skipped)
        missing = sorted(adaptable - named)
        blank = [n for n, why in report.skipped.items() if not str(why).strip()]
        ok = not missing and not blank
        reasons = sorted(set(report.skipped.values()))
        message = f"{len(report.skipped)} skipped: {'; '.join(reasons)[:200]}"
        if missing:
            message = f"not accounted for: {missing[:4]}"
        elif blank:
            message = f"no reason: {blank[:4]}"
        record("skipped", ok, message)

    guarded("init_equal", init_equal)
    guarded("lora_only", lora_only)
    guarded("class_kept", class_kept)
    guarded("skipped", skipped)

    # a random-init model whose output ignores its input (dead activations) cannot show
    # whether merge kept the adapters
    with torch.no_grad():
        constant, _ = compare(call(model, batches[1]), call(model, batch), tol=1e-6)

    # B off zero so merge and PEFT have a non-trivial delta to reproduce
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in adapters:
            w = a.lora_B.weight
            w.copy_(0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype))
        moved = call(adapted, batch)

    def merge() -> None:
        merged = evagraph.merge(adapted)
        with torch.no_grad():
            ok, message = compare(call(merged, batch), moved, tol=1e-3)
            unchanged, _ = compare(moved, call(model, batch), tol=1e-6)
        if unchanged and adapters and constant:
            record("merge", None, "vacuous: the model's output does not depend on its input")
            return
        record("merge", ok and not (unchanged and adapters), message)
        if unchanged and adapters:
            checks["merge"]["message"] += (
                "; perturbing B did not change the output (adapters not on its path?)"
            )

    def peft() -> None:
        try:
            peft_model = evagraph.to_peft(adapted)
        except evagraph.ConfigError as err:
            record("peft", None, one_line(err))
            return
        with torch.no_grad():
            record("peft", *compare(call(peft_model.eval(), batch), moved, tol=1e-3))

    guarded("merge", merge)
    guarded("peft", peft)
    return {"checks": checks, **info}


def run_one(case: dict, timeout: int) -> dict:
    """One model's record; never raises."""
    record = {k: case[k] for k in ("source", "name", "family")}
    if "not_attempted" in case:
        return {**record, "status": "not attempted", "reason": case["not_attempted"]}
    start = time.monotonic()

    def alarm(signum, frame):
        raise Timeout(f"timed out after {timeout} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout)
    try:
        try:
            model, batches = (
                build_timm(case["name"]) if case["source"] == "timm" else build_hf(case)
            )
        except (NotAttempted, Timeout):
            raise
        except Exception as err:  # noqa: BLE001
            raise NotAttempted(f"does not build or run tiny: {one_line(err)}") from err
        record["class"] = type(model).__name__
        record["parameters"] = sum(p.numel() for p in model.parameters())
        try:
            result = run_checks(model, batches)
            record.update(status="ran", **result)
        except Timeout as err:
            record.update(status="ran", checks=_all_error(f"{err}"))
        except Exception as err:  # noqa: BLE001 - transform itself failed
            tb = traceback.extract_tb(err.__traceback__)[-1]
            where = f" ({Path(tb.filename).name}:{tb.lineno})"
            record.update(status="ran", checks=_all_error(f"transform: {one_line(err)}{where}"))
    except NotAttempted as err:
        record.update(status="not attempted", reason=str(err))
    except Timeout as err:
        record.update(status="not attempted", reason=f"build: {err}")
    finally:
        signal.alarm(0)
    record["seconds"] = round(time.monotonic() - start, 1)
    record.pop("skipped", None) if record.get("status") != "ran" else None
    return record


def _all_error(message: str) -> dict:
    return {c: {"status": "error", "message": message} for c in CHECKS}


def worker(cases_path: str, out_path: str, timeout: int) -> None:
    """Run the cases in order, appending one JSON line per model to out_path."""
    torch.set_num_threads(1)  # tiny models; the machine is shared
    warnings.filterwarnings("ignore")
    cases = json.loads(Path(cases_path).read_text())
    with open(out_path, "a") as f:
        for case in cases:
            print(f"[zoo] {case['source']} {case['name']} ...", file=sys.stderr, flush=True)
            record = run_one(case, timeout)
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()


# ----------------------------------------------------------------------------- driver


def sweep(
    cases: list[dict], timeout: int, deadline: float = float("inf"), progress=None
) -> list[dict]:
    """Run cases in a worker, restarting it after a model that crashes or hangs it; after
    ``deadline`` (time.monotonic) no new model starts. ``progress(done)`` after each model."""
    done: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        remaining = list(cases)
        while remaining:
            cases_path, out_path = Path(tmp, "cases.json"), Path(tmp, "out.jsonl")
            cases_path.write_text(json.dumps(remaining))
            out_path.write_text("")
            cmd = [sys.executable, __file__, "--worker", str(cases_path), str(out_path)]
            proc = subprocess.Popen([*cmd, f"--timeout={timeout}"])
            lines, last, hung = 0, time.monotonic(), False
            while proc.poll() is None:
                time.sleep(1)
                n = len(out_path.read_text().splitlines())
                if n != lines:
                    lines, last = n, time.monotonic()
                    if progress:
                        progress(done + [json.loads(x) for x in out_path.read_text().splitlines()])
                    if last > deadline:  # time budget spent: the rest is left unrun
                        proc.kill()
                        proc.wait()
                        break
                elif time.monotonic() - last > timeout + 120:  # alarm did not fire: stuck in C
                    hung = True
                    proc.kill()
                    proc.wait()
            records = [json.loads(line) for line in out_path.read_text().splitlines()]
            done += records
            remaining = remaining[len(records) :]
            if time.monotonic() > deadline:
                break
            if remaining and proc.returncode is not None:
                case = remaining.pop(0)
                why = (
                    f"no answer {timeout + 120} s after the model started: killed"
                    if hung
                    else f"the worker died (exit {proc.returncode}; -9: out of memory?)"
                )
                done.append({**case, "status": "ran", "checks": _all_error(why)})
            print(f"[zoo] {len(done)} of {len(cases)} done", file=sys.stderr, flush=True)
    return done


def write_json(data: Any, path: str | Path) -> None:
    """Write atomically: a temporary file beside ``path``, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def passes(record: dict) -> bool:
    checks = record.get("checks", {})
    return record["status"] == "ran" and all(
        checks.get(c, {}).get("status") in ("pass", "n/a") for c in CHECKS
    )


def cell(check: dict | None) -> str:
    if not check:
        return "-"
    return {"pass": "ok", "n/a": "n/a", "fail": "FAIL", "error": "ERR"}[check["status"]]


def failure_reasons(record: dict) -> str:
    if record["status"] != "ran":
        return f"not attempted: {record['reason']}"
    seen, out = set(), [f"note: {record['note']}"] if "note" in record else []
    for name in CHECKS:
        check = record["checks"].get(name, {})
        if check.get("status") in ("fail", "error") and check["message"] not in seen:
            seen.add(check["message"])
            out.append(f"{name}: {check['message']}")
    return "; ".join(out)


def section(runs: list[dict]) -> list[str]:
    """The results.md section for one or more sweep JSON files."""
    lines = [SECTION, ""]
    lines += [
        "`benchmarks/zoo.py`: each model built tiny from its config (random weights), run once,",
        "then `evagraph.transform(model, batches, budget=2, rho=2)` and six checks: output equal",
        "at init, only LoRA parameters trainable, `merge` equal to the adapted model with B",
        "perturbed, class kept, `to_peft` equal (n/a where evagraph refuses the PEFT format),",
        "every linear/conv layer adapted or listed in `report.skipped` with a reason. A model",
        "passes when every check passes or is n/a.",
        "",
    ]
    for run in runs:
        lines += [f"- command: `{run['command']}`", f"- machine: {run['machine']}"]
        lines.append(f"- selection: {run['selection']}")
    lines.append("")
    records = [r for run in runs for r in run["results"]]
    for source, label in (("timm", "timm families"), ("hf", "transformers model types")):
        group = [r for r in records if r["source"] == source]
        if not group:
            continue
        ran = [r for r in group if r["status"] == "ran"]
        ok = sum(passes(r) for r in ran)
        per_check = ", ".join(
            f"{c} {sum(r['checks'].get(c, {}).get('status') in ('pass', 'n/a') for r in ran)}"
            for c in CHECKS
        )
        lines.append(
            f"- **{source}: {ok} of {len(ran)} {label} pass every check** "
            f"({len(group) - len(ran)} more not attempted); per check (pass or n/a): {per_check}"
        )
        notes = sum("note" in r for r in ran)
        if notes:
            lines.append(
                f"  - {notes} carry 3-D weights outside Linear/Conv modules (e.g. fused MoE"
            )
            lines[-1] += " experts), not adapted and invisible to the checks"
        lines.append("  - most frequent failures (models):")
        lines += [f"    - {n} x {key}" for key, n in frequent(ran).most_common(10)]
        lines.append("  - most frequent reasons for not attempting (models):")
        skipped = Counter(_pattern(r["reason"]) for r in group if r["status"] != "ran")
        lines += [f"    - {n} x {key}" for key, n in skipped.most_common(5)]
    lines += ["", "| source | model | class | capture | adapted / skipped | " + " | ".join(CHECKS)]
    lines[-1] += " | failure reasons |"
    lines.append("|" + "---|" * (6 + len(CHECKS)))
    for r in records:
        if r["status"] != "ran":
            continue
        cells = " | ".join(cell(r["checks"].get(c)) for c in CHECKS)
        counts = f"{r.get('adapted', '-')} / {len(r['skipped']) if 'skipped' in r else '-'}"
        reasons = failure_reasons(r).replace("|diff|", "abs diff").replace("|", "/")
        lines.append(
            f"| {r['source']} | {r['name']} | {r.get('class', '-')} | {r.get('capture', '-')} "
            f"| {counts} | {cells} | {reasons} |"
        )
    lines += ["", "Not attempted:", "", "| source | model | reason |", "|---|---|---|"]
    for r in records:
        if r["status"] != "ran":
            lines.append(f"| {r['source']} | {r['name']} | {r['reason'].replace('|', '/')} |")
    return lines


def _pattern(message: str) -> str:
    """A message with numbers blanked and cut short, so like failures count together."""
    message = message.replace("|diff|", "abs diff")
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", message)[:90].replace("|", "/")


def frequent(records: list[dict]) -> Counter:
    """How many models fail each (check, message pattern)."""
    counts: Counter = Counter()
    for r in records:
        keys = set()
        for name in CHECKS:
            check = r["checks"].get(name, {})
            if check.get("status") in ("fail", "error"):
                message = check["message"]
                whole = ("transform", "timed out", "worker", "no answer", "the worker")
                # a failure of the whole model counts once, not once per check
                keys.add(message if message.startswith(whole) else f"{name}: {message}")
        counts.update(_pattern(k) for k in keys)
    return counts


def write_results(lines: list[str], path: Path) -> None:
    """Replace the zoo section of results.md (up to the next ## heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    new = "\n".join(lines) + "\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + new
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + new + (text[end + 1 :] if end >= 0 else "")
        text = text.replace(new + "## ", new + "\n## ")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--timm", action="store_true", help="one model per timm family")
    p.add_argument("--hf", action="store_true", help="one model per transformers model type")
    p.add_argument("--limit", type=int, default=0, help="at most N models (after selection)")
    p.add_argument("--only", default="", help="comma-separated timm model names / HF types")
    p.add_argument("--timeout", type=int, default=120, help="seconds per model")
    p.add_argument("--max-minutes", type=float, default=0, help="start no model after this")
    p.add_argument("--out", default="", help="JSON results file")
    p.add_argument("--from-json", nargs="+", default=[], help="report earlier runs, run none")
    p.add_argument("--write-results", action="store_true", help="update benchmarks/results.md")
    p.add_argument("--results", default=str(Path(__file__).with_name("results.md")))
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.timeout)
    if args.from_json:
        runs = [json.loads(Path(f).read_text()) for f in args.from_json]
    else:
        if not (args.timm or args.hf or args.only):
            p.error("choose --timm, --hf or --only (or --from-json)")
        sys.path.insert(0, str(Path(__file__).parent))
        from calibration import machine

        cases = select(args)
        selection = ", ".join(
            s for s, on in (("timm", args.timm), ("hf", args.hf), (args.only, args.only)) if on
        )
        if args.limit:
            selection += f", first {args.limit}"
        run = {
            "command": f"python benchmarks/zoo.py {shlex.join(sys.argv[1:])}",
            "machine": machine(),
            "selection": f"{selection} ({len(cases)} models)",
            "results": [],
        }

        def progress(done: list[dict]) -> None:
            if args.out:  # partial results survive an interrupted sweep
                write_json({**run, "results": done, "partial": True}, args.out)

        deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else float("inf")
        run["results"] = sweep(cases, args.timeout, deadline, progress)
        if len(run["results"]) < len(cases):
            run["selection"] += (
                f"; time budget of {args.max_minutes:g} min: the first {len(run['results'])} ran"
            )
        if args.out:
            write_json(run, args.out)
        runs = [run]
    lines = section(runs)
    print("\n".join(lines))
    if args.write_results:
        write_results(lines, Path(args.results))


if __name__ == "__main__":
    main()
