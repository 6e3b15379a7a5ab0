"""Run PEFT's EVA and evagraph side by side and measure both against the exact PCA.

Used by the differential tests. PEFT's incremental PCA is randomised and approximate, so
both methods are compared with the exact decomposition of the rows each one saw (PEFT's are
recorded by wrapping its SVD hook), not only with each other.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from conftest import subspace_similarity

import evagraph
from evagraph.passes.probe import activation_rows


def exact_components(rows: torch.Tensor, rank: int) -> torch.Tensor:
    x = rows.double() - rows.double().mean(0)
    return torch.linalg.svd(x, full_matrices=False).Vh[:rank]


@contextlib.contextmanager
def recording_peft_rows():
    """Record, per layer, the rows PEFT's SVD hooks actually fed to its incremental PCA."""
    from peft.tuners.lora import eva

    seen: dict[str, list[torch.Tensor]] = {}
    original = eva.SVDHook.__call__

    def record(self, model, inputs, output):
        states = self.prepare_layer_inputs(inputs)
        if states.size(0) >= self.n_components:  # PEFT skips smaller batches
            seen.setdefault(self.name, []).append(states.detach().float().clone())
        return original(self, model, inputs, output)

    eva.SVDHook.__call__ = record
    try:
        yield seen
    finally:
        eva.SVDHook.__call__ = original


def run_peft(model, batches, targets, r, rho, tau):
    """PEFT's get_eva_state_dict with its defaults; returns (components per layer, rows seen)."""
    import peft

    config = peft.LoraConfig(
        r=r,
        target_modules=targets,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=rho, tau=tau),
    )
    with recording_peft_rows() as seen:
        state = peft.get_eva_state_dict(model, batches, config, show_progress_bar=False)
    return state, {k: torch.cat(v) for k, v in seen.items()}


def evagraph_rows(model, name, batches, report):
    """The rows evagraph's decomposition for layer ``name`` consumed."""
    group = next(layer.group for layer in report.layers if layer.name == name)
    consumed = [i for start, stop in report.batches[group] for i in range(start, stop)]
    grabbed, mask = [], [None]
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: grabbed.append(activation_rows(args[0], "linear", None, mask[0]))
    )
    with torch.no_grad():
        for i in consumed:
            mask[0] = batches[i].get("attention_mask")
            model(**batches[i])
    hook.remove()
    return torch.cat([rows if w is None else rows[w.bool()] for rows, w in grabbed])


def compare(model, batches, r=4, rho=2.0, tau=0.99):
    """Ranks and subspace similarities of evagraph and PEFT on the same model and data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        adapted, report = evagraph.transform(
            model, batches, budget=r, rho=rho, tau=tau, progress=False
        )
    targets = [layer.name for layer in report.layers]
    peft_state, peft_rows = run_peft(model, batches, targets, r, rho, tau)
    # PEFT hooks one layer per group of equal inputs (the first): its rows serve the group.
    group_rows = {}
    for members in report.groups.values():
        hooked = next((m for m in members if m in peft_rows), None)
        for m in members:
            group_rows[m] = peft_rows.get(hooked) if hooked else None
    ours = {m.layer_name: m for m in adapted.modules() if isinstance(m, evagraph.LoraAdapter)}
    result = {}
    for layer in report.layers:
        name = layer.name
        peft_rank = peft_state[name].shape[0]
        entry = {
            "ours_rank": layer.rank,
            "peft_rank": peft_rank,
            "ratios": layer.explained_variance_ratio,
        }
        if layer.rank:
            A = ours[name].lora_A.weight
            ref = exact_components(evagraph_rows(model, name, batches, report), layer.rank)
            entry["ours_sim"] = subspace_similarity(A, ref)
        if peft_rank:
            ref = exact_components(group_rows[name], peft_rank)
            entry["peft_sim"] = subspace_similarity(peft_state[name], ref)
        result[name] = entry
    return result, report, peft_state


def cut_ratio(result: dict, r: int) -> float:
    """The smallest explained-variance ratio evagraph kept: the global threshold."""
    kept = sorted((v for e in result.values() for v in e["ratios"]), reverse=True)
    return kept[r * len(result) - 1]


def near_tie(entry: dict, threshold: float, tolerance: float) -> bool:
    """Ranks that differ only over components whose ratios sit at the cut (within tolerance)."""
    lo, hi = sorted((entry["ours_rank"], entry["peft_rank"]))
    return all(abs(v - threshold) <= tolerance * threshold for v in entry["ratios"][lo:hi])
