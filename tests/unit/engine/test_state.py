"""distvit.engine.state: the counters a resume continues from."""

import math

from distvit.engine.state import TrainState


def test_state_dict_round_trip_and_epoch_end():
    state = TrainState(epoch=2, step=17, samples_in_epoch=96, last_eval={"accuracy": 0.5}, best_score=0.5)
    copy = TrainState()
    copy.load_state_dict(state.state_dict())
    assert copy == state
    copy.last_eval["accuracy"] = 0.0  # a copy, not the same dict
    assert state.last_eval == {"accuracy": 0.5}
    state.finish_epoch()
    assert (state.epoch, state.step, state.samples_in_epoch) == (3, 17, 0)


def test_earliest_checkpoints_have_no_best_score():
    state = TrainState()
    state.load_state_dict({"epoch": 1, "step": 4, "samples_in_epoch": 0, "metrics": {}})
    assert state.step == 4 and math.isinf(state.best_score) and state.best_score < 0
