"""A planning expert for PushT: short straight pushes chosen by simulating them.

Each decision simulates candidate pushes (a contact point on the T's outline, pushed along the inward
normal for a few control steps) on a private copy of the physics, scores the resulting block pose
against the goal (coverage, plus distance and angle while far away, plus the time the move costs), then
executes the best one: a collision-free approach around the block, followed by the push. It re-plans
after every push, so modelling errors are corrected. Motions are deliberate pushes at a steady speed,
like a human demonstrator's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pymunk

from clients.sim.pusht import (
    AGENT_RADIUS,
    CONTROL_HZ,
    GOAL_POSE,
    K_P,
    K_V,
    SIM_HZ,
    TEE_SHAPES,
    WORKSPACE,
    PushTEnv,
    coverage,
    pose_transform,
    transform_points,
)

# The T's outline (counter-clockwise in the body frame) for contact points and clearance checks.
OUTLINE = np.array(
    [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], dtype=np.float64
)
APPROACH_SPEED = 40.0  # px per control step while moving in free space
PUSH_SPEED = 12.0  # px per control step while pushing
CLEARANCE = AGENT_RADIUS + 6.0
SETTLE_STEPS = 2
DISTANCES = (1.5, 4.0, 10.0, 25.0, 60.0)  # push lengths tried, px
TIME_COST = 0.15  # cost of one control step, in pose-cost units


def angle_error(a: float, b: float) -> float:
    return (a - b + math.pi) % (2 * math.pi) - math.pi


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0)
    return float(np.linalg.norm(p - (a + t * ab)))


def _inside(p: np.ndarray, poly: np.ndarray) -> bool:
    inside = False
    for i in range(len(poly)):
        a, b = poly[i], poly[(i - 1) % len(poly)]
        if (a[1] > p[1]) != (b[1] > p[1]) and p[0] < (b[0] - a[0]) * (p[1] - a[1]) / (b[1] - a[1]) + a[0]:
            inside = not inside
    return inside


def distance_to_block(p: np.ndarray, outline_world: np.ndarray) -> float:
    d = min(
        _segment_distance(p, outline_world[i], outline_world[(i + 1) % len(outline_world)]) for i in range(8)
    )
    return -d if _inside(p, outline_world) else d


class PlanningSim:
    """A private pymunk world with the same block and agent, reset to any state to try a push."""

    def __init__(self):
        space = pymunk.Space()
        space.gravity = (0, 0)
        space.damping = 0
        agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        space.add(agent, pymunk.Circle(agent, AGENT_RADIUS))
        block = pymunk.Body(1, 2 * pymunk.moment_for_poly(1, TEE_SHAPES[0]))
        shapes = [pymunk.Poly(block, s) for s in TEE_SHAPES]
        block.center_of_gravity = (shapes[0].center_of_gravity + shapes[1].center_of_gravity) / 2
        space.add(block, *shapes)
        for a, b in (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506))):
            space.add(pymunk.Segment(space.static_body, a, b, 2))
        self.space, self.agent, self.block = space, agent, block

    def push(
        self, block_pose: np.ndarray, start: np.ndarray, targets: list[np.ndarray], velocity=(0.0, 0.0)
    ) -> np.ndarray:
        """Block pose after the agent, at ``start`` with ``velocity``, tracks ``targets`` (one per step)."""
        self.block.angle = float(block_pose[2])  # angle first: then the origin lands exactly on the pose
        self.block.position = (float(block_pose[0]), float(block_pose[1]))
        self.block.velocity, self.block.angular_velocity = (0, 0), 0
        self.agent.position = (float(start[0]), float(start[1]))
        self.agent.velocity = (float(velocity[0]), float(velocity[1]))
        dt = 1.0 / SIM_HZ
        for target in targets:
            goal = pymunk.Vec2d(*target)
            for _ in range(SIM_HZ // CONTROL_HZ):
                self.agent.velocity += (K_P * (goal - self.agent.position) - K_V * self.agent.velocity) * dt
                self.space.step(dt)
        return np.array([*self.block.position, self.block.angle])


def pose_cost(pose: np.ndarray) -> float:
    cov = coverage(pose)
    dist = float(np.linalg.norm(pose[:2] - GOAL_POSE[:2]))
    ang = abs(angle_error(pose[2], GOAL_POSE[2]))
    return 100.0 * (1.0 - cov) + 0.5 * dist + 40.0 * ang


def _line(a: np.ndarray, b: np.ndarray, speed: float) -> list[np.ndarray]:
    n = max(1, math.ceil(float(np.linalg.norm(b - a)) / speed))
    return [a + (b - a) * (i + 1) / n for i in range(n)]


class PushTExpert:
    """``act(env)`` yields the expert's next commanded position; call once per control step."""

    def __init__(self, rng: np.random.Generator | None = None):
        self.sim = PlanningSim()
        self.rng = rng or np.random.default_rng(0)
        self._plan: Iterator[np.ndarray] | None = None

    def reset(self) -> None:
        self._plan = None

    def act(self, env: PushTEnv) -> np.ndarray:
        while True:
            if self._plan is None:
                self._plan = iter(self._make_plan(env))
            action = next(self._plan, None)
            if action is not None:
                return np.clip(action, 10.0, WORKSPACE - 10.0)
            self._plan = None

    # ---- planning ---------------------------------------------------------------------------------

    def _candidates(self, pose: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(contact point, inward normal) in world coordinates along the outline."""
        tf = pose_transform(pose)
        out = []
        for i in range(len(OUTLINE)):
            a, b = OUTLINE[i], OUTLINE[(i + 1) % len(OUTLINE)]
            edge = b - a
            length = float(np.linalg.norm(edge))
            normal = np.array([edge[1], -edge[0]]) / length  # outward for a counter-clockwise outline
            for t in np.linspace(0.1, 0.9, max(2, int(length // 20))):
                point = transform_points(tf, (a + t * edge)[None])[0]
                out.append((point, -(tf[:2, :2] @ normal)))
        return out

    def _approach(self, agent: np.ndarray, start: np.ndarray, pose: np.ndarray) -> list[np.ndarray] | None:
        """Waypoints from the agent to ``start`` that keep clear of the block: straight if possible,
        else out to a circle around the block, along it, and in."""
        outline = transform_points(pose_transform(pose), OUTLINE)
        # The push is simulated from rest at `start`: hold there until the PD controller has settled.
        settle = [start] * SETTLE_STEPS
        if float(np.linalg.norm(agent - start)) < 2.0:
            return settle
        if self._clear(agent, start, outline):
            return _line(agent, start, APPROACH_SPEED) + settle
        center = outline.mean(axis=0)
        radius = max(float(np.max(np.linalg.norm(outline - center, axis=1))) + CLEARANCE + 5, 40.0)
        a0 = math.atan2(agent[1] - center[1], agent[0] - center[0])
        a1 = math.atan2(start[1] - center[1], start[0] - center[0])
        sweep = angle_error(a1, a0)
        arc = [
            center + radius * np.array([math.cos(a0 + sweep * k / 8), math.sin(a0 + sweep * k / 8)])
            for k in range(9)
        ]
        path = [agent, *arc, start]
        targets: list[np.ndarray] = []
        for p, q in zip(path[:-1], path[1:], strict=True):
            targets += _line(p, q, APPROACH_SPEED)
        return targets + settle

    @staticmethod
    def _clear(a: np.ndarray, b: np.ndarray, outline: np.ndarray) -> bool:
        for t in np.linspace(0, 1, max(2, int(np.linalg.norm(b - a) // 5))):
            if distance_to_block(a + t * (b - a), outline) < CLEARANCE - 2:
                return False
        return True

    def _make_plan(self, env: PushTEnv) -> list[np.ndarray]:
        pose = env.block_pose
        agent = np.array(env.agent.position)
        velocity = np.array(env.agent.velocity)
        here = pose_cost(pose)
        best: tuple[float, list[np.ndarray]] | None = None
        # Keep pushing from where the agent is (no approach), in any of 16 directions.
        for k in range(16):
            direction = np.array([math.cos(k * math.pi / 8), math.sin(k * math.pi / 8)])
            for distance in DISTANCES:
                push = _line(agent, agent + direction * distance, PUSH_SPEED)
                score = pose_cost(self.sim.push(pose, agent, push, velocity)) + TIME_COST * len(push)
                if best is None or score < best[0]:
                    best = (score, push)
        for point, inward in self._candidates(pose):
            start = point - inward * (AGENT_RADIUS + 3.0)
            if not (20 <= start[0] <= WORKSPACE - 20 and 20 <= start[1] <= WORKSPACE - 20):
                continue
            approach = self._approach(agent, start, pose)
            for distance in DISTANCES:
                push = _line(start, start + inward * (distance + 3.0), PUSH_SPEED)
                result = self.sim.push(pose, start, push)
                score = pose_cost(result) + TIME_COST * (len(approach) + len(push))
                if best is None or score < best[0]:
                    best = (score, approach + push)
        if best is None or best[0] >= here:
            # Nothing helps from here: back off a little, which changes the candidates' approach paths.
            away = agent + self.rng.normal(0, 30, size=2)
            return _line(agent, away, APPROACH_SPEED)
        return best[1]
