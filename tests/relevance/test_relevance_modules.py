"""knowing / balancing / attending on hand-made tokens: what they score, keep and pass gradients to."""

import pytest
import torch
import torch.nn.functional as F

from vlm_tune.relevance.attending import Attending, keep_count, select_pool, select_random
from vlm_tune.relevance.balancing import OPPONENT_PAIRS, Balancing, novelty
from vlm_tune.relevance.knowing import SPREAD_FLOOR, Knowing, neighbour_mean, standardise


def test_keep_count_fractions_round_up_and_counts_are_capped():
    assert keep_count(0.25, 16) == 4
    assert keep_count(0.5, 9) == 5  # 4.5 rounds up
    assert keep_count(0.01, 10) == 1  # never zero
    assert keep_count(1.0, 7) == 7
    assert keep_count(3, 16) == 3
    assert keep_count(40, 16) == 16
    assert keep_count(0.5, 0) == 0
    for bad in (0, -2, 0.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="relevance.keep"):
            keep_count(bad, 10)


def _features(units=2, tokens=6, width=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(units, tokens, width, generator=generator)


def test_attending_keeps_the_top_k_in_order_with_unchanged_values():
    features = _features()
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    relevance = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 1.0], [2.0, -1.0, 1.0, 0.0, 9.0, 9.0]])
    selection = Attending(8)(relevance, features, valid, torch.tensor([3, 2]))

    assert selection.kept_counts.tolist() == [3, 2]
    assert selection.slots[0][selection.slot_valid[0]].tolist() == [1, 3, 5]  # top-3, original order
    assert selection.slots[1][selection.slot_valid[1]].tolist() == [0, 2]  # padding (score 9) never kept
    assert torch.equal(selection.values[0], features[0, [1, 3, 5]])  # exactly the features in the forward pass
    assert torch.equal(selection.values[1, :2], features[1, [0, 2]])


def test_attending_sends_gradient_to_relevance_and_sharpness():
    features = _features()
    valid = torch.ones(2, 6, dtype=torch.bool)
    relevance = torch.randn(2, 6, requires_grad=True)
    attending = Attending(8, summary_token=True)
    selection = attending(relevance, features, valid, torch.tensor([2, 6]))
    target = torch.randn_like(selection.values)
    (selection.values * target).sum().backward()

    assert relevance.grad is not None and relevance.grad.abs().sum() > 0
    assert relevance.grad[0].abs().gt(0).sum() >= 3  # kept and (through the summary) dropped tokens
    for name, parameter in attending.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_summary_token_sits_at_last_dropped_slot_and_mixes_dropped_tokens():
    features = _features(units=1)
    valid = torch.ones(1, 6, dtype=torch.bool)
    relevance = torch.tensor([[5.0, 0.0, 4.0, 1.0, 3.0, 2.0]])  # keep 0, 2; drop 1, 3, 4, 5
    selection = Attending(8, summary_token=True)(relevance, features, valid, torch.tensor([2]))

    assert selection.summary_slot.tolist() == [5]
    assert selection.slots[0].tolist() == [0, 2, 5]
    weights = torch.softmax(torch.tensor([0.0, 1.0, 3.0, 2.0]), 0)
    expected = (weights[:, None] * features[0, [1, 3, 4, 5]]).sum(0)
    torch.testing.assert_close(selection.values[0, 2], expected)


