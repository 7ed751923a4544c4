"""Selection: the fast linear evaluation of every candidate equals building that candidate's scorer and scoring.

The selector upsamples and blurs each scale once and forms every candidate as a weighted sum; the bundle, evaluation
and runtime use :func:`training.scoring.build_scoring` on the stored recipe instead. If the two disagree, the chosen
recipe is not the one that is shipped. These tests score the same images both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training import selection
from training.backbones import get_spec
from training.build import load_model
from training.config import load_train_config
from training.data import discover
from training.errors import ConfigError
from training.features import FeatureSet, feature_set, load_images
from training.metrics import auroc
from training.model import Student
from training.scoring import (
    AnomalyScorer,
    ChannelStats,
    DensityHead,
    FusedScorer,
    ScoreRecipe,
    build_scoring,
    reduce_map,
    scoring_state,
)
from training.selection import Selector, candidates
from training.synthetic import synthesize
from training.train import from_unit_rgb, to_unit_rgb

SIZE = (64, 64)
SIGMA = 4.0


@dataclass
class Setup:
    student: Student
    stats: ChannelStats
    density: DensityHead
    good: FeatureSet
    synth: FeatureSet
    masks: np.ndarray
    channels: tuple[int, int, int]
    kinds: list[str]
    train: FeatureSet


@pytest.fixture(scope="module")
def setup(tiny_run: Path, demo_category: Path) -> Setup:
    """The trained tiny run's model; train/good for statistics and density, test/good as the validation images."""
    model, cfg, _ = load_model(tiny_run)
    spec = get_spec(cfg.model.backbone)
    splits = discover(demo_category, need_test=True)
    dev = torch.device("cpu")
    train_np, _ = load_images(splits.train, SIZE, spec.mean, spec.std)
    train = feature_set(model.teacher, train_np, dev)
    good_np, _ = load_images([s for s in splits.test if s.label == 0][:4], SIZE, spec.mean, spec.std)
    synth01, masks, kinds = synthesize(to_unit_rgb(good_np, spec.mean, spec.std), per_image=2, seed=0)
    return Setup(
        model.student().eval(),
        ChannelStats(spec.channels).fit(train.feats),
        DensityHead(spec.channels, SIZE, dims=16).fit(train.feats),
        feature_set(model.teacher, good_np, dev),
        feature_set(model.teacher, from_unit_rgb(synth01, spec.mean, spec.std), dev),
        masks,
        spec.channels,
        kinds,
        train,
    )


