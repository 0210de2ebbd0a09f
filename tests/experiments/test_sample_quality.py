"""sat_video/experiments/sample_quality.py and seed_statistics.py: the held-out split the quality stage samples, the
scores (read back from real clips, nothing from blank ones), the Fréchet distance, and when a difference between
variants counts as significant. The end-to-end ranking of a trained model above an untrained one is in test_ablation.py."""

import itertools

import numpy as np
import pytest

import sat_video
from sat_video.common.errors import DataError
from sat_video.data.clips import read_caption
from sat_video.data.sources import discover
from sat_video.experiments.ablation import RunSummary, Variant, VariantReport
from sat_video.experiments.ablation_report import significant_differences
from sat_video.experiments.sample_quality import (
    QualityScores,
    clip_statistics,
    frechet_distance,
    quality_prompts,
    reference_frames,
    score,
)
from sat_video.experiments.seed_statistics import Estimate, accuracy_estimate, significant
from sat_video.fixtures.shapes_study import make_shapes_study
from sat_video.fixtures.synthetic import BACKGROUND, DIRECTIONS, NUM_COMBINATIONS, heldout_split, parse_caption, render_clip
from tests.conftest import ROOT

QUICKSTART = [ROOT / "configs" / name for name in ("cogvideox_2b.yaml", "tiny.yaml", "quickstart.yaml")]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The shapes study tools/ablate.py --synthetic writes (one clip per training combination) and its config."""
    folder = tmp_path_factory.mktemp("study")
    cfg = sat_video.load_config(QUICKSTART)
    written = make_shapes_study(folder / "data", cfg, videos_per_combination=1)
    return written, sat_video.load_config(QUICKSTART, written.overrides)


def test_the_heldout_split_keeps_every_heldout_combination_out_of_training_and_every_word_in(study):
    written, _ = study
    training_captions = {read_caption(ref) for ref in discover([written.training])}
    prompts = quality_prompts([written.training], [written.heldout], limit=48)
    heldout = [p.caption for p in prompts if p.split == "heldout"]
    assert sorted(p.caption for p in prompts if p.split == "seen") == sorted(training_captions)
    assert len(training_captions) == 36 and len(heldout) == 12 and len(training_captions) + len(heldout) == NUM_COMBINATIONS

    training = {parse_caption(c) for c in training_captions}
    assert not training & {parse_caption(c) for c in heldout}  # no held-out combination was trained on ...
    for combination in map(parse_caption, heldout):  # ... but every word, and every pair of words, was
        for pair in itertools.combinations(range(3), 2):
            assert any(all(t[i] == combination[i] for i in pair) for t in training), (combination, pair)
    assert set(heldout_split()[1]) == {parse_caption(c) for c in heldout}

    # the same settings reuse the study; a limit spreads the prompts over the sorted captions
    assert make_shapes_study(written.training.parent, sat_video.load_config(QUICKSTART), videos_per_combination=1) == written
    few = quality_prompts([written.training], [written.heldout], limit=3)
    assert [p.caption for p in few if p.split == "seen"] == [sorted(training_captions)[i] for i in (0, 17, 35)]
    with pytest.raises(DataError, match="share 36 caption"):
        quality_prompts([written.training], [written.training], limit=48)


def test_scores_read_real_clips_back_and_nothing_from_blank_ones(study):
    written, cfg = study
    prompts = quality_prompts([written.training], [written.heldout], limit=6)
    references = reference_frames(prompts, cfg)
    perfect = score(prompts, references, references)
    assert perfect.samples == {"seen": 6, "heldout": 6} and perfect.undescribed == 0
    assert perfect.accuracy == {split: dict.fromkeys(("shape", "colour", "direction", "all"), 1.0)
                                for split in ("seen", "heldout")}
    assert perfect.fsd == pytest.approx(0, abs=1e-9)

    blank = [np.broadcast_to(np.array(BACKGROUND, np.uint8), r.shape) for r in references]
    nothing = score(prompts, blank, references)
    assert nothing.undescribed == 12 and all(v == 0 for split in nothing.accuracy.values() for v in split.values())
    assert nothing.fsd > 0.01

    # other captions: no attribute accuracy, the distance still
    plain = [p.__class__(f"clip {i}", p.split, p.reference) for i, p in enumerate(prompts)]
    assert score(plain, references, references).accuracy is None


def test_clip_statistics_see_colour_and_the_direction_of_motion():
    rng = np.random.default_rng(0)
    for direction, (dx, dy) in DIRECTIONS.items():
        stats = clip_statistics(render_clip("circle", "red", direction, 13, 64, 64, rng))
        travel = stats[-2:]
        assert travel @ np.array([dx, dy]) > 0.1 and abs(travel @ np.array([dy, dx])) < 0.05, (direction, travel)
        assert stats[6:14].sum() == pytest.approx(1.0)  # the colour histogram
    still = np.repeat(render_clip("square", "blue", "left", 1, 64, 64, rng), 9, axis=0)
    assert clip_statistics(still)[14:] == pytest.approx([0, 0, 0], abs=1e-9)
    with pytest.raises(ValueError, match=r"expected uint8 frames \[T, H, W, 3\]"):
        clip_statistics(np.zeros((4, 8, 8)))


def test_frechet_distance_is_the_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((400, 3))
    z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # exactly mean 0, covariance I
    mean_a, mean_b, std_a, std_b = np.array([0, 1, 2]), np.array([1, 1, 0]), np.array([1, 2, 3]), np.array([2, 2, 1])
    a, b = z * std_a + mean_a, z[::-1] * std_b + mean_b
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((std_a - std_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def _report(name, heldout_shares, losses=None):
    runs = {}
    for seed, share in enumerate(heldout_shares):
        accuracy = {"heldout": dict.fromkeys(("shape", "colour", "direction", "all"), share)}
        runs[seed] = RunSummary(returncode=0, steps=[1], losses=[losses[seed] if losses else 1.0],
                                quality=QualityScores({"seen": 0, "heldout": 12}, 0.1, accuracy))
    return VariantReport(Variant(name), (1, 1), 1, runs)


def test_a_difference_is_significant_only_beyond_the_spread_over_seeds_and_the_binomial_error():
    # 12 prompts: one prompt is 0.083; seeds that agree exactly still carry the binomial error
    assert not significant(accuracy_estimate([1.0, 1.0, 1.0], 12), accuracy_estimate([11 / 12] * 3, 12))
    assert significant(accuracy_estimate([1.0, 1.0, 1.0], 12), accuracy_estimate([0.5, 0.5, 0.5], 12))
    # a spread over seeds larger than the gap hides it; one seed is never enough
    assert not significant(Estimate((0.2, 0.9, 0.5)), Estimate((0.6, 0.3, 0.8)))
    assert significant(Estimate((0.50, 0.52, 0.51)), Estimate((0.60, 0.62, 0.61)))
    assert not significant(Estimate((0.1,)), Estimate((0.9,)))
    assert Estimate((0.5, 0.7)).format() == "0.6 ± 0.14"

    found = significant_differences([_report("good", [0.9, 1.0, 0.9], [0.50, 0.52, 0.51]),
                                     _report("bad", [0.25, 0.33, 0.25], [0.60, 0.62, 0.61]),
                                     _report("same", [0.92, 0.9, 1.0])])
    assert {(d.metric.key, d.better, d.worse) for d in found} == {
        ("heldout_all", "good", "bad"), ("heldout_all", "same", "bad"), ("final_loss", "good", "bad"),
        ("final_loss", "good", "same"), ("final_loss", "bad", "same")}
