"""Synthetic pushing videos: the video family's embedded default, with a known action for every step.

An agent (a red square) moves on a plain background and pushes 1-3 other shapes (squares, discs,
diamonds in other colours). Its action (a direction among 4 or 8, and a speed) is held for a segment
of several steps, so pairs with short gaps share a label. The agent is drawn on top and never
stopped: a segment's direction is drawn among those that keep the agent inside the frame for the
whole segment, so the commanded motion is always visible and a pair's label is recoverable from the
pixels. Shapes are pushed out of the agent along the axis of least overlap and stop at the walls.

Coordinates: x to the right, y down, in pixels of the rendered frame. Direction d of D points at
angle 2*pi*d/D counter-clockwise from the right as seen on screen (d=0 right, D/4 up); speeds are in
image sides per step. Label = direction * len(speeds) + speed index. Edges are anti-aliased (exact
pixel coverage for squares), so sub-pixel steps change the frame.

Every video has its own random stream `default_rng([seed, video])`: a video does not change when
`num_videos` changes. The simulation steps all videos at once; drawing is vectorised over videos,
frames and pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from core.data.clips import VideoClip

AGENT_COLOUR = (230, 40, 40)
OBJECT_COLOURS = (
    (40, 200, 60),
    (50, 90, 230),
    (240, 210, 40),
    (40, 210, 220),
    (200, 60, 220),
    (235, 235, 235),
)
SHAPES = ("square", "disc", "diamond")
BACKGROUND_LEVELS = (10, 90)  # plain grey background, one level per video
_RENDER_CHUNK = 32  # videos drawn at once: bounds the (chunk, T, S, S, 3) float canvas


def num_classes(directions: int = 8, speeds: Sequence[float] = (0.03, 0.06)) -> int:
    return directions * len(speeds)


def direction_vectors(directions: int) -> np.ndarray:
    """(D, 2) unit (x, y) steps in image coordinates (y down): direction 0 right, counter-clockwise."""
    angle = 2 * np.pi * np.arange(directions) / directions
    return np.round(np.stack([np.cos(angle), -np.sin(angle)], axis=1), 12) + 0.0  # exact 0 and 1 on the axes


def make_moving_objects(
    *,
    seed: int = 0,
    num_videos: int = 100,
    frames: int = 20,
    image_size: int = 32,
    num_objects: Sequence[int] = (1, 3),
    agent_size: float = 0.2,
    object_size: Sequence[float] = (0.15, 0.25),
    directions: int = 8,
    speeds: Sequence[float] = (0.03, 0.06),
    segment_len: Sequence[int] = (3, 6),
) -> list[VideoClip]:
    """`num_videos` clips `mo_{i:04d}` of `frames` frames at `image_size` pixels (ranges inclusive).

    actions (T-1, 3) = (unit x, unit y, speed in image sides per step) of the agent's step.
    """
    _check(
        num_videos, frames, image_size, num_objects, agent_size, object_size, directions, speeds, segment_len
    )
    size = float(image_size)
    speeds_px = np.asarray(speeds, dtype=np.float64) * size  # (P,)
    agent_half = agent_size * size / 2
    draws = [
        _draw_video(
            np.random.default_rng([seed, v]),
            frames,
            size,
            num_objects,
            agent_half,
            object_size,
            speeds,
            segment_len,
        )
        for v in range(num_videos)
    ]
    stacked = {key: np.stack([d[key] for d in draws]) for key in draws[0]}
    agent_xy, object_xy, direction, speed = _simulate(
        stacked, direction_vectors(directions), speeds_px, agent_half, size
    )
    actions = np.concatenate(
        [direction_vectors(directions)[direction], np.asarray(speeds)[speed][..., None]], axis=-1
    ).astype(np.float32)  # (V, T-1, 3)
    labels = (direction * len(speeds) + speed).astype(np.int64)  # (V, T-1)

    clips = []
    for start in range(0, num_videos, _RENDER_CHUNK):
        part = slice(start, start + _RENDER_CHUNK)
        video = _render(
            agent_xy[part], object_xy[part], agent_half, {k: v[part] for k, v in stacked.items()}, image_size
        )
        for i, v in enumerate(range(start, min(start + _RENDER_CHUNK, num_videos))):
            clips.append(
                VideoClip(
                    name=f"mo_{v:04d}",
                    frames=video[i],
                    actions=actions[v],
                    action_labels=labels[v],
                    task="moving_objects",
                )
            )
    return clips


def _check(
    num_videos: int,
    frames: int,
    image_size: int,
    num_objects: Sequence[int],
    agent_size: float,
    object_size: Sequence[float],
    directions: int,
    speeds: Sequence[float],
    segment_len: Sequence[int],
) -> None:
    problems = []
    if num_videos < 1 or frames < 2 or image_size < 8:
        problems.append(
            f"need num_videos >= 1, frames >= 2, image_size >= 8; got {num_videos}, {frames}, {image_size}"
        )
    if len(num_objects) != 2 or not 0 <= num_objects[0] <= num_objects[1] <= len(OBJECT_COLOURS):
        problems.append(
            f"num_objects must be [lo, hi] with 0 <= lo <= hi <= {len(OBJECT_COLOURS)}, got {num_objects}"
        )
    if not 0 < agent_size < 0.5:
        problems.append(f"agent_size must be in (0, 0.5), got {agent_size}")
    if len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] < 0.5:
        problems.append(f"object_size must be [lo, hi] with 0 < lo <= hi < 0.5, got {object_size}")
    if directions not in (4, 8):
        problems.append(f"directions must be 4 or 8, got {directions}")
    if not speeds or min(speeds) <= 0 or len(set(speeds)) != len(speeds):
        problems.append(f"speeds must be distinct positive numbers, got {speeds}")
    if len(segment_len) != 2 or not 1 <= segment_len[0] <= segment_len[1]:
        problems.append(f"segment_len must be [lo, hi] with 1 <= lo <= hi, got {segment_len}")
    elif speeds and max(speeds) * segment_len[1] > (1 - agent_size) / 2 + 1e-9:
        # a segment's travel must fit in half the free width, or some positions have no legal direction
        problems.append(
            f"max(speeds) * segment_len[1] = {max(speeds) * segment_len[1]:.3g} exceeds "
            f"(1 - agent_size) / 2 = {(1 - agent_size) / 2:.3g}: lower the speeds or the segment length"
        )
    if problems:
        raise ValueError("moving_objects generator: " + "; ".join(problems))


def _draw_video(
    rng: np.random.Generator,
    frames: int,
    size: float,
    num_objects: Sequence[int],
    agent_half: float,
    object_size: Sequence[float],
    speeds: Sequence[float],
    segment_len: Sequence[int],
) -> dict[str, np.ndarray]:
    """Every random number one video needs, drawn up front so the simulation can run batched."""
    steps, slots = frames - 1, num_objects[1]  # object slots; the first `count` are active
    half = rng.uniform(object_size[0], object_size[1], size=slots) * size / 2  # (O,)
    lens = rng.integers(segment_len[0], segment_len[1] + 1, size=math.ceil(steps / segment_len[0]) + 1)
    starts = np.cumsum(lens) - lens
    keep = starts < steps
    seg_len = np.zeros(steps, dtype=np.int64)  # length of the segment starting at t, 0 elsewhere
    seg_len[starts[keep]] = np.minimum(lens[keep], steps - starts[keep])
    return {
        "agent": rng.uniform(agent_half, size - agent_half, size=2),  # (2,) centre
        "object": rng.uniform(half[:, None], size - half[:, None], size=(slots, 2)),  # (O, 2) centres
        "half": half,
        "active": np.arange(slots) < rng.integers(num_objects[0], num_objects[1] + 1),  # (O,)
        "shape": rng.integers(0, len(SHAPES), size=slots),  # (O,)
        "colour": np.asarray(OBJECT_COLOURS, dtype=np.float32)[rng.permutation(len(OBJECT_COLOURS))[:slots]],
        "background": np.full(3, rng.uniform(*BACKGROUND_LEVELS), dtype=np.float32),
        "seg_len": seg_len,  # (T-1,)
        "u_direction": rng.uniform(size=steps),  # (T-1,) picks among the legal directions
        "speed": rng.integers(0, len(speeds), size=steps),  # (T-1,)
    }


def _simulate(
    d: dict[str, np.ndarray], dirs: np.ndarray, speeds_px: np.ndarray, agent_half: float, size: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Step all videos together: (agent (V,T,2), objects (V,T,O,2), direction (V,T-1), speed (V,T-1))."""
    num_videos, steps = d["seg_len"].shape
    agent = d["agent"].copy()  # (V, 2)
    objects = _push(agent, agent_half, d["object"], d["half"], d["active"], np.zeros_like(agent), size)
    direction = np.zeros(num_videos, dtype=np.int64)
    speed = np.zeros(num_videos, dtype=np.int64)
    agent_path, object_path, directions, speed_path = [agent], [objects], [], []
    lo, hi = agent_half - 1e-6, size - agent_half + 1e-6
    for t in range(steps):
        new = d["seg_len"][:, t] > 0  # (V,) a segment starts here
        travel = speeds_px[d["speed"][:, t]] * d["seg_len"][:, t]  # (V,)
        end = agent[:, None, :] + dirs[None] * travel[:, None, None]  # (V, D, 2)
        legal = ((end >= lo) & (end <= hi)).all(-1)  # (V, D), >= 1 per row by _check's bound
        pick = np.floor(d["u_direction"][:, t] * legal.sum(1)).astype(np.int64)  # (V,) rank among legal
        chosen = np.argmax(np.cumsum(legal, axis=1) > pick[:, None], axis=1)
        direction = np.where(new, chosen, direction)
        speed = np.where(new, d["speed"][:, t], speed)
        step = dirs[direction] * speeds_px[speed][:, None]  # (V, 2)
        agent = np.clip(agent + step, agent_half, size - agent_half)
        objects = _push(agent, agent_half, objects, d["half"], d["active"], step, size)
        agent_path.append(agent)
        object_path.append(objects)
        directions.append(direction)
        speed_path.append(speed)
    return np.stack(agent_path, 1), np.stack(object_path, 1), np.stack(directions, 1), np.stack(speed_path, 1)


