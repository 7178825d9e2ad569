"""fsosr.scoring: hand-computed values, the sign (higher = more known) of every score, MCM/GL-MCM against loops."""
import math

import pytest
import torch

from fsosr import scoring

CONFIDENT = [8.0, 0.0, 0.0, 0.0]   # an in-distribution-looking sample: one class dominates
UNIFORM = [1.0, 1.0, 1.0, 1.0]     # no class preferred


def test_logit_scores_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(scoring.msp(logits), torch.tensor([0.75, 0.5], dtype=torch.float64))
    torch.testing.assert_close(scoring.max_logit(logits), torch.tensor([math.log(3.0), 0.0], dtype=torch.float64))
    torch.testing.assert_close(scoring.energy(logits), torch.tensor([math.log(4.0), math.log(2.0)],
                                                                     dtype=torch.float64))
    # T * logsumexp(x / T): for [0, 0] and T = 2 this is 2 log 2
    assert scoring.energy(torch.zeros(1, 2), T=2.0).item() == pytest.approx(2 * math.log(2.0))
    # minus the entropy: p = (3/4, 1/4) -> 3/4 log 3/4 + 1/4 log 1/4; uniform over 2 -> -log 2
    expected = 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    torch.testing.assert_close(scoring.entropy(logits), torch.tensor([expected, -math.log(2.0)],
                                                                      dtype=torch.float64))


def test_logit_scores_are_stable_for_large_logits():
    big = torch.tensor([[1000.0, 1000.0], [1000.0, -1000.0]])
    torch.testing.assert_close(scoring.energy(big), torch.tensor([1000.0 + math.log(2.0), 1000.0]))
    torch.testing.assert_close(scoring.entropy(big), torch.tensor([-math.log(2.0), 0.0]))
    torch.testing.assert_close(scoring.msp(big), torch.tensor([0.5, 1.0]))


def test_entropy_of_minus_inf_logits_is_that_of_the_other_classes():
    # A -inf logit is a class with p = 0, which contributes exactly 0 (not 0 * -inf = NaN).
    p = 1.0 / (1.0 + math.e)                                         # softmax([1, 2]) = (p, 1 - p)
    expected = p * math.log(p) + (1 - p) * math.log(1 - p)          # -0.5822
    for dtype in (torch.float32, torch.float64):
        with_minus_inf = torch.tensor([[1.0, 2.0, -math.inf], [-math.inf, 0.0, -math.inf]], dtype=dtype,
                                      requires_grad=True)
        score = scoring.entropy(with_minus_inf)
        torch.testing.assert_close(score.detach(), torch.tensor([expected, 0.0], dtype=dtype))
        torch.testing.assert_close(score[0].detach(), scoring.entropy(torch.tensor([1.0, 2.0], dtype=dtype)))
        score.sum().backward()
        assert torch.isfinite(with_minus_inf.grad).all()            # the masked log p carries no NaN gradient
        assert with_minus_inf.grad[0, 2] == 0


def test_energy_with_small_temperature_does_not_overflow():
    # logits / T alone is inf in fp32 (1e37 / 0.01 = 1e39); the score itself, about 1e37, is representable.
    score = scoring.energy(torch.tensor([[1e37, 0.0], [-1e37, -1e37], [3.0, 1.0]]), T=0.01)
    assert score.dtype == torch.float32 and torch.isfinite(score).all()
    assert score[0].item() == pytest.approx(1e37, rel=1e-6) and score[1].item() == pytest.approx(-1e37, rel=1e-6)
    assert score[2].item() == pytest.approx(3.0 + 0.01 * math.log1p(math.exp(-200.0)), abs=1e-6)
    # Rows whose max is infinite are not shifted: all -inf stays -inf, a +inf logit gives +inf (as before).
    inf_rows = scoring.energy(torch.tensor([[-math.inf, -math.inf], [math.inf, 0.0], [1.0, -math.inf]]))
    assert inf_rows.tolist() == [-math.inf, math.inf, 1.0]


def test_softmax_scores_reach_the_lower_end_of_their_range_exactly():
    # The documented ranges are closed: uniform logits give exactly 1/C ([1/C, 1], [2/C, 2] for GL-MCM).
    assert scoring.msp(torch.zeros(1, 4)).item() == 0.25
    text = torch.eye(4)
    assert scoring.mcm(torch.zeros(1, 4) + 1.0, text).item() == pytest.approx(0.25, abs=1e-7)
    assert scoring.gl_mcm(torch.ones(1, 4), torch.ones(1, 2, 4), text).item() == pytest.approx(0.5, abs=1e-7)
    assert "[1/C, 1]" in scoring.msp.__doc__ and "[2/C, 2]" in scoring.gl_mcm.__doc__


