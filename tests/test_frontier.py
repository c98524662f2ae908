"""The Pareto frontier and the area under accuracy-FLOPs curves, on hand-made points."""
import pytest

from scripts.repro.frontier import common_window, mean_accuracy_over, on_frontier


def test_frontier_membership():
    costs = [1.0, 2.0, 2.0, 3.0, 4.0, 1.5]
    accs = [0.5, 0.7, 0.6, 0.7, 0.9, 0.4]
    # (2, .6) loses to (2, .7); (3, .7) costs more than (2, .7); (1.5, .4) loses to (1, .5)
    assert on_frontier(costs, accs) == [True, True, False, False, True, False]
    assert on_frontier([1.0, 1.0], [0.5, 0.5]) == [True, True]  # ties dominate neither


def test_common_window():
    assert common_window([[1.0, 5.0], [2.0, 4.0, 6.0]]) == (2.0, 5.0)
    assert common_window([[1.0, 2.0], [3.0, 4.0]]) is None
    assert common_window([]) is None


def test_mean_accuracy_is_the_area_of_the_best_so_far_steps():
    # best accuracy: 0.5 on [1, 2), 0.7 on [2, 4), 0.9 from 4; window [1, 5]
    costs, accs = [1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.6, 0.9]
    assert mean_accuracy_over(costs, accs, (1.0, 5.0)) == pytest.approx(
        (0.5 * 1 + 0.7 * 2 + 0.9 * 1) / 4)
    # a window inside one step
    assert mean_accuracy_over(costs, accs, (2.5, 3.5)) == pytest.approx(0.7)
    # a method with no point at or below the window's start has no area there
    assert mean_accuracy_over([2.0, 3.0], [0.5, 0.6], (1.0, 3.0)) is None
    # one point: constant from its cost on
    assert mean_accuracy_over([1.0], [0.8], (1.0, 2.0)) == pytest.approx(0.8)
