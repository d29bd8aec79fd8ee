"""PushT: push a T-shaped block onto a goal pose with a circular agent (Diffusion Policy's benchmark task).

The physics follows upstream real-stanford/diffusion_policy exactly: pymunk, a 512 x 512 workspace,
100 Hz physics under 10 Hz control (10 substeps), a PD controller (k_p 100, k_v 20) driving a kinematic
agent of radius 15 toward the commanded position, a T block (120 x 30 bar + 30 x 90 stem, mass 1, with
upstream's inertia) on a frictionless, damping-free plane (the block only moves while pushed), walls,
and the goal pose (256, 256, pi/4). Reward clip(coverage / 0.95, 0, 1); success at coverage > 0.95.
Resets draw from numpy RandomState(seed) as upstream, so seed s starts where upstream's seed s starts.

Rendering uses Pillow (no pygame): white background, light-green goal, grey T, blue agent, grey walls.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import gymnasium as gym
import numpy as np
import pymunk
from PIL import Image, ImageDraw

WORKSPACE = 512
SIM_HZ = 100
CONTROL_HZ = 10
K_P, K_V = 100.0, 20.0
AGENT_RADIUS = 15
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])
SUCCESS_THRESHOLD = 0.95
# The T in its body frame: the bar (120 x 30) and the stem (30 x 90), as upstream's add_tee(scale=30).
TEE_SHAPES = (
    ((-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0)),
    ((-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0)),
)
TEE_AREA = 120 * 30 + 30 * 90
COLORS = {
    "background": (255, 255, 255),
    "goal": (144, 238, 144),  # LightGreen
    "block_fill": (142, 163, 183),  # LightSlateGray lightened 1.2x, as upstream's draw options
    "block_edge": (119, 136, 153),  # LightSlateGray
    "agent": (65, 105, 225),  # RoyalBlue
    "agent_inner": (78, 126, 255),  # RoyalBlue lightened 1.2x
    "wall": (211, 211, 211),  # LightGray
}
WALLS = (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506)))


def pose_transform(pose: np.ndarray) -> np.ndarray:
    """3x3 homogeneous body-to-world transform of a pose (x, y, angle)."""
    c, s = math.cos(pose[2]), math.sin(pose[2])
    return np.array([[c, -s, pose[0]], [s, c, pose[1]], [0.0, 0.0, 1.0]])


def transform_points(tf: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ tf[:2, :2].T + tf[:2, 2]


def tee_polygons(pose: np.ndarray) -> list[np.ndarray]:
    """The two convex pieces of the T at a pose, in world coordinates."""
    tf = pose_transform(pose)
    return [transform_points(tf, np.array(shape)) for shape in TEE_SHAPES]


def _clip(subject: np.ndarray, clipper: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman: the part of convex polygon ``subject`` inside convex ``clipper``."""
    # Orientation of the clipper decides which side of each edge is inside.
    orient = np.sign(_signed_area(clipper)) or 1.0
    out = subject
    for i in range(len(clipper)):
        if len(out) == 0:
            break
        a, b = clipper[i], clipper[(i + 1) % len(clipper)]
        edge = b - a
        side = orient * (edge[0] * (out[:, 1] - a[1]) - edge[1] * (out[:, 0] - a[0]))
        points = []
        for j in range(len(out)):
            p, q = out[j], out[(j + 1) % len(out)]
            sp, sq = side[j], side[(j + 1) % len(out)]
            if sp >= 0:
                points.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                points.append(p + t * (q - p))
        out = np.array(points) if points else np.zeros((0, 2))
    return out


def _signed_area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def coverage(block_pose: np.ndarray, goal_pose: np.ndarray = GOAL_POSE) -> float:
    """area(T at goal ∩ T now) / area(T). The two pieces of a T do not overlap, so the intersection is
    the sum of the four convex piece-by-piece intersections."""
    block, goal = tee_polygons(block_pose), tee_polygons(goal_pose)
    area = sum(abs(_signed_area(_clip(b, g))) for b in block for g in goal)
    return area / TEE_AREA


def _rasterize_block_mask() -> np.ndarray:
    """Pixels covered by the T (fill and its 2-px outline) at upstream's construction pose (256, 300, 0)."""
    image = Image.new("L", (WORKSPACE, WORKSPACE), 0)
    draw = ImageDraw.Draw(image)
    for poly in tee_polygons(np.array([256.0, 300.0, 0.0])):
        pts = [tuple(p) for p in np.round(poly)]
        draw.polygon(pts, fill=255, outline=255, width=4)
    return np.array(image) > 0


