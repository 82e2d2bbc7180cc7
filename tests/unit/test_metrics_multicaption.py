"""Several captions per image, the retrieval tie rule in float32 / float64, clip_benchmark's recall, robust
normalisation and malformed inputs of the geometry metrics (issue 11 points 3, issue 12 items 8 and 10)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from open_clip_sigrel.metrics.geometry import geometry_metrics


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _multi(seed=0, n=12, d=8):
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((n, d)))
    counts = rng.integers(1, 4, size=n)
    owner = np.repeat(np.arange(n), counts)
    y = _unit(x[owner] + 0.8 * rng.standard_normal((owner.size, d)))
    return x, y, owner


def _dense_reference(x, y, owner, t, logit_bias):
    """Every multi-caption metric straight from the N x M float64 matrix."""
    s = x @ y.T
    n, m = s.shape
    posmask = np.zeros_like(s, dtype=bool)
    posmask[owner, np.arange(m)] = True
    neg = s[~posmask]
    pos = s[owner, np.arange(m)]
    best = np.array([pos[owner == i].max() for i in range(n)])
    i2t = np.array([(s[i][~posmask[i]] > best[i]).sum() for i in range(n)])
    t2i = np.array([(s[:, j][~posmask[:, j]] > pos[j]).sum() for j in range(m)])
    b_rel = -logit_bias / t
    z = t * (s - b_rel)
    loss = (np.logaddexp(0, z[~posmask]).sum() + np.logaddexp(0, -z[posmask]).sum()) / m
    mx, my = x.mean(0), y.mean(0)
    diff = x[owner] - y
    zc = diff - diff.mean(0)
    return {
        "n_pairs": m, "n_images": n,
        "pos_sim_mean": pos.mean(), "neg_sim_mean": neg.mean(),
        "margin_worst": (pos.min() - neg.max()) / 2, "rel_bias_worst": (pos.min() + neg.max()) / 2,
        "margin_trimmed": (np.percentile(pos, 5) - np.percentile(neg, 95)) / 2,
        "pos_violations": int((pos < b_rel).sum()), "neg_violations": int((neg > b_rel).sum()),
        "xi": (zc * zc).sum(1).mean(), "gap_l2m": np.linalg.norm(mx - my),
        "gap_l2i": np.linalg.norm(diff, axis=1).mean(), "alignment": (diff * diff).sum(1).mean(),
        "cone_image": (x @ x.T)[~np.eye(n, dtype=bool)].mean(), "cone_text": (y @ y.T)[~np.eye(m, dtype=bool)].mean(),
        "image_to_text_R@1": (i2t < 1).mean(), "image_to_text_R@5": (i2t < 5).mean(),
        "text_to_image_R@1": (t2i < 1).mean(), "text_to_image_R@5": (t2i < 5).mean(),
        "image_to_text_mean_rank": i2t.mean() + 1, "text_to_image_mean_rank": t2i.mean() + 1,
        "sigmoid_loss": loss,
    }


@pytest.mark.parametrize("chunk", [None, 3])
def test_multi_caption_metrics_equal_the_dense_float64_computation(chunk):
    x, y, owner = _multi()
    t, lb = 7.0, -2.1
    got = geometry_metrics(x, y, t, lb, chunk_size=chunk, text_image=owner)
    want = _dense_reference(x, y, owner, t, lb)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-10, abs=1e-12), k


def test_single_caption_per_image_as_text_image_equals_the_paired_call():
    rng = np.random.default_rng(3)
    x, y = _unit(rng.standard_normal((20, 6))), _unit(rng.standard_normal((20, 6)))
    a = geometry_metrics(x, y, 5.0, -1.0)
    b = geometry_metrics(x, y, 5.0, -1.0, text_image=np.arange(20))
    b.pop("n_images")
    assert a.keys() == b.keys()
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-15), k


def test_multi_caption_bad_owner_index_is_a_clear_error():
    x, y, owner = _multi()
    with pytest.raises(ValueError, match="image 0 has no caption"):
        geometry_metrics(x, y[owner != 0], text_image=owner[owner != 0])
    with pytest.raises(ValueError, match="one image index per caption"):
        geometry_metrics(x, y, text_image=owner[:-1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 12\)"):
        geometry_metrics(x, y, text_image=np.where(owner == 3, 12, owner))


# ------------------------------------------------------------------------------------- tie rule
def _ranks_from_gram(gram, a, b):
    """i2t / t2i counts when x_i = base_a[a_i], y_j = base_b[b_j]: s_ij = gram[a_i, b_j], ties exact."""
    s = gram[a][:, b]
    pos = np.diag(s)
    return (s > pos[:, None]).sum(1), (s > pos[None, :]).sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recall_follows_ties_favour_the_match_on_four_base_vectors(dtype):
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((4, 16)))
    a, b = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    bt = torch.tensor(base, dtype=dtype)
    x, y = bt[a], bt[b]
    gram = (bt.double() @ bt.double().T).numpy()  # the exact values of the stored vectors' products
    i2t, t2i = _ranks_from_gram(gram, a, b)
    got = geometry_metrics(x, y, metrics="retrieval")
    for k in (1, 5):
        assert got[f"image_to_text_R@{k}"] == (i2t < k).mean()
        assert got[f"text_to_image_R@{k}"] == (t2i < k).mean()
    assert got["image_to_text_mean_rank"] == pytest.approx(i2t.mean() + 1, rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recall_follows_the_tie_rule_with_duplicated_captions(dtype):
    rng = np.random.default_rng(1)
    imgs = torch.tensor(_unit(rng.standard_normal((500, 32))), dtype=dtype)
    caps = torch.tensor(_unit(rng.standard_normal((60, 32))), dtype=dtype)
    c = rng.integers(0, 60, 500)  # 500 texts from 60 captions: many duplicates
    y = caps[c]
    s = (imgs.double() @ caps.double().T).numpy()[:, c]  # s_ij by caption identity: ties exact
    pos = np.diag(s)
    want_i2t, want_t2i = (s > pos[:, None]).sum(1), (s > pos[None, :]).sum(0)
    got = geometry_metrics(imgs, y, metrics="retrieval", chunk_size=128)
    assert got["image_to_text_R@1"] == (want_i2t < 1).mean()
    assert got["image_to_text_R@10"] == (want_i2t < 10).mean()
    assert got["text_to_image_R@1"] == (want_t2i < 1).mean()


def test_recall_counts_near_ties_that_are_truly_higher():
    """Unmatched similarities above the match by less than float32's rounding of the tile (1e-6 at d = 256)
    are decided by the float64 kernel: counted exactly as a float64 product of the stored vectors says."""
    rng = np.random.default_rng(4)
    x = torch.tensor(_unit(rng.standard_normal((300, 256))), dtype=torch.float32)
    y = _unit(rng.standard_normal((300, 256)))
    for _ in range(150):  # caption j: a copy of caption i nudged towards / away from image i
        i, j = rng.choice(300, 2, replace=False)
        y[j] = _unit((y[i] + rng.choice([-1, 1]) * rng.uniform(2e-7, 5e-6) * x[i].double().numpy())[None])[0]
    y = torch.tensor(y, dtype=torch.float32)
    s = x.double() @ y.double().T
    pos = s.diag()
    want_i2t, want_t2i = (s > pos[:, None]).sum(1), (s > pos[None, :]).sum(0)
    got = geometry_metrics(x, y, metrics="retrieval")
    assert got["image_to_text_mean_rank"] == float(want_i2t.double().mean()) + 1
    assert got["text_to_image_mean_rank"] == float(want_t2i.double().mean()) + 1
    assert got["image_to_text_R@1"] == float((want_i2t < 1).double().mean())


# ------------------------------------------------------------------------------- clip_benchmark
def _clip_benchmark(x, y, owner, ks=(1, 5, 10)):
    """clip_benchmark's own recall code on the same embeddings (its evaluate() after encoding)."""
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval", reason="clip-benchmark (the benchmark extra)")
    scores = y @ x.t()
    positive = torch.zeros_like(scores, dtype=bool)
    positive[torch.arange(len(scores)), torch.as_tensor(owner)] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores, positive, 64, "cpu", k=k) > 0
                                              ).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (zr.batchify(zr.recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0
                                             ).float().mean().item()
    return out


@pytest.mark.parametrize("case", ["random", "ties"])
def test_clip_benchmark_keys_reproduce_clip_benchmark(case):
    rng = np.random.default_rng(5)
    if case == "random":
        xn, yn, owner = _multi(seed=2, n=40, d=8)
    else:  # four base vectors: topk's tie order decides
        base = _unit(rng.standard_normal((4, 8)))
        owner = np.repeat(np.arange(40), rng.integers(1, 4, size=40))
        xn, yn = base[rng.integers(0, 4, 40)], base[rng.integers(0, 4, owner.size)]
    x, y = torch.tensor(xn, dtype=torch.float32), torch.tensor(yn, dtype=torch.float32)
    got = geometry_metrics(x, y, metrics="clip_benchmark", text_image=owner)
    want = _clip_benchmark(x, y, owner)
    assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6)
    if case == "random":  # no ties: our documented rule gives the same numbers under our names
        ours = geometry_metrics(x, y, metrics="retrieval", text_image=owner)
        for k in (1, 5, 10):
            assert ours[f"text_to_image_R@{k}"] == pytest.approx(want[f"image_retrieval_recall@{k}"], rel=1e-6)
            assert ours[f"image_to_text_R@{k}"] == pytest.approx(want[f"text_retrieval_recall@{k}"], rel=1e-6)


