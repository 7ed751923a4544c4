"""Scoring: the density head, the paper recipe against the RD formula (scipy blur), top-k, the checkpoint round trip."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from training.scoring import (
    PAPER_RECIPE,
    AnomalyScorer,
    Blur,
    ChannelStats,
    DensityHead,
    FusedScorer,
    ScoreRecipe,
    UpBlur,
    build_scoring,
    scoring_state,
)

CH = (4, 6, 8)
SIZE = (64, 64)


def _feats(n: int, size: tuple[int, int] = SIZE, shift: float = 0.0, seed: int = 0) -> list[torch.Tensor]:
    """Random per-scale features ``(n, C_k, H/s, W/s)`` for strides 4, 8, 16."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, c, size[0] // s, size[1] // s, generator=g) + shift for c, s in zip(CH, (4, 8, 16), strict=True)
    ]


def _recon(feats: list[torch.Tensor], noise: float = 0.5, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [f + noise * torch.randn(f.shape, generator=g) for f in feats]


def _paper_formula(feats: list[torch.Tensor], recon: list[torch.Tensor], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """The RD paper's map: sum of upsampled ``1 - cos`` maps, scipy Gaussian blur (float64), score = max."""
    h, w = feats[0].shape[2] * 4, feats[0].shape[3] * 4
    total = sum(
        F.interpolate(
            (1 - F.cosine_similarity(f, d, dim=1)).unsqueeze(1), size=(h, w), mode="bilinear", align_corners=True
        )
        for f, d in zip(feats, recon, strict=True)
    )
    raw = total[:, 0].double().numpy()
    blurred = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in raw])
    return blurred, blurred.reshape(len(blurred), -1).max(axis=1)


def test_density_head_output_shape_and_grid() -> None:
    size = (64, 96)  # not square: the grid is (H/8, W/8)
    head = DensityHead(CH, size, dims=8).fit(_feats(20, size))
    out = head(*_feats(3, size, seed=5))
    assert out.shape == (3, 1, 8, 12) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()


def test_density_head_is_small_on_training_like_features_and_large_on_shifted_ones() -> None:
    head = DensityHead(CH, SIZE, dims=8).fit(_feats(80))
    same = head(*_feats(10, seed=7))  # the training distribution, other samples
    shifted = head(*_feats(10, shift=4.0, seed=7))
    # a d-dim standard Gaussian is at Mahalanobis distance ~ sqrt(d) = 2.8 from its mean
    assert 1.5 < float(same.mean()) < 5.0
    assert float(shifted.mean()) > 2 * float(same.mean())
    assert float(shifted.min()) > float(same.median())


