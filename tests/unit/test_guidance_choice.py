"""The automatic guidance rule (algorithms/guidance_choice.py) on a stub scorer whose best cell is known."""

from __future__ import annotations

import math

import pytest
from comfyui_ip2p.algorithms.guidance_choice import choose_cell

IMAGE_SCALES = [1.0, 1.5, 2.0]
TEXT_SCALES = [5.0, 7.5, 10.0]
CELLS = [(s_i, s_t) for s_i in IMAGE_SCALES for s_t in TEXT_SCALES]


def stub_scorer(s_i: float, s_t: float) -> tuple[float, float]:
    """(sim_dir, sim_image): stronger text guidance follows the text more and keeps less of the input, stronger
    image guidance the reverse, as in the paper's trade-off curve."""
    return 0.05 * s_t - 0.02 * s_i, 0.9 - 0.04 * s_t + 0.1 * s_i


def scores(scorer=stub_scorer) -> tuple[list[float], list[float]]:
    pairs = [scorer(s_i, s_t) for s_i, s_t in CELLS]
    return [d for d, _ in pairs], [s for _, s in pairs]


def test_best_direction_among_cells_that_keep_enough_of_the_input():
    sim_dir, sim_image = scores()
    minimum = 0.6
    expected = max((i for i in range(len(CELLS)) if sim_image[i] >= minimum), key=lambda i: sim_dir[i])
    choice = choose_cell(sim_dir, sim_image, minimum)
    assert choice.index == expected and choice.passed
    assert CELLS[choice.index] == (1.0, 10.0)  # the strongest text guidance still keeps 0.6 of the input here
    assert choice.passing == tuple(s >= minimum for s in sim_image)


def test_a_stricter_minimum_moves_the_choice_to_more_faithful_cells():
    sim_dir, sim_image = scores()
    choice = choose_cell(sim_dir, sim_image, 0.75)
    assert CELLS[choice.index] == (1.5, 7.5)  # 0.9 - 0.3 + 0.15 = 0.75: the best sim_dir that still keeps 0.75


def test_without_a_passing_cell_the_most_faithful_is_returned_and_flagged():
    sim_dir, sim_image = scores()
    choice = choose_cell(sim_dir, sim_image, 0.99)
    assert not choice.passed and not any(choice.passing)
    assert CELLS[choice.index] == (2.0, 5.0)


def test_ties_keep_the_first_cell_and_nan_never_wins():
    choice = choose_cell([0.3, 0.3, math.nan], [0.8, 0.8, 0.9], 0.7)
    assert choice.index == 0 and choice.passing == (True, True, False)
    with pytest.raises(ValueError, match="finite"):
        choose_cell([0.1], [0.9], math.nan)
    with pytest.raises(ValueError, match="per cell"):
        choose_cell([0.1, 0.2], [0.9], 0.5)
