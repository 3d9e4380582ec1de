"""Planted explainers: every randomisation check (MPRT in each order, sMPRT, eMPRT, data randomisation) must fail
a constant map, the image's intensity, the trained CNN's map regardless of the network, and an anti-correlated
map (the trained map inverted), and must pass the randomised CNN's own Grad-CAM. MPRT, sMPRT and data
randomisation also fail the network's own map inverted (their follow rule); eMPRT cannot (an entropy does not see
a sign). The donor test of prior swap is planted the same way (last test). The image-only control has no verdict
to plant against: it reports a margin. A check is trusted once it separates these."""

from __future__ import annotations

import pytest
import torch

from cnnprior.cnn.model import build_cnn
from cnnprior.evaluate.sanity import emprt_verdict, mprt, mprt_verdict, one_step_scores, step_means
from cnnprior.evaluate.smprt_emprt import emprt_score, smoothed
from cnnprior.priors.cams import live_cams

REF = "Grad-CAM"
FLOOR = "mean of priors"
PLANTED_FAIL = ("constant", "intensity", "fixed map", "anti-correlated", "inverted own map")
PLANTED_PASS = "random CNN's own Grad-CAM"


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    cnn = build_cnn("resnet18", ["a", "b", "c", "d"], image_size=64).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 64, 64, generator=g)
    # a bright square per image, so Grad-CAM of the trained CNN has structure to keep or lose
    for i in range(8):
        r, c = (i % 3) * 16, (i // 3) * 16
        images[i, :, r:r + 24, c:c + 24] += 1.0
    images = images.clamp(0, 1)
    classes = torch.arange(8) % 4
    net = cnn.net

    trained = live_cams(cnn, net.layer4[-1], images, classes, "gradcam", batch_size=8)

    def is_trained(model):
        return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cnn.state_dict().values(),
                                                        strict=True))

    def maps_of(model, x=None):
        x = images if x is None else x
        own = live_cams(model, model.net.layer4[-1], x, classes, "gradcam", batch_size=8)
        priors = [live_cams(model, layer, x, classes, "gradcam", batch_size=8)
                  for layer in (model.net.layer2[-1], model.net.layer3[-1])] + [own]
        return {REF: own, FLOOR: torch.stack(priors).mean(0),
                "constant": torch.full_like(own, 0.5),
                "intensity": x.mean(1, keepdim=True),
                "fixed map": trained,
                "anti-correlated": trained if is_trained(model) else 1 - trained,
                "inverted own map": 1 - own,
                PLANTED_PASS: own.clone()}

    return cnn, maps_of


def verdicts(cnn, maps_of, order):
    result = mprt(cnn, maps_of, seed=3, steps=3, order=order, follow=REF)
    means = step_means(result)
    stages = [s["randomised"] for s in result["steps"][1:]]
    return {m: mprt_verdict(means["spearman"], stages, m, REF, follow=means["follow"], floors=(FLOOR,),
                            constant_share=means["constant_share"])
            for m in (*PLANTED_FAIL, PLANTED_PASS)}


@pytest.mark.parametrize("order", ["top_down", "bottom_up", "independent"])
def test_mprt_fails_every_planted_failure_and_passes_the_random_cnns_own_map(setting, order):
    cnn, maps_of = setting
    v = verdicts(cnn, maps_of, order)
    table = {m: (v[m]["passes"], v[m]["reasons"]) for m in v}
    for m in PLANTED_FAIL:
        assert not v[m]["passes"], (order, m, table)
    assert v[PLANTED_PASS]["passes"], (order, table)


def test_the_one_sided_rule_of_earlier_reports_passes_inverted_maps(setting):
    """Why the rule changed: similarity alone, one-sided, passes both inverted maps; two-sided similarity fails the
    inverted trained map and the follow rule fails the inverted own map."""
    cnn, maps_of = setting
    result = mprt(cnn, maps_of, seed=3, steps=3, order="top_down", follow=REF)
    means = step_means(result)
    stages = [s["randomised"] for s in result["steps"][1:]]
    for m in ("anti-correlated", "inverted own map"):
        assert mprt_verdict(means["spearman"], stages, m, REF, two_sided=False)["passes"], m
    assert "similarity" in mprt_verdict(means["spearman"], stages, "anti-correlated", REF)["reasons"]
    new = mprt_verdict(means["spearman"], stages, "inverted own map", REF, follow=means["follow"], floors=(FLOOR,))
    assert not new["passes"] and new["reasons"] == ["follow"]


