"""The host contract's clock on explicit tables: which step a noise level belongs to, and each bucket's share."""

import pytest

from daam_core.engine.schedule import Moment
from daam_core.hosts.contract import SamplingClock, step_window

SIGMAS = [14.6, 8.0, 4.0, 2.0, 1.0, 0.0]  # five steps, then the final 0 (not a step)


def test_steps_come_from_the_table_and_intermediate_levels_from_the_step_they_started_in():
    clock = SamplingClock(SIGMAS)
    assert clock.steps == 5
    assert [clock.step_of(s) for s in (14.6, 8.0, 4.0, 2.0, 1.0)] == [0, 1, 2, 3, 4]
    assert clock.step_of(6.0) == 1 and clock.step_of(0.5) == 4  # e.g. dpm_2's mid-point evaluations


def test_second_order_timesteps_are_one_step_each():
    clock = SamplingClock([999, 999, 800, 800, 600])  # Heun-type schedulers repeat each timestep
    assert clock.steps == 3 and [clock.step_of(t) for t in (999, 800, 600)] == [0, 1, 2]


def test_a_schedule_that_goes_back_up_is_read_forwards():
    clock = SamplingClock([14.6, 8.0, 4.0, 8.0, 4.0, 1.0, 0.0])
    assert [clock.step_of(s) for s in (14.6, 8.0, 4.0, 8.0, 4.0, 1.0)] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("steps,buckets,shares", [(8, 4, [2, 2, 2, 2]), (6, 4, [2, 1, 2, 1]), (3, 4, [1, 1, 1, 0]),
                                                  (10, 3, [4, 3, 3])])
def test_each_bucket_holds_its_share_of_the_steps(steps, buckets, shares):
    assert [sum(1 for i in range(steps) if Moment(i, steps).bucket(buckets) == b) for b in range(buckets)] == shares


def test_the_window_rule_decides_inside():
    clock = SamplingClock([900, 700, 500, 300], step_window(0.5, 1.0))
    assert [clock.moment(t).inside for t in (900, 700, 500, 300)] == [False, False, True, True]
    assert clock.moment(500) == Moment(2, 4, True)
    assert SamplingClock.window_only(lambda level, step, steps: level < 5).moment(3.0) == Moment(0, 1, True)
    with pytest.raises(ValueError, match="not one of the sampling's 4 steps"):
        Moment(4, 4)
