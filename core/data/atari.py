"""Real emulator video with the action of every step: Atari games played by a seeded random policy.

`ale-py` (pinned in pyproject) bundles the ROMs, so this source is fully offline. Each clip starts from
a reset game, plays a random number of warm-up steps, then records `frames` screens; between two
recorded screens one action of the game's minimal action set is repeated for `frame_skip` emulator
frames, and an action is held for a random number of recorded steps (`hold`), so short gaps share
the label. Sticky actions are off, so a clip is a pure function of (game, seed, clip index): clip v
uses the stream `default_rng([seed, v])` and its own reset, and does not change with `num_videos`.

actions (T-1, A) are one-hot over the minimal action set; action_labels are indices into it
(`action_names(game)` names them, e.g. Breakout: NOOP, FIRE, RIGHT, LEFT). The 210x160 screen is
squashed to a square by default: a centre crop would cut the Breakout paddle at the bottom.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from core.data.clips import VideoClip, resize_frames
from core.data.errors import DataError

ALE_PIN = "ale-py==0.12.1"
_MAX_RESTARTS = 10  # a clip that keeps hitting game over within its few hundred frames means bad settings


def action_names(game: str) -> list[str]:
    """Names of the game's minimal action set, in label order."""
    return [action.name for action in _ale(game).getMinimalActionSet()]


def make_atari_clips(
    *,
    game: str = "breakout",
    seed: int = 0,
    num_videos: int = 20,
    frames: int = 20,
    frame_skip: int = 4,
    hold: Sequence[int] = (2, 6),
    warmup: Sequence[int] = (0, 60),
    image_size: int = 64,
    crop: str = "squash",
) -> list[VideoClip]:
    """`num_videos` clips `{game}_{i:04d}` of `frames` screens (ranges inclusive, in recorded steps)."""
    if num_videos < 1 or frames < 2 or frame_skip < 1:
        raise ValueError(
            f"need num_videos >= 1, frames >= 2, frame_skip >= 1; got {num_videos}, {frames}, {frame_skip}"
        )
    for name, (lo, hi), low in (("hold", hold, 1), ("warmup", warmup, 0)):
        if not low <= lo <= hi:
            raise ValueError(
                f"atari generator: {name} must be [lo, hi] with {low} <= lo <= hi, got {[lo, hi]}"
            )
    ale = _ale(game)
    actions = ale.getMinimalActionSet()
    eye = np.eye(len(actions), dtype=np.float32)
    clips = []
    for v in range(num_videos):
        rng = np.random.default_rng([seed, v])
        screens, labels = _play(ale, actions, rng, frames, frame_skip, hold, warmup)
        clips.append(
            VideoClip(
                name=f"{game}_{v:04d}",
                frames=resize_frames(screens, image_size, crop),
                actions=eye[labels],
                action_labels=labels,
                task=game,
            )
        )
    return clips


def _play(
    ale: Any,
    actions: list[Any],
    rng: np.random.Generator,
    frames: int,
    frame_skip: int,
    hold: Sequence[int],
    warmup: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """(screens (T, 210, 160, 3) uint8, labels (T-1,) int64) of one clip; restarts it on game over."""
    steps = frames - 1
    for _ in range(_MAX_RESTARTS):
        ale.reset_game()
        for _ in range(int(rng.integers(warmup[0], warmup[1] + 1)) * frame_skip):
            ale.act(actions[int(rng.integers(len(actions)))])
        lens = rng.integers(hold[0], hold[1] + 1, size=steps)  # hold of each action, at least one per step
        labels = np.repeat(rng.integers(len(actions), size=steps), lens)[:steps].astype(np.int64)
        screens = [ale.getScreenRGB()]
        for label in labels:
            for _ in range(frame_skip):
                ale.act(actions[label])
            screens.append(ale.getScreenRGB())
            if ale.game_over():
                break
        else:
            return np.stack(screens), labels
    raise RuntimeError(
        f"game over in {_MAX_RESTARTS} attempts at one clip: use fewer frames or a shorter warmup"
    )


@cache
def _ale(game: str) -> Any:
    """One emulator per game and process (loading a ROM costs ~0.1 s); clips reset it, so sharing is safe."""
    try:
        from ale_py import ALEInterface, LoggerMode, roms
    except ImportError:
        raise DataError(
            f"data.kind=atari needs ale-py, which bundles the ROMs: pip install '{ALE_PIN}'"
        ) from None
    known = roms.get_all_rom_ids()
    if game not in known:
        near = difflib.get_close_matches(game, known, n=3)
        raise DataError(f"atari game {game!r} is not among ale-py's {len(known)} ROMs (did you mean {near}?)")
    ALEInterface.setLoggerMode(LoggerMode.Error)
    ale = ALEInterface()
    ale.setInt("random_seed", 0)  # deterministic emulator; the policy's randomness comes from the clip's rng
    ale.setFloat("repeat_action_probability", 0.0)
    ale.setInt("frame_skip", 1)
    ale.loadROM(roms.get_rom_path(game))
    return ale
