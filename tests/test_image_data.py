"""Image folders as calibration data: ``evagraph.data.image_batches`` and ``compile --data DIR``."""

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import timm
import torch
from conftest import evagraph_cmd
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torch import nn

import evagraph.data
from evagraph.data import image_batches, open_data
from evagraph.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def _image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=g, dtype=torch.uint8)
    img = Image.fromarray(pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy(), mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """flat: 5 RGB pngs and jpgs. tree: class folders (one nested deeper) of mixed sizes and
    formats (png, jpg, bmp, gif, webp, grayscale, RGBA), a text file and a hidden file."""
    root = tmp_path_factory.mktemp("images")
    flat = root / "flat"
    for i in range(5):
        _image(flat / f"img{i}.{'png' if i % 2 else 'jpg'}", (40 + 7 * i, 30 + 5 * i), seed=i)
    tree = root / "tree"
    _image(tree / "cat" / "a.png", (48, 36), seed=10)
    _image(tree / "cat" / "b.jpg", (30, 60), "L", seed=11)
    _image(tree / "dog" / "c.bmp", (64, 64), seed=12)
    _image(tree / "dog" / "puppies" / "d.png", (20, 50), "RGBA", seed=13)
    _image(tree / "dog" / "e.gif", (33, 33), seed=14)
    _image(tree / "fish" / "f.webp", (50, 40), seed=15)
    (tree / "fish" / "notes.txt").write_text("not an image\n")
    (tree / ".DS_Store").write_bytes(b"\x00\x01")
    return {"flat": flat, "tree": tree}


TREE = ["cat/a.png", "cat/b.jpg", "dog/c.bmp", "dog/e.gif", "dog/puppies/d.png", "fish/f.webp"]


def _tree_batches(folders, *args, **kwargs):
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) PIL cannot read.*notes\.txt"):
        return image_batches(folders["tree"], *args, **kwargs)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def timm_model() -> nn.Module:
    return timm.create_model("resnet10t", pretrained=False, num_classes=4).eval()


def test_timm_model_gets_its_own_eval_transform(folders, timm_model):
    batches = _tree_batches(folders, timm_model, batch_size=4)
    assert [p.relative_to(folders["tree"]).as_posix() for p in batches.files] == TREE
    assert len(batches) == 2
    out = list(batches)
    cfg = resolve_data_config({}, model=timm_model)
    assert [b.shape for b in out] == [(4, *cfg["input_size"]), (2, *cfg["input_size"])]
    assert all(b.dtype == torch.float32 for b in out)
    expected = create_transform(**cfg)  # timm's eval transform, applied by hand
    for i, name in enumerate(TREE):
        torch.testing.assert_close(out[i // 4][i % 4], expected(_rgb(folders["tree"] / name)))
    # re-iterable: a second pass decodes the same batches
    for a, b in zip(out, batches, strict=True):
        torch.testing.assert_close(a, b)
    # the model runs on them
    with torch.no_grad():
        assert timm_model(out[0]).shape == (4, 4)


def test_timm_overrides_and_explicit_transform(folders, timm_model):
    small = image_batches(folders["flat"], timm_model, image_size=64, mean=MEAN, std=STD)
    cfg = resolve_data_config({"img_size": 64, "mean": MEAN, "std": STD}, model=timm_model)
    expected = create_transform(**cfg)
    batch = next(iter(small))
    assert batch.shape == (5, 3, 64, 64)
    torch.testing.assert_close(batch[0], expected(_rgb(folders["flat"] / "img0.jpg")))
    own = image_batches(folders["flat"], timm_model, transform=lambda img: torch.zeros(1, 2, 2))
    assert next(iter(own)).shape == (5, 1, 2, 2)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(d)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    ).save_pretrained(d)
    return d


def test_hf_model_gets_its_image_processor(folders, vit_dir):
    from transformers import AutoImageProcessor

    from evagraph.loading import load_model

    model, kind = load_model(vit_dir)
    assert kind == "hf"
    processor = AutoImageProcessor.from_pretrained(vit_dir)
    images = [_rgb(folders["flat"] / f"img{i}.{'png' if i % 2 else 'jpg'}") for i in range(5)]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    # the processor found from the model, given as the model directory, or given itself
    for kwargs in ({}, {"processor": vit_dir}, {"processor": processor}, {"transform": processor}):
        batches = image_batches(folders["flat"], model, batch_size=3, **kwargs)
        out = list(batches)
        assert len(batches) == 2 and [set(b) for b in out] == [{"pixel_values"}] * 2
        torch.testing.assert_close(torch.cat([b["pixel_values"] for b in out]), expected)
    with torch.no_grad():
        assert model(**out[0]).logits.shape == (3, 3)
    with pytest.raises(ConfigError, match="image processor fixes its own size"):
        image_batches(folders["flat"], model, image_size=32, mean=MEAN, std=STD)


def test_plain_module_needs_size_mean_and_std(folders):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ConfigError, match=r"--image-size, --mean, --std; missing: mean, std"):
        image_batches(folders["flat"], model, image_size=16)
    with pytest.raises(ConfigError, match="--image-size"):
        image_batches(folders["flat"])
    batches = _tree_batches(folders, model, batch_size=4, image_size=16, mean=MEAN, std=STD)
    out = list(batches)
    assert [b.shape for b in out] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    # a one-colour image: every pixel is (colour / 255 - mean) / std
    solid = folders["flat"].parent / "solid"
    solid.mkdir()
    Image.new("RGB", (30, 20), (255, 0, 51)).save(solid / "x.png")
    (pixels,) = image_batches(solid, model, image_size=8, mean=MEAN, std=STD)
    want = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(pixels, want.view(1, 3, 1, 1).expand(1, 3, 8, 8))
    for bad, words in [
        ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
        ({"std": (0.5, 0.0, 1.0)}, "std must be positive"),
        ({"image_size": 0}, "image_size must be a positive integer"),
    ]:
        with pytest.raises(ConfigError, match=words):
            image_batches(solid, model, **{"image_size": 8, "mean": MEAN, "std": STD, **bad})


