"""Sampling filters against transformers' logits processors, on fresh random logits."""

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from exlcore.sampling import SamplingSettings, apply_repetition_penalty, filter_logits, sample


@pytest.fixture
def logits():
    return torch.randn(3, 200, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("settings,reference", [
    (SamplingSettings(temperature=0.7, top_k=12), [TemperatureLogitsWarper(0.7), TopKLogitsWarper(12)]),
    (SamplingSettings(temperature=1.3, top_p=0.8), [TemperatureLogitsWarper(1.3), TopPLogitsWarper(0.8)]),
    (SamplingSettings(temperature=1.0, min_p=0.05), [MinPLogitsWarper(0.05)]),
    (SamplingSettings(temperature=0.9, top_k=50, min_p=0.02, top_p=0.9),
     [TemperatureLogitsWarper(0.9), TopKLogitsWarper(50), MinPLogitsWarper(0.02), TopPLogitsWarper(0.9)]),
])
def test_filters_match_transformers(logits, settings, reference):
    expected = logits.clone()
    for proc in reference:
        expected = proc(None, expected)
    got = filter_logits(logits, settings)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(got[kept], expected[kept])


def test_repetition_penalty_matches_transformers(logits):
    seen = torch.randint(0, 200, (3, 30), generator=torch.Generator().manual_seed(1))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_sampling_is_seeded_and_follows_the_distribution(logits):
    s = SamplingSettings(temperature=1.0, top_k=5)
    draw = lambda seed: sample(logits, s, torch.empty(3, 0, dtype=torch.long), torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7))
    top5 = torch.topk(logits, 5).indices
    draws = torch.stack([draw(i) for i in range(200)])  # (200, 3)
    assert all(bool(torch.isin(draws[:, r], top5[r]).all()) for r in range(3))
    assert len(set(draws[:, 0].tolist())) > 1
    greedy = sample(logits, SamplingSettings(temperature=0), torch.empty(3, 0, dtype=torch.long), None)
    assert torch.equal(greedy, logits.argmax(-1))
