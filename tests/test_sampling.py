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
    s = SamplingSettings(temperature=0.7, top_k=5)
    draw = lambda rows, seed: sample(rows, s, torch.empty(len(rows), 0, dtype=torch.long),
                                     torch.Generator().manual_seed(seed))
    assert torch.equal(draw(logits, 7), draw(logits, 7))
    # 20000 draws per row: their frequencies against transformers' distribution (total variation).
    n = 20000
    draws = draw(logits.repeat_interleave(n, 0), 8).view(3, n)
    expected = torch.softmax(TopKLogitsWarper(5)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())), -1)
    frequencies = torch.zeros_like(expected).scatter_add_(1, draws, torch.ones(3, n)) / n
    assert float((frequencies - expected).abs().sum(-1).max()) / 2 < 0.02
    greedy = sample(logits, SamplingSettings(temperature=0), torch.empty(3, 0, dtype=torch.long), None)
    assert torch.equal(greedy, logits.argmax(-1))