def test_random_baseline_keeps_k_distinct_valid_tokens_in_order():
    features = _features(units=3, tokens=10)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 6:] = False
    counts = torch.tensor([3, 5, 4])
    draws = [select_random(features, valid, counts, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    for selection in draws:
        for unit, count in enumerate(counts.tolist()):
            slots = selection.slots[unit][selection.slot_valid[unit]]
            assert len(slots) == count and torch.all(slots[1:] > slots[:-1])
            assert bool(valid[unit, slots].all())
    assert not torch.equal(draws[0].slots, draws[1].slots)


def test_pool_baseline_averages_grid_blocks_and_falls_back_to_1d():
    features = torch.arange(16.0).reshape(1, 16, 1).repeat(1, 1, 2)  # 4x4 grid, value = index
    valid = torch.ones(1, 16, dtype=torch.bool)
    selection = select_pool(features, valid, torch.tensor([4]), grids=[(4, 4)])
    assert selection.values[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 block means
    assert torch.all(selection.slots[0][1:] > selection.slots[0][:-1])

    selection = select_pool(features, valid, torch.tensor([3]), grids=[(4, 4)])  # 1 row x 3 columns
    assert selection.values[0, :, 0].tolist() == pytest.approx([6.5, 7.5, 8.5])
    assert selection.slots[0].tolist() == [4, 5, 6]

    selection = select_pool(features, valid, torch.tensor([5]), grids=[(4, 4)])  # no 2-D split: 1-D regions
    assert selection.values[0, :, 0].tolist() == pytest.approx([1.5, 4.5, 7.5, 10.5, 13.5])
    assert selection.slots[0].tolist() == [1, 4, 7, 10, 13]


def test_neighbour_mean_uses_the_grid_when_known():
    tokens = torch.arange(9.0).reshape(1, 9, 1)
    valid = torch.ones(1, 9, dtype=torch.bool)
    on_grid = neighbour_mean(tokens, valid, [(3, 3)])
    in_line = neighbour_mean(tokens, valid, [None])
    assert on_grid[0, 4, 0] == pytest.approx((36 - 4) / 8)  # the 8 neighbours of the centre
    assert on_grid[0, 0, 0] == pytest.approx((1 + 3 + 4) / 3)
    assert in_line[0, 4, 0] == pytest.approx((3 + 5) / 2)


def _knowing_inputs(prompt_seed=1):
    generator = torch.Generator().manual_seed(0)
    background = torch.randn(16, generator=generator)  # most tokens: the same feature, slightly perturbed
    visual = background + 0.05 * torch.randn(1, 9, 16, generator=generator)
    visual[0, 4] = torch.linspace(-3, 3, 16)  # one token unlike the rest
    prompt = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(prompt_seed))
    return visual, torch.ones(1, 9, dtype=torch.bool), prompt, torch.ones(1, 5, dtype=torch.bool)


def test_knowing_scores_the_odd_token_as_salient_and_informative():
    torch.manual_seed(0)
    knowing = Knowing(16, 16, hidden_size=32)
    visual, valid, prompt, prompt_valid = _knowing_inputs()
    visual[0, 4] *= 3  # and with more energy
    scores = knowing(visual, valid, prompt, prompt_valid, [(3, 3)])
    assert scores.salience[0].argmax() == 4
    assert scores.information[0].argmax() == 4
    for score in (scores.information, scores.salience, scores.coupling):
        assert score.shape == (1, 9)
        # Unit spread, a little less where the raw score's spread is near the floor (standardise).
        assert score.mean().abs() < 1e-5 and 0.9 < score.std(unbiased=False).item() <= 1.0 + 1e-5


def test_standardise_keeps_flat_scores_flat_with_bounded_gradient():
    valid = torch.ones(2, 6, dtype=torch.bool)
    raw = torch.stack([torch.linspace(0, 5, 6), 3.0 + 1e-6 * torch.arange(6.0)]).requires_grad_()  # row 1 is flat
    out = standardise(raw, valid)
    assert out[0].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert out[1].abs().max() < 1e-3  # a flat row ranks nothing
    upstream = torch.arange(6.0)
    (out[1] * upstream).sum().backward()
    assert raw.grad[1].norm() <= upstream.norm() / SPREAD_FLOOR  # about 1e6 times more before the floor


def test_query_coupling_depends_on_the_prompt_in_context():
    torch.manual_seed(0)
    knowing = Knowing(16, 16, hidden_size=32)
    visual, valid, prompt, prompt_valid = _knowing_inputs()
    first = knowing(visual, valid, prompt, prompt_valid, [None]).coupling
    reordered = knowing(visual, valid, prompt.flip(1), prompt_valid, [None]).coupling  # same tokens, other order
    other = knowing(visual, valid, _knowing_inputs(prompt_seed=2)[2], prompt_valid, [None]).coupling
    assert not torch.allclose(first, other, atol=1e-4)
    assert torch.isfinite(knowing(visual, valid, prompt, torch.zeros_like(prompt_valid), [None]).coupling).all()
    assert reordered.shape == first.shape


def test_balancing_exposes_opponent_pair_weights_per_image():
    torch.manual_seed(0)
    knowing, balancing = Knowing(16, 16, hidden_size=32), Balancing(32)
    visual, valid, prompt, prompt_valid = _knowing_inputs()
    visual, valid = visual.repeat(3, 1, 1), valid.repeat(3, 1)
    prompt, prompt_valid = prompt.repeat(3, 1, 1), prompt_valid.repeat(3, 1)
    relevance = balancing(knowing(visual, valid, prompt, prompt_valid, [None] * 3), valid)

    assert relevance.shape == (3, 9)
    weights = balancing.last_weights
    assert set(weights) == {name for pair in OPPONENT_PAIRS for name in pair}
    for first, second in OPPONENT_PAIRS:
        assert weights[first].shape == (3,)
        torch.testing.assert_close(weights[first] + weights[second], torch.ones(3))


def test_novelty_marks_a_duplicate_of_a_higher_ranked_token():
    visual = F.normalize(torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    visual[0, 3] = visual[0, 1]
    ranking = torch.tensor([[0.0, 3.0, 1.0, 2.0]])  # token 3 ranks below its twin, token 1
    scores = novelty(visual, ranking, torch.ones(1, 4, dtype=torch.bool))
    assert scores[0, 3] == pytest.approx(0.0, abs=1e-5)
    assert scores[0, 1] == pytest.approx(1.0)  # the top token has nothing above it
    assert standardise(scores, torch.ones(1, 4, dtype=torch.bool)).argmin() == 3


def test_exploration_tries_every_token_in_training_and_none_at_inference():
    torch.manual_seed(0)
    relevance = standardise(torch.linspace(2, -2, 8)[None], torch.ones(1, 8, dtype=torch.bool))  # token 7 last
    features, valid, counts = torch.randn(1, 8, 4), torch.ones(1, 8, dtype=torch.bool), torch.tensor([2])
    attending = Attending(4, exploration=1.0).train()
    tried = set()
    for _ in range(400):
        tried |= set(attending(relevance, features, valid, counts).slots[0].tolist())
    assert tried == set(range(8))  # dropped tokens get chosen now and then, so they can get gradient
    attending.eval()
    assert all(attending(relevance, features, valid, counts).slots[0].tolist() == [0, 1] for _ in range(20))
    quiet = Attending(4, exploration=0.0).train()
    assert all(quiet(relevance, features, valid, counts).slots[0].tolist() == [0, 1] for _ in range(20))
