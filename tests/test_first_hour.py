"""Issue 29, what a new user trips over: silent random weights, and other surprises."""

from __future__ import annotations

import pytest
import torch

from evagraph.loading import load_model


def test_a_timm_name_without_checkpoint_warns_that_weights_are_random():
    pytest.importorskip("timm")
    with pytest.warns(UserWarning, match="resnet18 has no --checkpoint .*random initialisation"):
        model, kind = load_model("resnet18")
    assert kind == "timm"


def test_missing_data_shows_a_working_command_for_the_model(example, tmp_path):
    import subprocess

    from conftest import evagraph_cmd

    proc = subprocess.run(
        [*evagraph_cmd(), "compile", str(example / "tiny_cnn.pt2"), "--budget", "16"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "torch.randn(64, 3, 32, 32)" in lines[0] and "--data calib.pt" in lines[0]


def test_a_pickle_whose_class_lived_in_the_saving_script_says_what_to_do(tmp_path):
    import subprocess
    import sys

    from evagraph.errors import ModelLoadError

    script = (
        "import torch\nfrom torch import nn\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(8, 4)\n\n"
        "torch.save(Net(), 'model.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=120)
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "model.pt", allow_pickle=True)
    message = str(err.value)
    assert "class Net was defined in the script that saved it (__main__)" in message
    assert "torch.export.save(torch.export.export(model, (example,)), 'model.pt2')" in message
    assert "\n" not in message


def test_warnings_are_labelled_by_whose_they_are():
    import re
    from pathlib import Path

    import evagraph
    from evagraph.cli import _one_line_warning

    own = _one_line_warning("stopped\n  early", evagraph.ConvergenceWarning, "/x/api.py", 1)
    assert own == "evagraph: warning: stopped early\n"
    theirs = "/v/lib/python3.11/site-packages/transformers/utils/generic.py"
    assert (
        _one_line_warning("old", FutureWarning, theirs, 3) == "transformers: FutureWarning: old\n"
    )
    # every warning evagraph raises is an EvagraphWarning, so it is labelled as evagraph's
    package = Path(evagraph.__file__).parent
    for path in package.rglob("*.py"):
        for call in re.findall(r"warnings\.warn\((.*?)stacklevel", path.read_text(), re.S):
            assert "EvagraphWarning" in call or "ConvergenceWarning" in call, (path, call)


class Tokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids)) * attention_mask[..., None]
        return self.head(h)


def test_the_report_says_what_the_run_consumed_and_with_what():
    import warnings

    import evagraph

    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (4, 3, 4, 4, 2):
        mask = (torch.rand(n, 10, generator=g) > 0.3).long()
        batches.append(
            {"input_ids": torch.randint(0, 32, (n, 10), generator=g), "attention_mask": mask}
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", evagraph.ConvergenceWarning)
        _, report = evagraph.transform(Tokens(), batches, budget=2, max_steps=3, progress=False)
    assert report.steps == 3
    assert report.run["samples"] == 4 + 3 + 4  # the batches consumed, not the one drawn after
    assert report.run["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches[:3])
    assert report.run["elapsed_s"] > 0
    assert report.run["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert any("did not converge" in step for step in report.next_steps)