# ------------------------------------------------------------------------ scale and bad inputs
@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300])
def test_rows_of_extreme_scale_give_the_metrics_of_the_unit_rows(scale):
    rng = np.random.default_rng(7)
    x, y = _unit(rng.standard_normal((30, 5))), _unit(rng.standard_normal((30, 5)))
    want = geometry_metrics(x, y, metrics=("margins", "retrieval", "gap"))
    got = geometry_metrics(x * scale, y / scale if scale > 1 else y * scale, metrics=("margins", "retrieval", "gap"))
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-14), k


@pytest.mark.parametrize("bad, match", [
    (np.array([["a", "b"], ["c", "d"]]), "numeric array, got dtype <U1"),
    (np.zeros(2, dtype=[("a", "f4"), ("b", "f4")]), "numeric array"),
    (np.array([[1.0, None], [2.0, 3.0]], dtype=object), "numeric array, got dtype object"),
    (np.zeros((2, 2, 2)), "must be 2-D"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or Inf"),
    (np.ones((3, 2)), "same shape"),
])
def test_malformed_features_raise_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        geometry_metrics(bad, np.eye(2))


def test_geometry_metric_with_several_captions_per_image_equals_the_one_shot_call():
    """Updates of unequal sizes, each with its own captions (owners within the update), and a merge."""
    from open_clip_sigrel.metrics import GeometryMetric

    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 5, generator=g, dtype=torch.float64)
    owner = torch.repeat_interleave(torch.arange(17), 1 + torch.arange(17) % 3)
    y = x[owner] + 0.7 * torch.randn(owner.numel(), 5, generator=g, dtype=torch.float64)
    want = geometry_metrics(x, y, 8.0, -2.0, text_image=owner)
    a, b = GeometryMetric(logit_scale=8.0, logit_bias=-2.0), GeometryMetric(logit_scale=8.0, logit_bias=-2.0)
    for lo, hi, m in ((0, 6, a), (6, 7, a), (7, 17, b)):
        mine = (owner >= lo) & (owner < hi)
        m.update(x[lo:hi], y[mine], text_image=owner[mine] - lo)
    assert a.merge(b).compute() == want
    assert a.n_pairs == owner.numel()
    with pytest.raises(ValueError, match="has no caption"):
        GeometryMetric().update(x[:3], y[:2], text_image=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="need text_image"):
        GeometryMetric().update(x[:3], y[:2])