def _record_fast_path(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Capture the selector's own ``(map, scores)`` of every candidate, in candidate order."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(amap: torch.Tensor, reduction: str, topk: float) -> torch.Tensor:
        scores = reduce_map(amap, reduction, topk)
        seen.append((amap.clone(), scores.clone()))
        return scores

    monkeypatch.setattr(selection, "reduce_map", recording)
    return seen


def _scorer_path(s: Setup, recipe: ScoreRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Good then synthetic images through the scoring a checkpoint would store for ``recipe``."""
    scoring = build_scoring(scoring_state(recipe, s.stats, s.density, {}), s.channels, SIZE, SIGMA)
    maps, scores = [], []
    with torch.no_grad():
        for fs in (s.good, s.synth):
            amap, score = scoring(fs.feats, s.student(*fs.feats))
            maps.append(amap)
            scores.append(score)
    return torch.cat(maps), torch.cat(scores)


def _good_norm(x: torch.Tensor) -> tuple[float, float]:
    """``(median, q99 - median)`` of good pixels, independently in numpy (linear interpolation, as torch)."""
    med, q99 = np.quantile(x.double().numpy().ravel(), [0.5, 0.99])
    return float(med), float(q99 - med)


def _norms(s: Setup, cand: ScoreRecipe) -> tuple[tuple[float, float], tuple[float, float]]:
    """The fusion norms of a candidate from scorer-path maps of the good images (blurred RD map, blurred density)."""
    rd = AnomalyScorer(SIZE, SIGMA, replace(cand, density_weight=0.0), s.stats)
    dens_only = FusedScorer(SIZE, SIGMA, replace(cand, density_weight=1.0), s.stats)
    with torch.no_grad():
        recon = s.student(*s.good.feats)
        rd_map = rd(*s.good.feats, *recon)[0]
        dens_map = dens_only(*s.good.feats, *recon, s.density(*s.good.feats))[0]
    return _good_norm(rd_map), _good_norm(dens_map)


def test_fast_evaluation_equals_the_built_scorer_for_every_candidate(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density)
    seen = _record_fast_path(monkeypatch)
    ev = sel.evaluate(setup.student)
    assert len(seen) == len(sel.cands) == len(ev.results) == 48
    labels = np.r_[np.zeros(len(setup.good)), np.ones(len(setup.synth))]
    for cand, (fast_map, fast_scores), result in zip(sel.cands, seen, ev.results, strict=True):
        recipe = cand
        if cand.uses_density:
            rd_norm, density_norm = _norms(setup, cand)
            recipe = replace(cand, rd_norm=rd_norm, density_norm=density_norm)
        amap, scores = _scorer_path(setup, recipe)
        scale = float(amap.abs().max())
        torch.testing.assert_close(fast_map, amap, rtol=1e-4, atol=1e-4 * scale, msg=cand.name())
        torch.testing.assert_close(fast_scores, scores, rtol=1e-4, atol=1e-6 * scale, msg=cand.name())
        assert result["recipe"] == cand.name()
        assert result["image_auroc"] == pytest.approx(auroc(scores.numpy(), labels), abs=1e-9), cand.name()


def test_chosen_recipe_carries_the_norms_and_scores_as_evaluated(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density)
    seen = _record_fast_path(monkeypatch)
    ev = sel.evaluate(setup.student)
    signals = [r["signal"] for r in ev.results]
    i = int(np.argmax(signals))  # the first of the best: ties go to the simpler candidate
    assert ev.best_signal == signals[i] and ev.best.name() == ev.results[i]["recipe"]
    assert replace(ev.best, rd_norm=(0.0, 1.0), density_norm=(0.0, 1.0)) == sel.cands[i]
    if ev.best.uses_density:
        rd_norm, density_norm = _norms(setup, sel.cands[i])
        np.testing.assert_allclose(ev.best.rd_norm, rd_norm, rtol=1e-4)
        np.testing.assert_allclose(ev.best.density_norm, density_norm, rtol=1e-4)
    _, scores = _scorer_path(setup, ev.best)  # exactly what the checkpoint's "scoring" rebuilds
    torch.testing.assert_close(seen[i][1], scores, rtol=1e-4, atol=1e-7)


def test_a_fused_recipe_is_consistent_when_pinned(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even where a fused recipe does not win on its own, the pinned one must score as shipped."""
    pin: dict[str, Any] = {"weights": (1.0, 1.0, 1.0), "standardize": True, "reduction": "topk", "density_weight": 0.5}
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density, pin)
    seen = _record_fast_path(monkeypatch)
    ev = sel.evaluate(setup.student)
    assert len(sel.cands) == 1 and ev.best.density_weight == 0.5 and ev.best.rd_norm != (0.0, 1.0)
    _, scores = _scorer_path(setup, ev.best)
    torch.testing.assert_close(seen[0][1], scores, rtol=1e-4, atol=1e-7)


def test_candidates_and_pins() -> None:
    assert len(candidates(False)) == 12 and len(candidates(True)) == 48
    assert candidates(True)[0] == ScoreRecipe()  # the simplest first: the paper's recipe
    assert not any(c.uses_density for c in candidates(False))
    paper = candidates(True, {"weights": [1, 1, 1], "standardize": False, "reduction": "max", "density_weight": 0})
    assert paper == [ScoreRecipe()]
    assert {c.density_weight for c in candidates(True, {"standardize": True, "reduction": None})} == {
        0.0,
        0.25,
        0.5,
        0.75,
    }
    with pytest.raises(ConfigError, match="no candidate recipe matches"):
        candidates(False, {"density_weight": 0.5})


def test_density_floor_keeps_rd_heavy_candidates_out_unless_pinned(setup: Setup) -> None:
    floored = candidates(True, None, 0.5)
    assert {c.density_weight for c in floored} == {0.5, 0.75} and len(floored) == 24
    assert candidates(False, None, 0.5) == candidates(False)  # no density head: RD candidates as before
    assert [c.density_weight for c in candidates(True, {"density_weight": 0.0}, 0.5)] == [0.0] * 12  # a pin wins
    with pytest.raises(ConfigError, match="density_floor"):
        candidates(True, None, 0.9)
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density, density_floor=0.5)
    ev = sel.evaluate(setup.student)
    assert len(ev.results) == 24 and ev.best.density_weight >= 0.5
    # the config refuses a floor above the largest weight, naming the field
    with pytest.raises(ConfigError, match="density_floor"):
        load_train_config(None, {"selection.density_floor": 0.9})