def test_verdict_rules_on_hand_numbers():
    stages = ["fc", "layer4"]
    ref = [1.0, 0.16, 0.10]
    # far below the reference fails two-sided, passes one-sided
    low = {"m": [1.0, -0.5, -0.6], "ref": ref}
    assert not mprt_verdict(low, stages, "m", "ref")["passes"]
    assert mprt_verdict(low, stages, "m", "ref", two_sided=False)["passes"]
    # constant maps at a step where the reference's are not: degenerate
    share = {"m": [0.0, 0.9, 0.0], "ref": [0.0, 0.0, 0.0]}
    v = mprt_verdict({"m": ref, "ref": ref}, stages, "m", "ref", constant_share=share)
    assert not v["passes"] and v["reasons"] == ["degenerate"] and v["degenerate_steps"] == [1]
    # constant where the reference is constant too is not held against it
    share["ref"] = [0.0, 0.9, 0.0]
    assert mprt_verdict({"m": ref, "ref": ref}, stages, "m", "ref", constant_share=share)["passes"]
    # follow: below the best floor by more than the margin fails; within it passes
    follow = {"m": [1.0, 0.30, 0.30], "a": [1.0, 0.45, 0.20], "b": [1.0, 0.35, 0.38], "ref": [1.0] * 3}
    v = mprt_verdict({"m": ref, "ref": ref}, stages, "m", "ref", follow=follow, floors=("a", "b"))
    assert not v["passes"] and v["unfollowed_steps"] == [1] and v["follow_gaps"] == pytest.approx([-0.15, -0.08])
    # no finite similarity at all: degenerate, never a pass
    nan = float("nan")
    assert not mprt_verdict({"m": [nan, nan, nan], "ref": ref}, stages, "m", "ref")["passes"]


def test_smprt_fails_every_planted_failure_and_passes_the_random_cnns_own_map(setting):
    """sMPRT: every map averaged over noisy copies of the image, then the MPRT rules (bottom-up, as Quantus)."""
    cnn, maps_of = setting
    g = torch.Generator().manual_seed(1)
    images = torch.rand(8, 3, 64, 64, generator=g)

    def smooth(model):
        return smoothed(lambda x: maps_of(model, x), images, n=3, magnitude=0.1, seed=0)

    result = mprt(cnn, smooth, seed=3, steps=3, order="bottom_up", follow=REF)
    means = step_means(result)
    stages = [s["randomised"] for s in result["steps"][1:]]
    v = {m: mprt_verdict(means["spearman"], stages, m, REF, follow=means["follow"], floors=(FLOOR,),
                         constant_share=means["constant_share"]) for m in (*PLANTED_FAIL, PLANTED_PASS)}
    table = {m: (x["passes"], x["reasons"]) for m, x in v.items()}
    for m in PLANTED_FAIL:
        assert not v[m]["passes"], (m, table)
    assert v[PLANTED_PASS]["passes"], table


def test_emprt_fails_the_planted_failures_it_can_see_and_passes_the_random_cnns_own_map(setting):
    """eMPRT: the rise of the maps' histogram entropy from the trained to the fully randomised CNN, judged against
    the reference's rise. The constant map has no entropy (degenerate); the image, the fixed map and the inverted
    trained map do not change with the network (rise 0, the reference's is far from 0)."""
    cnn, maps_of = setting
    from cnnprior.cnn.randomise import randomise

    trained, last = maps_of(cnn), maps_of(randomise(cnn, "bottom_up", 6, 3, "default"))
    rise = {m: float(emprt_score(trained[m], last[m]).nanmean()) for m in trained}
    v = {m: emprt_verdict(rise, m, REF) for m in trained}
    assert abs(rise[REF]) > 0.1, rise  # otherwise a map that never changes could not be told apart
    for m in ("constant", "intensity", "fixed map", "anti-correlated"):
        assert not v[m]["passes"], (m, rise)
    assert v["constant"]["reasons"] == ["degenerate"]
    assert v[PLANTED_PASS]["passes"]
    assert v["inverted own map"]["passes"]  # entropy is blind to a sign: MPRT's follow rule fails it instead