@pytest.mark.parametrize("name", sorted(scoring.LOGIT_SCORES))
def test_every_logit_score_is_higher_for_a_confident_sample(name):
    logits = torch.tensor([CONFIDENT, UNIFORM])
    score = scoring.score_logits(name, logits)
    assert score.shape == (2,) and score[0] > score[1]


def test_score_logits_rejects_unknown_names_and_bad_input():
    with pytest.raises(ValueError, match="unknown score 'odin'"):
        scoring.score_logits("odin", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="T must be > 0"):
        scoring.energy(torch.zeros(1, 2), T=0.0)
    with pytest.raises(ValueError, match="floating"):
        scoring.msp(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[..., C\]"):
        scoring.max_logit(torch.zeros(3, 0))


def test_half_precision_logits_are_scored_in_float32():
    logits = torch.tensor([[9.0, 0.0], [9.5, 0.0]], dtype=torch.float16)
    assert torch.softmax(logits, dim=-1).amax(dim=-1).tolist() == [1.0, 1.0]  # an fp16 softmax ties them
    score = scoring.msp(logits)
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, torch.softmax(logits.float(), dim=-1).amax(dim=-1))
    assert score[1] > score[0]


def test_mcm_by_hand_is_scale_invariant_and_directional():
    text = torch.eye(2, 3)                         # class 0 along x, class 1 along y (D = 3)
    image = torch.tensor([[5.0, 0.0, 0.0],          # aligned with class 0 (norm 5: normalised inside)
                          [1.0, 1.0, 0.0]])         # equally close to both classes
    e = math.e
    torch.testing.assert_close(scoring.mcm(image, text), torch.tensor([e / (e + 1.0), 0.5]))
    # T = 0.5 sharpens: softmax([1, 0] / 0.5)
    assert scoring.mcm(image[:1], text, T=0.5).item() == pytest.approx(e**2 / (e**2 + 1.0))


def test_msp_of_clip_logits_is_mcm_at_temperature_one_hundredth():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(6, 16, generator=generator, dtype=torch.float64)
    text = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    logits = 100 * torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).t()
    torch.testing.assert_close(scoring.msp(logits), scoring.mcm(image, text, T=0.01))


def test_gl_mcm_adds_the_best_region_to_the_global_mcm():
    generator = torch.Generator().manual_seed(1)
    n, regions, classes, dim = 3, 7, 4, 8
    global_features = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    local_features = torch.randn(n, regions, dim, generator=generator, dtype=torch.float64)
    text = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    score = scoring.gl_mcm(global_features, local_features, text, T=1.0)
    for i in range(n):
        best_region = max(scoring.mcm(local_features[i, r:r + 1], text).item() for r in range(regions))
        expected = scoring.mcm(global_features[i:i + 1], text).item() + best_region
        assert score[i].item() == pytest.approx(expected, abs=1e-12)


def test_gl_mcm_direction_and_by_hand():
    text = torch.eye(2)
    uniform_region = torch.tensor([[1.0, 1.0]])
    aligned_region = torch.tensor([[0.0, 3.0]])
    global_features = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    local = torch.stack([torch.cat([uniform_region, aligned_region]), torch.cat([uniform_region, uniform_region])])
    e = math.e
    torch.testing.assert_close(scoring.gl_mcm(global_features, local, text),
                               torch.tensor([2 * e / (e + 1.0), 1.0]))


def test_feature_scores_check_shapes():
    text = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="feature size 5"):
        scoring.mcm(torch.zeros(2, 5), text)
    with pytest.raises(ValueError, match=r"image_features must have shape \[N, D\]"):
        scoring.mcm(torch.zeros(2, 2, 4), text)
    with pytest.raises(ValueError, match="local_features has 3 samples but global_features has 2"):
        scoring.gl_mcm(torch.zeros(2, 4), torch.zeros(3, 5, 4), text)
    with pytest.raises(ValueError, match=r"text_features must have shape \[C, D\]"):
        scoring.mcm(torch.zeros(2, 4), torch.zeros(4))
