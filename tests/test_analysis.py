"""Subspace similarity phi (LoRA paper §7.2): the math, and the command on real adapters from MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import analysis, tracking
from pipeline.config import load_config
from tests.support.configs import REPO, minilm_config, write_yaml
from tests.test_export import train_adapter


def brute_force_phi(a1: torch.Tensor, a2: torch.Tensor, i: int, j: int) -> float:
    v1, v2 = analysis.right_singular_vectors(a1), analysis.right_singular_vectors(a2)
    return float(np.linalg.norm(v1[:, :i].T @ v2[:, :j], "fro") ** 2 / min(i, j))


def test_phi_matches_its_definition_and_bounds():
    generator = torch.Generator().manual_seed(0)
    a1, a2 = torch.randn(8, 384, generator=generator), torch.randn(64, 384, generator=generator)
    phi = analysis.subspace_similarity(a1, a2)
    assert phi.shape == (8, 64)
    for i, j in ((1, 1), (3, 7), (8, 64), (8, 8)):
        assert phi[i - 1, j - 1] == pytest.approx(brute_force_phi(a1, a2, i, j), abs=1e-10)
    assert phi.min() >= 0 and phi.max() <= 1 + 1e-12
    assert phi[0, 0] < 0.05  # unrelated random directions in 384 dims: about 1/384
    # same row space, other basis: the whole subspace coincides
    mix = torch.randn(8, 8, generator=generator)
    assert analysis.subspace_similarity(a1, mix @ a1)[-1, -1] == pytest.approx(1.0)
    assert np.allclose(np.diag(analysis.subspace_similarity(a1, a1)), 1.0)
    with pytest.raises(ValueError, match="different input sizes"):
        analysis.subspace_similarity(a1, torch.randn(4, 128))


def test_similarity_command_on_adapters_from_mlflow_and_a_folder(tmp_path: Path, sst2_small):
    adapters = {}
    for r in (4, 8):
        cfg = load_config(write_yaml(tmp_path / f"c{r}.yaml", minilm_config(tmp_path, sst2_small, lora={"r": r})), env={})
        adapters[r] = train_adapter(cfg, tmp_path / f"adapter-r{r}", steps=4)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(client, "phi", uri)
    run_id = client.create_run(experiment_id).info.run_id
    for name in tracking.ADAPTER_FILES[:2]:
        client.log_artifact(run_id, str(adapters[4] / name), "adapter")

    out = tmp_path / "phi.png"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "similarity", f"runs:/{run_id}/adapter", str(adapters[8]),
         "--module", "query", "--tracking-uri", uri, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 x 8" in result.stdout and "layer.5.attention.self.query" in result.stdout
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"

    phis = analysis.compare_adapters(adapters[4], adapters[8], "query")
    assert len(phis) == 6 and all(p.shape == (4, 8) for p in phis.values())

    bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "similarity", str(adapters[4]), "nope:/x"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "neither an adapter folder" in bad.stderr and "Traceback" not in bad.stderr