def test_data_randomisation_fails_every_planted_failure_and_passes_the_other_cnns_own_map(setting):
    """Data randomisation, pooled over three other networks (stand-ins for random-label CNNs: what the rule sees is
    the maps of other networks of the same architecture)."""
    cnn, maps_of = setting
    others = []
    for seed in (11, 12, 13):
        torch.manual_seed(seed)
        others.append(build_cnn("resnet18", ["a", "b", "c", "d"], image_size=64).eval())
    scores = one_step_scores(maps_of(cnn), [maps_of(o) for o in others], REF)
    v = {m: mprt_verdict(scores["means"], ["random labels"], m, REF, follow=scores["follow_means"], floors=(FLOOR,),
                         constant_share=scores["constant_share"]) for m in (*PLANTED_FAIL, PLANTED_PASS)}
    table = {m: (x["passes"], x["reasons"]) for m, x in v.items()}
    for m in PLANTED_FAIL:
        assert not v[m]["passes"], (m, table)
    assert v[PLANTED_PASS]["passes"], table


def test_a_network_made_twice_is_judged_once():
    """`independent` step 1 re-initialises the classifier alone, as `top_down` step 1 does; `full` and each cascade's
    last step re-initialise every stage: shown, but judged where they came first."""
    from cnnprior.evaluate.randomisations import parse_randomisations, repeated_steps

    specs = parse_randomisations("top_down,independent,bottom_up,full,full:normal")
    rep = repeated_steps(specs, 6)
    assert rep[0] == {}
    assert rep[1] == {1: "top_down step 1"}
    assert rep[2] == {1: "independent step 6", 6: "top_down step 6"}
    assert rep[3] == {1: "top_down step 6"} and rep[4] == {}  # another init: other networks
    ref = [1.0, 0.16, 0.10]
    v = mprt_verdict({"m": [1.0, 0.9, 0.1], "ref": ref}, ["fc", "layer4"], "m", "ref", skip_steps=[1])
    assert v["passes"] and v["steps"] == 1 and v["skipped_steps"] == [1]  # step 1's gap is not counted again


def test_the_donor_test_fails_every_planted_failure_and_passes_the_donors_own_map():
    """The specificity test of a priors-only generator (prior swap): given image i with the priors of donor j, the
    map must be closer to j's target than to i's. Planted: a constant map, image i's intensity, one fixed map for
    every image and the donor's target inverted fail; the donor's own target (what the priors describe) passes."""
    from cnnprior.evaluate.sanity import mean_ci
    from cnnprior.evaluate.sections.swap import specificity_verdict
    from cnnprior.maps import metrics

    g = torch.Generator().manual_seed(0)
    n, s = 24, 32
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    centres = torch.randint(6, s - 6, (n, 2), generator=g)
    targets = torch.stack([torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0) for cy, cx in centres]).float()
    images = (targets + 0.5 * torch.rand(n, s, s, generator=g)).clamp(0, 1)  # the object is visible in the image
    donor = torch.roll(torch.arange(n), 1)
    planted = {"constant": torch.full_like(targets, 0.5), "intensity": images,
               "fixed map": targets.mean(0, keepdim=True).expand(n, s, s),
               "anti-correlated": 1 - targets[donor], "donor's own target": targets[donor]}
    verdicts = {name: specificity_verdict(mean_ci(metrics.pearson(m, targets[donor]) - metrics.pearson(m, targets)))
                for name, m in planted.items()}
    for name in ("constant", "intensity", "fixed map", "anti-correlated"):
        assert verdicts[name].startswith("FAIL"), verdicts
    assert verdicts["donor's own target"].startswith("pass"), verdicts
