"""Adapter analysis from the LoRA paper (§7.2): how much two adapters' subspaces overlap.

For the A matrices of two adapters (r1 x d and r2 x d, same module of the same base),
take the right-singular vectors V1, V2 (A = U S V^T). The normalized subspace similarity

    phi(A1, A2, i, j) = || V1[:, :i]^T V2[:, :j] ||_F^2 / min(i, j)   in [0, 1]

is 1 when the top-i directions of one lie inside the top-j of the other and about
i*j/d for unrelated random subspaces. The paper finds the top directions of r=8 and r=64
adapters overlap strongly (phi > 0.5 at i = 1), so a small r already holds what matters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def right_singular_vectors(a: torch.Tensor) -> np.ndarray:
    """Columns: the right-singular vectors of A (r x d), most significant first (d x r)."""
    _, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return vh.T.numpy()


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> np.ndarray:
    """phi[i-1, j-1] for every 1 <= i <= r1, 1 <= j <= r2."""
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A matrices act on different input sizes: {tuple(a1.shape)} vs {tuple(a2.shape)}")
    v1, v2 = right_singular_vectors(a1), right_singular_vectors(a2)
    overlap = (v1.T @ v2) ** 2  # r1 x r2, squared cosines between directions
    # ||V1[:, :i]^T V2[:, :j]||_F^2 = sum of the top-left i x j block: 2-D cumulative sums
    block = overlap.cumsum(axis=0).cumsum(axis=1)
    sizes = np.minimum.outer(np.arange(1, overlap.shape[0] + 1), np.arange(1, overlap.shape[1] + 1))
    return block / sizes


def lora_a_matrices(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Module name -> its lora_A weight (r x d_in), read from the adapter's safetensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return {key.split(".lora_A")[0]: value for key, value in tensors.items() if ".lora_A" in key}


def compare_adapters(dir1: Path, dir2: Path, module: str | None = None) -> dict[str, np.ndarray]:
    """phi for every module both adapters adapt (optionally only names containing `module`), in model order."""
    a1, a2 = lora_a_matrices(dir1), lora_a_matrices(dir2)
    shared = [name for name in a1 if name in a2 and (module is None or module in name)]
    if not shared:
        hint = f" containing {module!r}" if module else ""
        raise ValueError(f"the two adapters share no adapted module{hint}; they must adapt the same base modules")
    return {name: subspace_similarity(a1[name], a2[name]) for name in shared}


def similarity_png(phi: np.ndarray, title: str, labels: tuple[str, str], path: Path) -> Path:
    """The paper's Figure 3 view: phi over i (rows) and j (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(12.0, 3.5 + 0.12 * phi.shape[1]), 3.2 + 0.12 * phi.shape[0]))
    image = ax.imshow(phi, cmap="magma", vmin=0, vmax=1, aspect="auto", origin="upper",
                      extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
    ax.set_xlabel("j (top directions of A2)")
    ax.set_ylabel("i (top directions of A1)")
    ax.set_title(f"{title}\nA1 = {labels[0]}\nA2 = {labels[1]}", fontsize=8)
    fig.colorbar(image, ax=ax, label="phi(i, j)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
