"""Issue 28, items 7 and 8a: the files a resumed run reads are the ones it wrote, one run at a
time uses a work directory, and a model directory's index cannot lead outside it.

Each test reproduces the report: without the checks, the changed file is used (exit 0, other
adapters), the second run dies with a ``FileNotFoundError``, the file outside is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evagraph
from evagraph.errors import ModelLoadError
from evagraph.onload import ShardedCheckpoint

pytestmark = pytest.mark.filterwarnings("ignore::evagraph.ConvergenceWarning")


def _llama(layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _tokens(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(n)]


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# 8a. A model directory's safetensors index cannot lead outside the directory.


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A Llama directory in several safetensors files, with their index."""
    _llama(2).save_pretrained(tmp_path / "llama", max_shard_size="20KB")
    assert len(list((tmp_path / "llama").glob("*.safetensors"))) > 1
    return tmp_path / "llama"


def _index(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())


def _set_entry(directory: Path, name: str, target: str) -> None:
    index = _index(directory)
    index["weight_map"][name] = target
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _moved_out(directory: Path, name: str, copy: bool = False) -> tuple[str, Path]:
    """The file holding ``name``, moved (or copied) next to the directory (readable there)."""
    shard = directory / _index(directory)["weight_map"][name]
    outside = directory.parent / shard.name
    if copy:
        outside.write_bytes(shard.read_bytes())
    else:
        shard.rename(outside)
    return shard.name, outside


NAME = "model.layers.1.mlp.down_proj.weight"


def test_index_entry_with_dotdot_is_refused(sharded):
    shard, outside = _moved_out(sharded, NAME, copy=True)
    _set_entry(sharded, NAME, f"../{shard}")
    with pytest.raises(ModelLoadError) as err:
        ShardedCheckpoint(sharded)
    text = _one_line(err)
    assert f"weight_map entry {NAME!r} -> '../{shard}' leads outside {sharded}" in text
    # And end to end: the block-by-block calibration reads nothing of it.
    from evagraph.io import load_model

    skeleton, _ = load_model(sharded, lazy=True)
    with pytest.raises(ModelLoadError, match="leads outside"):
        evagraph.calibrate(skeleton, _tokens(), weights=sharded, sequential=True, progress=False)


def test_index_entry_with_absolute_path_is_refused(sharded):
    _, outside = _moved_out(sharded, NAME, copy=True)
    _set_entry(sharded, NAME, str(outside))
    with pytest.raises(ModelLoadError, match=f"entry {NAME!r} -> {str(outside)!r} leads") as err:
        ShardedCheckpoint(sharded)
    _one_line(err)


def test_index_entry_linking_outside_is_refused(sharded):
    shard, outside = _moved_out(sharded, NAME)
    (sharded / shard).symlink_to(outside)
    with pytest.raises(ModelLoadError, match=f"entry '[^']+' -> {shard!r} leads outside") as err:
        ShardedCheckpoint(sharded)
    _one_line(err)


def test_links_inside_and_the_hub_cache_layout_are_read(tmp_path, sharded):
    # A link inside the directory is fine.
    shard, _ = _moved_out(sharded, NAME)
    (sharded / "real").mkdir()
    (sharded.parent / shard).rename(sharded / "real" / shard)
    (sharded / shard).symlink_to(Path("real") / shard)
    assert NAME in ShardedCheckpoint(sharded).read([NAME])
    # The hub cache: REPO/snapshots/REV/FILE -> ../../blobs/HASH.
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sharded.iterdir():
        if f.is_file() and not f.is_symlink():
            blob = repo / "blobs" / f"hash-{f.name}"
            blob.write_bytes(f.read_bytes())
            (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "blobs" / f"hash-{shard}").write_bytes((sharded / shard).read_bytes())
    (snapshot / shard).symlink_to(Path("..", "..", "blobs", f"hash-{shard}"))
    assert NAME in ShardedCheckpoint(snapshot).read([NAME])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", r"cannot read .*model\.safetensors\.index\.json: Expecting"),
        (b"[1, 2]", r"cannot read .*index\.json: not an object"),
        (b'{"metadata": {}}', r"index\.json has no weight_map"),
        (b'{"weight_map": ["a"]}', r"index\.json has no weight_map"),
        (b'{"weight_map": {"w": 3}}', r"weight_map entry 'w' is 3, not the name of a file"),
        (b'{"weight_map": {"w": "gone.safetensors"}}', r"entry 'w' -> 'gone.safetensors': no"),
    ],
)
def test_bad_index_is_one_line(sharded, content, message):
    (sharded / "model.safetensors.index.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as err:
        ShardedCheckpoint(sharded)
    _one_line(err)