def test_per_kind_signal_is_the_mean_of_each_kinds_aurocs(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kind's image and pixel AUROC against the good images, checked with metrics.auroc; signal = their mean."""
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density, kinds=setup.kinds)
    seen = _record_fast_path(monkeypatch)
    ev = sel.evaluate(setup.student)
    kinds = np.asarray(setup.kinds)
    n_good = len(setup.good)
    for (amap, scores), result in list(zip(seen, ev.results, strict=True))[::7]:
        per = result["per_kind"]
        assert set(per) == set(setup.kinds)
        for kind, got in per.items():
            idx = np.flatnonzero(kinds == kind)
            img = auroc(np.r_[scores[:n_good].numpy(), scores[n_good:][idx].numpy()],
                        np.r_[np.zeros(n_good), np.ones(idx.size)])  # fmt: skip
            good_px = amap[:n_good, 0].numpy().ravel()
            pos_px = amap[n_good:, 0].numpy()[idx][setup.masks[idx]]
            px = auroc(np.r_[good_px, pos_px], np.r_[np.zeros(good_px.size), np.ones(pos_px.size)])
            assert got["image_auroc"] == pytest.approx(img, abs=1e-9)
            assert got["pixel_auroc"] == pytest.approx(px, abs=1e-6)
        want = np.mean([0.5 * (v["image_auroc"] + v["pixel_auroc"]) for v in per.values()])
        assert result["signal"] == pytest.approx(want)
        good_px, all_px = amap[:n_good, 0].numpy().ravel(), amap[n_good:, 0].numpy()[setup.masks]
        pooled = auroc(np.r_[good_px, all_px], np.r_[np.zeros(good_px.size), np.ones(all_px.size)])
        assert result["pixel_auroc"] == pytest.approx(pooled, abs=1e-6)  # reported only: every defect pixel
    with pytest.raises(ValueError, match="selection.signal"):
        Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, None, kinds=setup.kinds, signal="x")


def test_weighted_auroc_with_multiplicities_is_the_auroc_of_the_repeated_sample() -> None:
    """Each resample's AUROC equals metrics.auroc on the values repeated by their weights (ties count one half)."""
    rng = np.random.default_rng(3)
    neg = np.round(rng.normal(0, 1, 40), 1)  # rounded: ties between and within the sides
    pos = np.round(rng.normal(0.7, 1, 25), 1)
    w_neg = rng.integers(0, 4, (5, neg.size)).astype(float)
    w_pos = rng.integers(0, 4, (5, pos.size)).astype(float)
    order = np.argsort(neg, kind="stable")
    cum = np.concatenate([np.zeros((5, 1)), np.cumsum(w_neg[:, order], axis=1)], axis=1)
    got = selection._weighted_auroc(neg[order], cum, pos, w_pos)
    for b in range(5):
        n, p = np.repeat(neg, w_neg[b].astype(int)), np.repeat(pos, w_pos[b].astype(int))
        want = auroc(np.r_[n, p], np.r_[np.zeros(n.size), np.ones(p.size)])
        assert got[b] == pytest.approx(want, abs=1e-12)