def test_density_head_is_the_mahalanobis_distance_of_its_own_gaussian() -> None:
    """Rebuild one position's Gaussian in numpy from the head's embedding and PCA basis, compare the distances."""
    train = _feats(40)
    head = DensityHead(CH, SIZE, dims=6).fit(train, shrink=0.01)
    basis, center = head.basis.double().numpy(), head.center.double().numpy()  # (d, C), (C, 1)
    y = np.einsum("dc,ncp->ndp", basis, head.embed(*train).double().numpy() - center)  # (N, d, P)
    test = _feats(4, seed=3)
    got = head(*test).flatten(1).double().numpy()  # (B, P)
    yt = np.einsum("dc,bcp->bdp", basis, head.embed(*test).double().numpy() - center)
    for p in (0, 27, 63):
        cov = np.cov(y[:, :, p].T)
        cov += 0.01 * np.mean(np.diag(cov)) * np.eye(6)
        diff = yt[:, :, p] - y[:, :, p].mean(0)
        want = np.sqrt(np.einsum("bd,de,be->b", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(got[:, p], want, rtol=1e-3)


@pytest.mark.parametrize("pool", ["cov", "both"])
def test_pooled_density_head_is_the_gaussian_of_the_neighbourhood_samples(pool: str) -> None:
    """``window=3``: rebuild an interior and a corner position's Gaussian from its neighbours' samples in numpy."""
    train = _feats(30)
    head = DensityHead(CH, SIZE, dims=5).fit(train, shrink=0.01, window=3, pool=pool)
    plain = DensityHead(CH, SIZE, dims=5).fit(train, shrink=0.01)
    np.testing.assert_allclose(head.basis.numpy(), plain.basis.numpy(), atol=1e-6)  # the PCA is global: unchanged
    basis, center = head.basis.double().numpy(), head.center.double().numpy()
    y = np.einsum("dc,ncp->ndp", basis, head.embed(*train).double().numpy() - center).reshape(30, 5, 8, 8)
    test = _feats(3, seed=4)
    got = head(*test)[:, 0].double().numpy()  # (B, 8, 8)
    yt = np.einsum("dc,bcp->bdp", basis, head.embed(*test).double().numpy() - center).reshape(3, 5, 8, 8)
    for i, j in ((4, 5), (0, 0)):
        hood = [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if 0 <= a < 8 and 0 <= b < 8]
        if pool == "cov":  # each neighbour's own scatter, averaged; the position keeps its own mean
            cov = np.mean([np.cov(y[:, :, a, b].T) for a, b in hood], axis=0)
            mean = y[:, :, i, j].mean(0)
        else:  # every neighbour's samples as one set
            samples = np.concatenate([y[:, :, a, b] for a, b in hood])
            mean = samples.mean(0)
            cov = np.cov(samples.T, bias=True) * 30 / 29
        cov += 0.01 * np.mean(np.diag(cov)) * np.eye(5)
        diff = yt[:, :, i, j] - mean
        want = np.sqrt(np.einsum("bd,de,be->b", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(got[:, i, j], want, rtol=1e-3)
    assert not np.allclose(got, plain(*test)[:, 0].numpy(), rtol=1e-2)  # pooling changed the map
    with pytest.raises(ValueError, match="pool"):
        DensityHead(CH, SIZE, dims=5).fit(train, window=3, pool="mean")


def test_ledoit_wolf_shrinkage_matches_scikit_learn() -> None:
    from sklearn.covariance import ledoit_wolf

    train = _feats(25)
    head = DensityHead(CH, SIZE, dims=6).fit(train, shrink="lw")
    basis, center = head.basis.double().numpy(), head.center.double().numpy()
    y = np.einsum("dc,ncp->ndp", basis, head.embed(*train).double().numpy() - center)  # (N, d, P)
    test = _feats(3, seed=8)
    got = head(*test).flatten(1).double().numpy()
    yt = np.einsum("dc,bcp->bdp", basis, head.embed(*test).double().numpy() - center)
    for p in (0, 40):
        cov, rho = ledoit_wolf(y[:, :, p])
        assert abs(float(head.lw_rho[p]) - rho) < 1e-4
        diff = yt[:, :, p] - y[:, :, p].mean(0)
        want = np.sqrt(np.einsum("bd,de,be->b", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(got[:, p], want, rtol=1e-3)
    with pytest.raises(ValueError, match="window=1"):
        DensityHead(CH, SIZE, dims=6).fit(train, shrink="lw", window=3)


@pytest.mark.parametrize("size", [(64, 64), (32, 48)])
def test_paper_recipe_is_the_rd_formula(size: tuple[int, int]) -> None:
    feats = _feats(2, size)
    recon = _recon(feats)
    want_map, want_score = _paper_formula(feats, recon, sigma=4.0)
    dens = torch.rand(2, 1, size[0] // 8, size[1] // 8) * 100  # weight 0: must not change anything
    for amap, score in (
        AnomalyScorer(size, 4.0)(*feats, *recon),
        AnomalyScorer(size, 4.0, PAPER_RECIPE)(*feats, *recon),
        FusedScorer(size, 4.0, PAPER_RECIPE)(*feats, *recon, dens),
        build_scoring(None, CH, size, 4.0)(feats, recon),
    ):
        assert amap.shape == (2, 1, *size) and score.shape == (2,)
        np.testing.assert_allclose(amap[:, 0].numpy(), want_map, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(score.numpy(), want_score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("grid", "out", "align", "sigma"),
    [
        ((104, 40), (416, 160), True, 4.0),
        ((52, 20), (416, 160), False, 4.0),
        ((7, 5), (29, 23), True, 4.0),  # a radius of 16 larger than the map: the reflection wraps more than once
        ((16, 16), (64, 64), False, 0.0),
        ((13, 9), (13, 9), True, 2.0),
    ],
)
def test_upblur_is_the_blur_of_the_bilinear_upsample(grid, out, align, sigma) -> None:
    m = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(3))
    want = Blur(out, sigma)(F.interpolate(m, size=out, mode="bilinear", align_corners=align))
    got = UpBlur(out, sigma)(m, align)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(UpBlur(out, sigma)(m, align, 0.25), 0.25 * want, rtol=1e-5, atol=1e-6)


def test_fused_map_is_the_blurred_blend_of_both_normalised_maps() -> None:
    feats = _feats(2, seed=5)
    recon = _recon(feats)
    dens = torch.rand(2, 1, SIZE[0] // 8, SIZE[1] // 8) * 10
    recipe = ScoreRecipe(weights=(0.0, 1.0, 1.0), density_weight=0.75, rd_norm=(0.3, 0.2), density_norm=(4.0, 2.5))
    amap, _ = FusedScorer(SIZE, 4.0, recipe)(*feats, *recon, dens)
    up = sum(
        w
        * F.interpolate((1 - F.cosine_similarity(f, d, dim=1)).unsqueeze(1), SIZE, mode="bilinear", align_corners=True)
        for w, f, d in zip(recipe.weights, feats, recon, strict=True)
    )
    dmap = F.interpolate(dens, SIZE, mode="bilinear", align_corners=False)
    want = Blur(SIZE, 4.0)(0.25 * (up - 0.3) / 0.2 + 0.75 * (dmap - 4.0) / 2.5)
    torch.testing.assert_close(amap, want, rtol=1e-5, atol=1e-5)


def test_topk_reduction_is_the_mean_of_the_top_one_percent() -> None:
    feats = _feats(3)
    recon = _recon(feats)
    amap, score = AnomalyScorer(SIZE, 4.0, ScoreRecipe(reduction="topk"))(*feats, *recon)
    flat = np.sort(amap.flatten(1).numpy(), axis=1)[:, ::-1]
    k = round(0.01 * SIZE[0] * SIZE[1])  # 41 of 4096 pixels
    np.testing.assert_allclose(score.numpy(), flat[:, :k].mean(axis=1), rtol=1e-6)
    assert (score.numpy() < flat[:, 0]).all()  # not the max: the top-1% mean lies below it
    paper = AnomalyScorer(SIZE, 4.0)(*feats, *recon)
    torch.testing.assert_close(paper[0], amap)  # the reduction changes the score only


def test_weights_standardisation_and_norm_follow_the_recipe() -> None:
    train = _feats(20)
    stats = ChannelStats(CH).fit(train)
    feats = _feats(2, seed=4)
    recon = _recon(feats)
    recipe = ScoreRecipe(weights=(0.0, 1.0, 0.5), standardize=True, rd_norm=(0.2, 0.5))
    amap, _ = AnomalyScorer(SIZE, 0.0, recipe, stats)(*feats, *recon)

    def std(x: torch.Tensor, k: int) -> torch.Tensor:
        return (x - train[k].mean((0, 2, 3), keepdim=True)) / train[k].std((0, 2, 3), keepdim=True)

    z, zr = [std(f, k) for k, f in enumerate(feats)], [std(d, k) for k, d in enumerate(recon)]
    up = [
        F.interpolate((1 - F.cosine_similarity(a, b, dim=1)).unsqueeze(1), SIZE, mode="bilinear", align_corners=True)
        for a, b in zip(z, zr, strict=True)
    ]
    torch.testing.assert_close(amap, (up[1] + 0.5 * up[2] - 0.2) / 0.5, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="standardize"):
        AnomalyScorer(SIZE, 4.0, recipe)


def _round_trip(state: dict) -> dict:
    """Through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint stores it."""
    buf = io.BytesIO()
    torch.save({"scoring": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["scoring"]


def test_scoring_state_round_trip_gives_identical_outputs() -> None:
    train = _feats(30)
    stats, density = ChannelStats(CH).fit(train), DensityHead(CH, SIZE, dims=8).fit(train)
    feats = _feats(3, seed=9)
    recon = _recon(feats)
    fused = ScoreRecipe(
        weights=(0.0, 1.0, 1.0),
        standardize=True,
        reduction="topk",
        density_weight=0.5,
        rd_norm=(0.3, 0.7),
        density_norm=(2.5, 1.5),
    )
    plain = replace(fused, density_weight=0.0, rd_norm=(0.0, 1.0), density_norm=(0.0, 1.0))
    for recipe in (fused, plain, PAPER_RECIPE):
        info = {"signal": 0.9, "step": 3}
        scoring = build_scoring(_round_trip(scoring_state(recipe, stats, density, info)), CH, SIZE, 4.0)
        assert scoring.recipe == recipe and scoring.info == info
        assert (scoring.density is not None) == recipe.uses_density
        assert isinstance(scoring.scorer, FusedScorer) == recipe.uses_density
        if recipe.uses_density:
            want = FusedScorer(SIZE, 4.0, recipe, stats)(*feats, *recon, density(*feats))
        else:
            want = AnomalyScorer(SIZE, 4.0, recipe, stats if recipe.standardize else None)(*feats, *recon)
        got = scoring(feats, recon)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), recipe.name()
    state = scoring_state(plain, stats, density, {})
    assert "density" not in state and "stats" in state  # only what the recipe needs is stored
    assert set(scoring_state(PAPER_RECIPE, stats, density, {})) == {"recipe", "info"}


def test_recipe_dict_round_trip_and_names() -> None:
    r = ScoreRecipe(weights=(0.0, 0.0, 1.0), standardize=True, reduction="topk", density_weight=0.25)
    assert ScoreRecipe.from_dict(r.to_dict()) == r
    assert r.name() == "s[0,0,1] std top1% dens0.25"
    assert PAPER_RECIPE.name() == "s[1,1,1] raw max" and not PAPER_RECIPE.uses_density


def _density_onnx_and_torch(head: DensityHead, test: list[torch.Tensor], tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """``head`` exported as the bundle's density part (f1, f2, f3 -> density_map): ONNX Runtime's and torch's maps."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from export.onnx_parts import _AsTuple, export_torch_part  # the wrapper the bundle's density part gets

    path = tmp_path / "density.onnx"
    export_torch_part(_AsTuple(head).eval(), "density", tuple(test), path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(("f1", "f2", "f3"), test, strict=True)})[0]
    return got, head(*test).detach().numpy()


def _through_checkpoint(state: dict) -> dict:
    """A scoring state saved and loaded the way a checkpoint is."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def test_density_knn_bank_is_a_coreset_and_its_map_the_nearest_patch_distance() -> None:
    """The kNN map equals a brute-force nearest-neighbour distance to the bank; a training patch is at distance 0;
    the blend mixes the normalised maps; the state (bank included) round-trips through a checkpoint."""
    train = _feats(12)
    head = DensityHead(CH, SIZE, dims=6, knn=40).fit(train)
    with pytest.raises(ValueError, match="knn > 0"):
        DensityHead(CH, SIZE, dims=6).fit_knn(train)
    head.fit_knn(train, seed=0)
    bank = head.bank
    all_patches = head.patches(train[1], train[2]).flatten(0, 1)
    # every bank row is a training patch, and no two rows coincide (greedy k-centre never picks a patch twice)
    d_train = torch.cdist(bank, all_patches)
    assert float(d_train.min(dim=1).values.max()) < 5e-3  # cdist works through a matmul: ~1e-3 rounding
    assert torch.unique(bank, dim=0).shape[0] == 40
    test = _feats(3, seed=9)
    ref = torch.cdist(head.patches(test[1], test[2]), bank).min(dim=2).values.reshape(3, 1, 8, 8)
    assert torch.allclose(head.nearest(test[1], test[2]), ref, atol=1e-3)
    # blend 0 (the default until chosen): the Gaussian alone; blend 0.5: the mix of normalised maps
    assert torch.allclose(head(*test), head.gaussian(*test))
    head.set_blend(0.5, (1.0, 2.0), (0.5, 4.0))
    mix = 0.5 * (head.gaussian(*test) - 1.0) / 2.0 + 0.5 * (ref - 0.5) / 4.0
    assert torch.allclose(head(*test), mix, atol=1e-4)
    recipe = ScoreRecipe(density_weight=0.5)
    back = build_scoring(_through_checkpoint(scoring_state(recipe, None, head, {})), CH, SIZE, 4.0)
    assert back.density is not None and back.density.knn == 40
    assert torch.allclose(back.density(*test), head(*test), atol=1e-6)


def test_density_knn_exports_to_onnx_with_parity(tmp_path) -> None:
    """The blended head is one ONNX part with the density contract (f1, f2, f3 -> density_map), parity 1e-4."""
    train = _feats(12)
    head = DensityHead(CH, SIZE, dims=6, knn=40).fit(train).fit_knn(train)
    head.set_blend(0.5, (1.0, 2.0), (0.5, 4.0))
    got, ref = _density_onnx_and_torch(head, _feats(2, seed=4), tmp_path)
    assert np.max(np.abs(got - ref)) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_wide_gaussian_is_a_gaussian_of_aggregated_features_blended_in_and_round_trips() -> None:
    """The wide head equals a plain head fitted and applied on 3x3-averaged maps; share 0 leaves the Gaussian
    term as it was, share 0.5 mixes the normalised maps; the state round-trips; drop_wide restores the plain head;
    an even window is refused."""
    from training.scoring import aggregate_features

    train, test = _feats(12), _feats(3, seed=9)
    head = DensityHead(CH, SIZE, dims=6, aggregate=3).fit(train)
    with pytest.raises(ValueError, match="aggregate > 0"):
        DensityHead(CH, SIZE, dims=6).fit_wide(train)
    with pytest.raises(ValueError, match="odd window"):
        DensityHead(CH, SIZE, dims=6, aggregate=2)
    head.fit_wide(train, batch=5)  # batches must not change the fit: aggregation is per image
    ref = DensityHead(CH, SIZE, dims=6).fit(aggregate_features(train, 3))
    wide = ref(*aggregate_features(test, 3))
    assert torch.allclose(head.wide_map(*test), wide, atol=1e-4)
    plain = head.mahalanobis(*test)
    assert not torch.allclose(plain, wide, atol=1e-2)  # the aggregation changes the map
    assert torch.allclose(head(*test), plain)  # share 0 until chosen
    head.set_wide_blend(0.5, (1.0, 2.0), (0.5, 4.0))
    mix = 0.5 * (plain - 1.0) / 2.0 + 0.5 * (wide - 0.5) / 4.0
    assert torch.allclose(head(*test), mix, atol=1e-4)
    back = build_scoring(
        _through_checkpoint(scoring_state(ScoreRecipe(density_weight=0.5), None, head, {})), CH, SIZE, 4.0
    )
    assert back.density is not None and back.density.aggregate == 3
    assert torch.allclose(back.density(*test), mix, atol=1e-4)
    head.drop_wide()
    assert head.aggregate == 0 and not hasattr(head, "wide_blend")
    assert torch.allclose(head(*test), plain)
    assert not any(k.startswith("wide") for k in head.state_dict())


def test_wide_gaussian_exports_to_onnx_with_parity(tmp_path) -> None:
    """The density part with a wide Gaussian (and a kNN blend on top) keeps the part contract, parity 1e-4."""
    train = _feats(12)
    head = DensityHead(CH, SIZE, dims=6, knn=40, aggregate=3).fit(train).fit_wide(train).fit_knn(train)
    head.set_wide_blend(0.5, (1.0, 2.0), (0.5, 4.0))
    head.set_blend(0.5, (0.1, 1.5), (0.5, 4.0))
    got, ref = _density_onnx_and_torch(head, _feats(2, seed=4), tmp_path)
    assert np.max(np.abs(got - ref)) <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("shape", [(3, 1, 64, 64), (2, 1, 256, 256), (2, 1, 130, 70)])
def test_centre_map_subtracts_each_images_lower_median_of_its_subsample(shape: tuple[int, ...]) -> None:
    from training.scoring import centre_map

    g = torch.Generator().manual_seed(0)
    amap = torch.randn(shape, generator=g) + torch.arange(shape[0]).view(-1, 1, 1, 1) * 10.0  # image offsets
    st = max(1, shape[2] // 64)
    med = amap[:, :, ::st, ::st].flatten(1).median(dim=1).values  # torch.median: the lower median
    torch.testing.assert_close(centre_map(amap), amap - med.view(-1, 1, 1, 1))
    # A defect on less than half of an image leaves its median where it was.
    bumped = amap.clone()
    bumped[0, :, : shape[2] // 4] += 100.0
    out = centre_map(bumped)
    torch.testing.assert_close(out[0, :, shape[2] // 4 :], centre_map(amap)[0, :, shape[2] // 4 :], atol=1.0, rtol=0)


def test_a_centred_recipe_round_trips_and_older_recipes_are_not_centred() -> None:
    recipe = replace(ScoreRecipe(density_weight=0.5), centre=True)
    assert recipe.name().endswith("ctr") and ScoreRecipe.from_dict(recipe.to_dict()) == recipe
    old = recipe.to_dict()
    del old["centre"]  # a checkpoint written before the field existed
    assert ScoreRecipe.from_dict(old).centre is False
    feats, recon = _feats(2), _recon(_feats(2))
    plain, _ = AnomalyScorer(SIZE, 4.0, ScoreRecipe())(*feats, *recon)
    centred, score = AnomalyScorer(SIZE, 4.0, ScoreRecipe(centre=True))(*feats, *recon)
    shift = plain.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    torch.testing.assert_close(centred, plain - shift)
    torch.testing.assert_close(score, centred.flatten(1).amax(dim=1))


def test_a_centred_fused_score_part_exports_to_onnx_with_parity(tmp_path) -> None:
    """The median is a TopK with a static k: the score part keeps its contract and parity 1e-4."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from export.onnx_parts import SCORE_WITH_DENSITY_IO, _AsTuple, export_torch_part

    recipe = ScoreRecipe(reduction="topk", density_weight=0.5, rd_norm=(0.1, 0.3), density_norm=(2.0, 5.0), centre=True)
    scorer = FusedScorer(SIZE, 4.0, recipe).eval()
    feats = _feats(3, seed=5)
    ins = (*feats, *_recon(feats), torch.rand(3, 1, SIZE[0] // 8, SIZE[1] // 8) * 20)
    path = tmp_path / "score.onnx"
    export_torch_part(_AsTuple(scorer), "score", ins, path, io=SCORE_WITH_DENSITY_IO)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = SCORE_WITH_DENSITY_IO[0]
    got_map, got_score = sess.run(None, {n: t.numpy() for n, t in zip(names, ins, strict=True)})
    ref_map, ref_score = (t.detach().numpy() for t in scorer(*ins))
    scale = max(1.0, float(np.abs(ref_map).max()))
    assert np.max(np.abs(got_map - ref_map)) <= 1e-4 * scale
    assert np.max(np.abs(got_score - ref_score)) <= 1e-4 * scale
