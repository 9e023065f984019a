"""`make gpu-check` (bench/gpu_check.py): its CPU-side parts, so the command is ready when a GPU comes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.support.configs import REPO


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_it_skipped_writes_the_json_and_exits_0(tmp_path: Path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the checks themselves")
    module = gpu_check()
    out = tmp_path / "gpu.json"
    assert module.main(["--out", str(out), "--steps", "3"]) == 0
    assert "gpu-check: skipped: no CUDA device" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["skipped"] is True and written["checks"] == {}
    assert written["environment"]["torch"] == torch.__version__ and written["args"]["steps"] == "3"
    assert not list(tmp_path.glob("*.partial"))


def test_arguments_table_and_json(tmp_path: Path):
    module = gpu_check()
    args = module.parse_args(["--only", "one_load", "qlora_vs_lora", "--steps", "5"])
    assert args.only == ["one_load", "qlora_vs_lora"] and args.steps == 5 and args.out == module.DEFAULT_OUT
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--steps", "1"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        module.parse_args(["--only", "nope"])
    results = {"environment": {"gpu": "X"}, "skipped": False, "checks": {
        "qlora_vs_lora": {"status": "ok", "lora_bf16_peak_gib": 1.25, "qlora_nf4_dq_peak_gib": 0.5, "seconds": 12.0},
        "zero3_offload": {"status": "failed", "error": "Traceback ...\nRuntimeError: NCCL error", "seconds": 3.0}}}
    text = module.table(results)
    assert "qlora_vs_lora    ok      lora_bf16_peak_gib 1.25, qlora_nf4_dq_peak_gib 0.5" in text
    assert "zero3_offload    failed" in text and "RuntimeError: NCCL error" in text
    path = module.write(results, tmp_path / "deep" / "gpu.json")
    assert json.loads(path.read_text()) == results