def test_tie_break_takes_the_most_density_among_candidates_within_one_standard_error(setup: Setup) -> None:
    """The chosen recipe is within one paired bootstrap standard error of the best signal and has the largest density
    weight of those; the checkpoint signal stays the best of any candidate; 'none' keeps the arg-max."""
    args = (setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density)
    plain = Selector(*args, kinds=setup.kinds).evaluate(setup.student)
    ev = Selector(*args, kinds=setup.kinds, tie_break="density", bootstrap=20, seed=1).evaluate(setup.student)
    sig = {r["recipe"]: r["signal"] for r in ev.results}
    assert ev.best_signal == pytest.approx(plain.best_signal) == pytest.approx(max(sig.values()))
    assert ev.tie is not None and ev.tie["best_signal_recipe"] == plain.best.name()
    tied = set(ev.tie["tied"])
    assert plain.best.name() in tied and ev.best.name() in tied
    for r in ev.results:
        assert (r["recipe"] in tied) == (r["signal"] >= ev.best_signal - r["se_vs_best"] - 1e-12)
    weights = {r.name(): r.density_weight for r in candidates(True)}
    assert ev.best.density_weight == max(weights[n] for n in tied)
    assert ev.best.rd_norm != (0.0, 1.0) or ev.best.density_weight == 0  # the chosen fused recipe carries its norms
    # Without a density head there is nothing to prefer: the plain arg-max, no tie record.
    no_dens = Selector(*args[:-1], None, kinds=setup.kinds, tie_break="density").evaluate(setup.student)
    assert no_dens.tie is None
    with pytest.raises(ValueError, match="tie_break"):
        Selector(*args, kinds=setup.kinds, tie_break="x")


def test_knn_share_is_chosen_by_the_density_maps_own_signal(setup: Setup) -> None:
    """choose_knn_blend: each share's signal is the selector's signal of that blended map; the best one is set on
    the head (ties: the smaller share) and the selector's density maps are the chosen head's."""
    head = DensityHead(setup.channels, SIZE, dims=16, knn=64).fit(setup.train.feats).fit_knn(setup.train.feats)
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, head, kinds=setup.kinds)
    rec = selection.choose_knn_blend(head, sel)
    assert set(rec["signals"]) == {"0", "0.5"} and rec["bank"] == 64
    gn, kn = tuple(rec["gauss_norm"]), tuple(rec["knn_norm"])
    for b, sig in rec["signals"].items():
        head.set_blend(float(b), gn, kn)
        assert sel.map_signal(sel.blurred(head)) == pytest.approx(sig, abs=1e-6)
    s0, s5 = rec["signals"]["0"], rec["signals"]["0.5"]
    assert rec["chosen"] == (0.5 if s5 > s0 + 1e-9 else 0.0)
    head.set_blend(rec["chosen"], gn, kn)
    assert sel.density_maps is not None and torch.allclose(sel.density_maps, sel.blurred(head))
    with pytest.raises(ValueError, match="kNN memory bank"):
        selection.choose_knn_blend(setup.density, sel)


