"""The compile as a real process: interrupted mid-calibration it leaves nothing behind; run
twice with the same inputs and seed it writes byte-identical adapters."""

import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from conftest import evagraph_cmd
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    # Many one-image batches and a min-batches bound no layer can meet: calibration runs
    # until interrupted (tens of seconds), whatever the machine's speed.
    path = tmp_path_factory.mktemp("long") / "long.safetensors"
    save_file({"x": torch.randn(4000, 3, 32, 32)}, str(path))
    return path


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_compile_leaves_nothing(example, long_data, tmp_path, sig, code):
    out = tmp_path / "out"
    args = ["--data", str(long_data), "--batch-size", "1"]
    args += ["--min-batches", "100000"]
    cmd = [*evagraph_cmd(), "compile", str(example / "tiny_cnn.pt2"), *args, "-o", str(out)]
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT:
    # restore the default so that the test sees what Ctrl-C does, however pytest was started.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint)  # fmt: skip
    # Wait until the progress bar has counted a few batches: we are mid-calibration.
    seen, started = bytearray(), threading.Event()

    def read() -> None:
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)
            counts = re.findall(rb"\| *(\d+)/4000", seen)
            if counts and int(counts[-1]) >= 5:
                started.set()
        started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), "calibration did not start"
    assert proc.poll() is None, seen.decode(errors="replace")
    temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert temporaries, "the compile writes into a temporary directory while it runs"
    proc.send_signal(sig)
    assert proc.wait(120) == code
    reader.join(10)
    text = seen.decode(errors="replace")
    assert "Traceback" not in text
    assert "nothing was written" in text
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.slow
def test_same_inputs_and_seed_give_byte_identical_adapters(example, tmp_path):
    def compile_to(name: str) -> bytes:
        out = tmp_path / name
        subprocess.run(
            [
                *evagraph_cmd(),
                "compile",
                str(example / "tiny_cnn.pt2"),
                "--data",
                str(example / "calib.safetensors"),
                "--seed",
                "3",
                "--format",
                "safetensors",
                "-q",
                "-o",
                str(out),
            ],  # fmt: skip
            check=True,
            capture_output=True,
        )
        return (out / "adapter.safetensors").read_bytes()

    first, second = compile_to("a"), compile_to("b")
    assert first == second