def _push(
    agent: np.ndarray,
    agent_half: float,
    objects: np.ndarray,
    half: np.ndarray,
    active: np.ndarray,
    step: np.ndarray,
    size: float,
) -> np.ndarray:
    """Move every active shape overlapping the agent out of it along the axis of least overlap,
    then back inside the walls. agent (V, 2), objects (V, O, 2), half/active (V, O), step (V, 2)."""
    offset = objects - agent[:, None, :]  # (V, O, 2)
    overlap = (agent_half + half)[..., None] - np.abs(offset)  # (V, O, 2) penetration per axis
    hit = (overlap > 0).all(-1) & active  # (V, O)
    axis = np.argmin(overlap, axis=-1)  # (V, O)
    away = np.where(offset != 0, np.sign(offset), np.sign(step)[:, None, :])  # (V, O, 2)
    shift = np.where(np.arange(2) == axis[..., None], overlap * away, 0.0)  # (V, O, 2)
    moved = objects + np.where(hit[..., None], shift, 0.0)
    return np.clip(moved, half[..., None], size - half[..., None])


def _render(
    agent: np.ndarray, objects: np.ndarray, agent_half: float, d: dict[str, np.ndarray], image_size: int
) -> np.ndarray:
    """(V, T, S, S, 3) uint8 frames from agent (V, T, 2) and object (V, T, O, 2) centres."""
    agent, objects = agent.astype(np.float32), objects.astype(np.float32)
    edge = np.arange(image_size, dtype=np.float32)  # pixel i covers [i, i + 1)
    centre = edge + 0.5
    canvas = np.broadcast_to(
        d["background"][:, None, None, None, :], (*agent.shape[:2], image_size, image_size, 3)
    )
    canvas = canvas.astype(np.float32)  # (V, T, S, S, 3)

    def box(cx: np.ndarray, cy: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Exact pixel coverage of axis-aligned squares: (V, T) centres, half size h -> (V, T, S, S)."""
        cover_x = np.clip(
            np.minimum(edge + 1, (cx + h)[..., None]) - np.maximum(edge, (cx - h)[..., None]), 0, 1
        )
        cover_y = np.clip(
            np.minimum(edge + 1, (cy + h)[..., None]) - np.maximum(edge, (cy - h)[..., None]), 0, 1
        )
        return cover_y[..., :, None] * cover_x[..., None, :]

    for o in range(objects.shape[2]):
        cx, cy = objects[:, :, o, 0], objects[:, :, o, 1]  # (V, T)
        h = np.broadcast_to(d["half"][:, o, None].astype(np.float32), cx.shape)  # (V, T)
        dx = np.abs(centre - cx[..., None])[..., None, :]  # (V, T, 1, S)
        dy = np.abs(centre - cy[..., None])[..., :, None]  # (V, T, S, 1)
        hh = h[..., None, None]
        shape = d["shape"][:, o, None, None, None]  # (V, 1, 1, 1)
        alpha = np.where(
            shape == 0,
            box(cx, cy, h),
            np.where(
                shape == 1,
                np.clip(hh - np.sqrt(dx**2 + dy**2) + 0.5, 0, 1),
                np.clip(1.2 * hh - (dx + dy) + 0.5, 0, 1),  # diamond, enlarged to a similar area
            ),
        )
        alpha = alpha * d["active"][:, o, None, None, None]  # (V, T, S, S)
        colour = d["colour"][:, o, None, None, None, :]  # (V, 1, 1, 1, 3)
        canvas += alpha[..., None] * (colour - canvas)
    alpha = box(agent[..., 0], agent[..., 1], np.float32(agent_half))[..., None]
    canvas += alpha * (np.asarray(AGENT_COLOUR, dtype=np.float32) - canvas)
    return np.round(canvas).astype(np.uint8)