def test_wide_share_needs_a_gain_above_one_standard_error(setup: Setup) -> None:
    """choose_wide_blend: the recorded gain and standard error are the selector's paired figures of the plain and
    the blended map; the blend is kept only when the gain exceeds the standard error (else the wide Gaussian is
    dropped), and the selector's density maps are the chosen head's."""
    feats = setup.train.feats
    head = DensityHead(setup.channels, SIZE, dims=16, aggregate=3).fit(feats).fit_wide(feats)
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, head, kinds=setup.kinds)
    again = DensityHead(setup.channels, SIZE, dims=16, aggregate=3).fit(feats).fit_wide(feats)
    rec = selection.choose_wide_blend(head, sel)
    assert rec["window"] == 3 and rec["se"] >= 0
    gn, wn = tuple(rec["gauss_norm"]), tuple(rec["wide_norm"])
    again.set_wide_blend(0.0, gn, wn)
    plain = sel.blurred(again)
    again.set_wide_blend(0.5, gn, wn)
    gain, se = sel.paired_gain(plain, sel.blurred(again))
    assert (rec["gain"], rec["se"]) == pytest.approx((gain, se), abs=1e-6)
    assert rec["chosen"] == (0.5 if gain > se else 0.0)
    assert head.aggregate == (3 if rec["chosen"] else 0)
    assert sel.density_maps is not None and torch.allclose(sel.density_maps, sel.blurred(head))
    # a share the signal rejects for sure: a wide map of pure noise is dropped
    noisy = DensityHead(setup.channels, SIZE, dims=16, aggregate=3).fit(feats).fit_wide(feats)
    torch.manual_seed(0)
    noisy.wide_map = lambda f1, f2, f3: torch.rand(len(f1), 1, SIZE[0] // 8, SIZE[1] // 8)  # type: ignore[method-assign]
    assert selection.choose_wide_blend(noisy, sel)["chosen"] == 0.0 and noisy.aggregate == 0
    with pytest.raises(ValueError, match="wide Gaussian"):
        selection.choose_wide_blend(setup.density, sel)


@pytest.mark.parametrize("density_weight", [0.0, 0.5])
def test_a_centred_selector_scores_as_the_built_centred_scorer(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, density_weight: float
) -> None:
    """With centring chosen, every candidate's map is centred and its recipe says so; the shipped scorer agrees."""
    pin: dict[str, Any] = {"weights": (0.0, 1.0, 1.0), "standardize": False, "reduction": "max"}
    pin["density_weight"] = density_weight
    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density, pin)
    sel.centre = True
    seen = _record_fast_path(monkeypatch)
    ev = sel.evaluate(setup.student)
    assert ev.best.centre and ev.best.name().endswith("ctr")
    amap, scores = _scorer_path(setup, ev.best)
    scale = float(amap.abs().max())
    torch.testing.assert_close(seen[0][0], amap, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(seen[0][1], scores, rtol=1e-4, atol=1e-6 * scale)


def test_centring_is_chosen_only_when_it_gains_more_than_one_standard_error(setup: Setup) -> None:
    from training.scoring import centre_map

    sel = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, setup.density, kinds=setup.kinds)
    rec = selection.choose_centring(sel)
    raw = sel.density_maps
    assert raw is not None
    assert rec["gain"] == pytest.approx(sel.map_signal(centre_map(raw)) - sel.map_signal(raw), abs=1e-9)
    assert rec["chosen"] == (rec["gain"] > rec["se"]) == sel.centre
    # Built maps: good images at random levels, defects a bump on a flat image. Raw, the levels pass for
    # anomalies; centred, every defect stands out: centring is chosen. Without the levels nothing is gained.
    n_good, n = len(setup.good), len(setup.good) + len(setup.synth)
    g = torch.Generator().manual_seed(0)
    base = 0.1 * torch.rand(n, 1, *SIZE, generator=g)
    bumps = torch.zeros(n, 1, *SIZE)
    bumps[n_good:, 0] = torch.from_numpy(setup.masks).float() * 3.0
    levels = torch.zeros(n, 1, 1, 1)
    levels[:n_good] = 5.0 * torch.rand(n_good, 1, 1, 1, generator=g)
    sel.density_maps = base + bumps + levels
    assert selection.choose_centring(sel)["chosen"] and sel.centre
    sel.density_maps = base + bumps
    assert not selection.choose_centring(sel)["chosen"] and not sel.centre
    assert selection.choose_centring(sel, "on")["chosen"] and sel.centre
    assert not selection.choose_centring(sel, "off")["chosen"] and not sel.centre
    no_dens = Selector(setup.good, setup.synth, setup.masks, SIZE, SIGMA, setup.stats, None, kinds=setup.kinds)
    assert selection.choose_centring(no_dens) == {"rule": "no density head or no per-kind signal: not centred",
                                                   "chosen": False}  # fmt: skip
    with pytest.raises(ValueError, match="selection.centre"):
        selection.choose_centring(sel, "maybe")
