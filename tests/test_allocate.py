import pytest
import torch

from evagraph.passes.allocate import allocate


def test_hand_made_profiles_give_expected_ranks():
    ratios = {
        "a": torch.tensor([0.50, 0.30, 0.10, 0.05]),
        "b": torch.tensor([0.40, 0.35, 0.20, 0.01]),
        "c": torch.tensor([0.05, 0.04, 0.03, 0.02]),
    }
    # r=2, rho=2: k=4, budget 6 -> top six: .50 .40 .35 .30 .20 .10
    assert allocate(ratios, budget=2, rho=2) == {"a": 3, "b": 3, "c": 0}


@pytest.mark.parametrize("budget,rho", [(1, 1.0), (4, 1.5), (4, 2.0), (3, 3.0), (8, 1.3)])
def test_ranks_sum_to_budget_and_respect_cap(budget, rho):
    g = torch.Generator().manual_seed(budget)
    k = round(budget * rho)
    ratios = {
        f"l{i}": torch.sort(torch.rand(k, generator=g) ** (i + 1), descending=True).values
        for i in range(7)
    }
    ranks = allocate(ratios, budget, rho)
    assert sum(ranks.values()) == budget * 7
    assert max(ranks.values()) <= k


def test_rho_one_gives_uniform_ranks():
    ratios = {"a": torch.tensor([0.9, 0.05, 0.01]), "b": torch.tensor([0.1, 0.09, 0.08])}
    assert allocate(ratios, budget=3, rho=1.0) == {"a": 3, "b": 3}


def test_layer_with_few_components_caps_total():
    ratios = {"a": torch.tensor([0.9]), "b": torch.tensor([0.5, 0.3, 0.1, 0.05])}
    ranks = allocate(ratios, budget=2, rho=2)
    assert ranks == {"a": 1, "b": 3}
