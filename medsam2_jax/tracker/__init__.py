"""The tracker: a fixed-size memory bank, a pure per-frame `step`, chunked `lax.scan` propagation,
and `VideoPredictor`, a stateful wrapper with the official `SAM2VideoPredictor` contract.

    state.py       TrackerState (pinned prompted frames + the memory policy's bank); init_state,
                   state_from_history (a state rebuilt from stored outputs)
    policies/      the memory policies (fifo: SAM 2's ring of recent frames, self_sorting, ...)
    step.py        step / track_frame / replay_frame / prompt_frame: `SAM2Base.track_step` as pure
                   functions (closest_cond_frames: `max_cond_frames_in_attn`)
    prompts.py     fixed-size padded prompts (points, box as two points, mask + flag)
    propagate.py   scan over fixed-size chunks, skipping padded and pinned frames; add_prompt; propagate
    predictor.py   init_state, add_new_points_or_box, add_new_mask, propagate_in_video, reset_state,
                   release_frame; Frames (a video made at the model resolution a chunk at a time)
    config.py      tracker knobs (max_cond_frames, chunk_size, feature_batch_size, max_points)
"""

from medsam2_jax.tracker.config import get_tracker_config
from medsam2_jax.tracker.predictor import VideoPredictor
from medsam2_jax.tracker.prompts import Prompt, make_prompt
from medsam2_jax.tracker.propagate import add_prompt, init_state, iter_propagate
from medsam2_jax.tracker.state import TrackerState, stack_states, state_from_history

# `propagate.propagate` and `step.step` are not re-exported: they would shadow their modules.

__all__ = [
    "Prompt", "TrackerState", "VideoPredictor", "add_prompt", "get_tracker_config", "init_state",
    "iter_propagate", "make_prompt", "stack_states", "state_from_history",
]