@functools.cache
def block_keypoints_local(n: int = 9, seed: int = 0) -> np.ndarray:
    """n keypoints on the T in its body frame, chosen as upstream's lowdim task does: farthest-point
    sampling over the rendered block's pixels from a seeded random start, plus a small uniform shift."""
    rng = np.random.default_rng(seed)
    mask = _rasterize_block_mask()
    xy = np.moveaxis(np.indices(mask.shape), 0, -1)[..., ::-1].astype(np.float64)  # (row, col) -> (x, y)
    local = xy[mask] - np.array([256.0, 300.0])  # body frame: the construction pose has angle 0
    chosen = [local[rng.choice(len(local))]]
    dist = np.linalg.norm(local - chosen[0], axis=1)
    for _ in range(n - 1):
        chosen.append(local[int(np.argmax(dist))])
        dist = np.minimum(dist, np.linalg.norm(local - chosen[-1], axis=1))
    return np.array(chosen) + rng.uniform(0, 1, size=(n, 2))


class PushTEnv(gym.Env):
    """Observation keys (a dict; ask only for what you need, images cost a render):
    ``state`` (5,) agent xy, block xy, block angle mod 2 pi; ``agent_pos`` (2,); ``keypoint`` (20,) the
    9 block keypoints (x, y) then the agent xy, as upstream's lowdim task; ``image`` (96, 96, 3) uint8."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        obs_keys: tuple[str, ...] = ("state",),
        render_size: int = 96,
        max_episode_steps: int = 300,
        legacy: bool = True,
    ):
        unknown = set(obs_keys) - {"state", "agent_pos", "keypoint", "image"}
        if unknown:
            raise ValueError(f"unknown observation keys {sorted(unknown)}")
        self.obs_keys = tuple(obs_keys)
        self.render_size = render_size
        self.max_episode_steps = max_episode_steps
        # Upstream's evaluation resets with legacy ordering (position, then angle).
        self.legacy = legacy
        self.render_mode = "rgb_array"
        spaces = {
            "state": gym.spaces.Box(0, WORKSPACE, (5,), np.float64),
            "agent_pos": gym.spaces.Box(0, WORKSPACE, (2,), np.float64),
            "keypoint": gym.spaces.Box(-WORKSPACE, 2 * WORKSPACE, (20,), np.float64),
            "image": gym.spaces.Box(0, 255, (render_size, render_size, 3), np.uint8),
        }
        self.observation_space = gym.spaces.Dict({k: spaces[k] for k in self.obs_keys})
        self.action_space = gym.spaces.Box(0, WORKSPACE, (2,), np.float64)
        self.space: pymunk.Space | None = None
        self.steps = 0

    # ---- simulation -------------------------------------------------------------------------------

    def _setup(self) -> None:
        space = pymunk.Space()
        space.gravity = (0, 0)
        space.damping = 0  # pymunk keeps this fraction of velocity per second: pushes do not coast
        for a, b in WALLS:
            space.add(pymunk.Segment(space.static_body, a, b, 2))
        agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        agent.position = (256, 400)
        space.add(agent, pymunk.Circle(agent, AGENT_RADIUS))
        # Upstream sums the bar's moment twice (not the stem's); kept for identical dynamics.
        inertia = 2 * pymunk.moment_for_poly(1, TEE_SHAPES[0])
        block = pymunk.Body(1, inertia)
        shapes = [pymunk.Poly(block, shape) for shape in TEE_SHAPES]
        block.center_of_gravity = (shapes[0].center_of_gravity + shapes[1].center_of_gravity) / 2
        block.position = (256, 300)
        space.add(block, *shapes)
        handler = space.add_collision_handler(0, 0)
        handler.post_solve = self._count_contacts
        self.space, self.agent, self.block = space, agent, block
        self.n_contact_points = 0

    def _count_contacts(self, arbiter: pymunk.Arbiter, space: pymunk.Space, data: Any) -> None:
        self.n_contact_points += len(arbiter.contact_point_set.points)

    def _set_state(self, state: np.ndarray) -> None:
        state = [float(x) for x in state]
        self.agent.position = state[:2]
        # Setting the angle rotates about the centre of gravity, so the order changes where the T ends
        # up; upstream's data and evaluation use the legacy order.
        if self.legacy:
            self.block.position = state[2:4]
            self.block.angle = state[4]
        else:
            self.block.angle = state[4]
            self.block.position = state[2:4]
        self.space.step(1.0 / SIM_HZ)

    @staticmethod
    def initial_state(seed: int) -> np.ndarray:
        """Upstream's seeded draw: integer agent and block positions, Gaussian block angle."""
        rs = np.random.RandomState(seed=seed)
        return np.array(
            [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400),
             rs.randn() * 2 * np.pi - np.pi],
            dtype=np.float64,
        )  # fmt: skip

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self._setup()
        state = (options or {}).get("reset_to_state")
        if state is None:
            state = self.initial_state(int(self.np_random.integers(0, 25536)) if seed is None else seed)
        self._set_state(np.asarray(state, dtype=np.float64))
        self.steps = 0
        info = self._info()
        info["is_success"] = False
        return self._obs(), info

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,) or not np.isfinite(action).all():
            raise ValueError(f"action must be 2 finite numbers, got {action!r}")
        dt = 1.0 / SIM_HZ
        self.n_contact_points = 0
        target = pymunk.Vec2d(*action)
        for _ in range(SIM_HZ // CONTROL_HZ):
            acceleration = K_P * (target - self.agent.position) + K_V * (
                pymunk.Vec2d(0, 0) - self.agent.velocity
            )
            self.agent.velocity += acceleration * dt
            self.space.step(dt)
        self.steps += 1
        cov = coverage(self.block_pose)
        reward = float(np.clip(cov / SUCCESS_THRESHOLD, 0.0, 1.0))
        terminated = cov > SUCCESS_THRESHOLD
        truncated = self.steps >= self.max_episode_steps
        info = self._info()
        info.update(coverage=cov, is_success=terminated)
        return self._obs(), reward, terminated, truncated, info

    # ---- observations -----------------------------------------------------------------------------

    @property
    def block_pose(self) -> np.ndarray:
        return np.array([*self.block.position, self.block.angle])

    @property
    def state(self) -> np.ndarray:
        return np.array([*self.agent.position, *self.block.position, self.block.angle % (2 * np.pi)])

    def keypoints(self) -> np.ndarray:
        """(9, 2) block keypoints in world coordinates."""
        return transform_points(pose_transform(self.block_pose), block_keypoints_local())

    def _obs(self) -> dict[str, np.ndarray]:
        obs: dict[str, np.ndarray] = {}
        for key in self.obs_keys:
            if key == "state":
                obs[key] = self.state
            elif key == "agent_pos":
                obs[key] = np.array(self.agent.position)
            elif key == "keypoint":
                obs[key] = np.concatenate([self.keypoints().reshape(-1), np.array(self.agent.position)])
            else:
                obs[key] = self.render(self.render_size)
        return obs

    def _info(self) -> dict[str, Any]:
        n_substeps = SIM_HZ // CONTROL_HZ
        return {
            "pos_agent": np.array(self.agent.position),
            "vel_agent": np.array(self.agent.velocity),
            "block_pose": self.block_pose,
            "goal_pose": GOAL_POSE.copy(),
            "n_contacts": int(np.ceil(self.n_contact_points / n_substeps)),
        }

    def render(self, size: int | None = None) -> np.ndarray:
        """RGB uint8 (size, size, 3) of the scene (default: the observation size)."""
        size = size or self.render_size
        image = Image.new("RGB", (WORKSPACE, WORKSPACE), COLORS["background"])
        draw = ImageDraw.Draw(image)
        for poly in tee_polygons(GOAL_POSE):
            draw.polygon([tuple(p) for p in poly], fill=COLORS["goal"])
        for a, b in WALLS:
            draw.line([a, b], fill=COLORS["wall"], width=4)
        ax, ay = self.agent.position
        r, ri = AGENT_RADIUS, AGENT_RADIUS - 4
        draw.ellipse([ax - r, ay - r, ax + r, ay + r], fill=COLORS["agent"])
        draw.ellipse([ax - ri, ay - ri, ax + ri, ay + ri], fill=COLORS["agent_inner"])
        for poly in tee_polygons(self.block_pose):
            draw.polygon(
                [tuple(p) for p in poly], fill=COLORS["block_fill"], outline=COLORS["block_edge"], width=4
            )
        if size != WORKSPACE:
            image = image.resize((size, size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