def test_num_samples_and_shuffle(folders):
    opts = {"image_size": 8, "mean": MEAN, "std": STD, "batch_size": 2}
    names = [p.name for p in image_batches(folders["flat"], **opts).files]
    assert names == [f"img{i}.{'png' if i % 2 else 'jpg'}" for i in range(5)]
    assert len(image_batches(folders["flat"], num_samples=3, **opts)) == 2
    assert len(image_batches(folders["flat"], num_samples=99, **opts).files) == 5
    shuffled = [
        [p.name for p in image_batches(folders["flat"], shuffle=True, seed=s, **opts).files]
        for s in (0, 0, 1)
    ]
    assert shuffled[0] == shuffled[1] and sorted(shuffled[0]) == names
    assert shuffled[0] != names or shuffled[2] != names
    subset = image_batches(folders["flat"], shuffle=True, seed=0, num_samples=2, **opts)
    assert [p.name for p in subset.files] == shuffled[0][:2]
    with pytest.raises(ConfigError, match="num_samples must be a positive integer"):
        image_batches(folders["flat"], num_samples=0, **opts)


def test_unreadable_folders(tmp_path):
    opts = {"image_size": 8, "mean": MEAN, "std": STD}
    with pytest.raises(DataError, match="image folder not found"):
        image_batches(tmp_path / "nope", **opts)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        image_batches(tmp_path / "empty", **opts)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    (tmp_path / "text" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"none of its 2 file\(s\) is an image PIL can read"):
        image_batches(tmp_path / "text", **opts)


def test_open_data_dispatches_on_what_the_path_is(folders, tmp_path):
    save_file({"x": torch.randn(10, 3, 8, 8)}, str(tmp_path / "x.safetensors"))
    tensors = open_data(tmp_path / "x.safetensors", batch_size=4)
    assert [b.shape[0] for b in tensors] == [4, 4, 2]
    images = open_data(folders["flat"], batch_size=4, image_size=8, mean=MEAN, std=STD)
    assert isinstance(images, evagraph.data.ImageBatches) and len(images) == 2
    with pytest.raises(ConfigError, match="--image-size, --shuffle: not an option for a file"):
        open_data(tmp_path / "x.safetensors", batch_size=4, image_size=8, shuffle=True)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*evagraph_cmd(), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_cli_compiles_a_timm_model_on_an_image_folder(folders, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False).eval()
    save_file(model.state_dict(), str(tmp_path / "rn.safetensors"))
    proc = run(
        "compile", "resnet10t", "--checkpoint", "rn.safetensors", "--data", str(folders["tree"]),
        "--budget", "8", "--batch-size", "2", "-o", "out", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 file(s)" in proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"] == 3 and any(layer["rank"] for layer in report["layers"])
    assert "3 minibatch(es)" in proc.stdout


def test_cli_image_options(folders, tmp_path, example, monkeypatch):
    from click.testing import CliRunner

    from evagraph.cli import main

    def cli(*args: str):  # in process: quicker than a subprocess per case
        return CliRunner().invoke(main, ["compile", *args, "-q"])

    def error(result) -> str:
        assert result.exit_code != 0, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert "Traceback" not in result.output and len(lines) == 1, result.output
        return lines[0]

    monkeypatch.chdir(tmp_path)
    pt2, data = str(example / "tiny_cnn.pt2"), str(example / "calib.safetensors")
    flat = str(folders["flat"])
    words = error(cli(pt2, "--data", flat, "-o", "o1"))
    assert "give image_size, mean and std (--image-size, --mean, --std" in words
    words = error(cli(pt2, "--data", data, "--image-size", "8", "--shuffle", "-o", "o2"))
    assert "--image-size, --shuffle: not an option for a file of tensors" in words
    assert "--num-samples" in error(cli(pt2, "--state", data, "--num-samples", "3", "-o", "o3"))
    assert "'--mean': expected three numbers R,G,B" in error(cli(pt2, "--mean", "1,2", "-o", "o"))
    assert "'--std': must be positive" in error(cli(pt2, "--std", "1,0,1", "-o", "o"))
    assert "'--std': expected three" in error(cli(pt2, "--std", "1,nan,1", "-o", "o"))
    assert not any(tmp_path.iterdir())
    # a .pt2 of 32 x 32 images, with the preprocessing given; shuffled, 4 of the 5 images
    result = cli(
        pt2, "--data", flat, "--image-size", "32", "--mean", "0.5,0.5,0.5",
        "--std", "0.25,0.25,0.25", "--num-samples", "4", "--shuffle", "--batch-size", "2",
        "--budget", "2", "-o", "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"] == 2
    assert (tmp_path / "out" / "model.pt2").is_file()  # exported with a decoded batch


def test_cli_hf_directory_uses_its_image_processor(folders, vit_dir, tmp_path):
    from click.testing import CliRunner

    from evagraph.cli import main

    out = tmp_path / "out"
    args = ["compile", str(vit_dir), "--data", str(folders["flat"]), "--batch-size", "2"]
    result = CliRunner().invoke(main, [*args, "--budget", "2", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["steps"] == 3


def test_data_package_exports():
    assert evagraph.data.image_batches is image_batches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "image_batches" in evagraph.data.__all__
