"""Expert load statistics (control/load.py, parallel.expert_load, schedmoe train's log): the
moving average of pairs per expert on each rank, summed over the ranks, read against the
placement; checked against the counts each call reported, gathered independently."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import schedmoe
import schedmoe.parallel as par
from schedmoe.control.load import ExpertLoad, LoadStats
from schedmoe.tools.testing import run_ranks

M, E, H, T = 16, 8, 32, 64


def test_moving_average_and_balancedness():
    load = ExpertLoad(decay=0.5)
    load.observe(torch.tensor([4, 0, 0, 0]), torch.tensor([1, 0, 0, 0]))
    load.observe(torch.tensor([0, 4, 0, 0]), torch.tensor([0, 0, 0, 0]))
    assert load.average_2E.tolist() == [[2.0, 2.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]
    stats = LoadStats([6.0, 2.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], ranks=2)
    assert stats.per_rank == [8.0, 2.0] and stats.balancedness == pytest.approx(5 / 8)
    assert stats.dropped_fraction == pytest.approx(0.1)
    assert LoadStats([1.0] * 4, [0.0] * 4, ranks=4).balancedness == 1.0
    with pytest.raises(ValueError, match="decay"):
        ExpertLoad(decay=1.0)


def _skewed_load(rank: int, world: int) -> tuple[dict, list]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(schedmoe.MoELayer(M, E, H, top_k=2, capacity_factor=1.0))
    layer = model[0]
    with torch.no_grad():  # a router that favours expert 0 (held by rank 0)
        layer.gate.wg_EM[0] = layer.gate.wg_EM[1:].abs().mean(0)  # x + 1 favours expert 0
    calls = []
    for step in range(3):
        x = torch.randn(T, M, generator=torch.Generator().manual_seed(10 * rank + step)) + 1.0
        layer(x)
        counts = torch.tensor([layer.last_stats.counts, layer.last_stats.dropped_per_expert],
                              dtype=torch.float64)
        gathered = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts)
        calls.append(sum(gathered).tolist())
    stats = par.expert_load(model)["0"]
    return stats.as_dict(), calls


def test_expert_load_sums_the_ranks_moving_averages():
    for found, calls in run_ranks(_skewed_load, 2):
        want = torch.tensor(calls[0])
        for summed in calls[1:]:  # the moving average, decay 0.9, from the first call
            want = 0.9 * want + 0.1 * torch.tensor(summed)
        torch.testing.assert_close(torch.tensor([found["tokens"], found["dropped"]]), want,
                                   rtol=1e-5, atol=1e-4)
        per_rank = [sum(want[0, :4].tolist()), sum(want[0, 4:].tolist())]
        assert found["per_rank"] == pytest.approx(per_rank, rel=1e-5)
        assert found["balancedness"] == pytest.approx(sum(per_rank) / 2 / max(per_rank), rel=1e-5)
        assert found["balancedness"] < 0.95  # the skew shows
        assert found["dropped_fraction"] > 0  # capacity 1.0 under skew drops pairs


def test_a_layer_not_called_yet_has_no_load():
    assert par.expert_load(torch.nn.Sequential(schedmoe.MoELayer(M, 4, H))) == {}
