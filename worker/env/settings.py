"""``python -m worker env``: the environment runner's settings, every one a flag and a variable."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from worker.common.settings import ServiceSettings


class EnvSettings(ServiceSettings):
    """``python -m worker env``: one environment runner."""

    gym_env: str = Field("CartPole-v1", description="gymnasium env id (any space SB3's A2C takes)")
    n_envs: int = Field(4, gt=0, description="training environments (and as many evaluation ones)")
    runner_id: str = Field(
        "env",
        min_length=1,
        description="this runner's identity: prefix of its ENV_IDs, its reply stream and where a restart"
        " resumes; several runners serve one swarm, each with its own ID",
    )
    seed: int | None = Field(None, description="seed of the environments' first reset")
    max_episode_steps: int | None = Field(None, gt=0, description="time limit (default: the env's own)")
    action_timeout: float = Field(30.0, gt=0, description="seconds to wait for an action before aborting")
    mode: Literal["ensemble", "direct", "local"] = Field(
        "ensemble",
        description="who acts: the aggregator over every live model, one --model directly, or a local"
        " copy of --model's policy (it learns from the steps streamed to it)",
    )
    model: str | None = Field(None, description="the model's COMPONENT_ID, for --mode direct or local")
    max_lag: int = Field(
        0,
        ge=0,
        description="--mode local: most steps the model may not have learned from yet; 0: each round"
        " waits for the model to learn from the last, so every step is taken with the newest weights,"
        " as in SB3",
    )
    stepping: Literal["lockstep", "async"] = Field(
        "lockstep",
        description="lockstep: publish every environment's observation at once and wait for all the"
        " actions before stepping any (each model batch holds one step of each env); async: each"
        " environment steps as soon as its own action arrives",
    )
    step_cost_ms: float = Field(
        0.0, ge=0, description="a fixed cost added to every environment step, in ms (0: none)"
    )
    step_cost_kind: Literal["cpu", "wait"] = Field(
        "wait",
        description="what the step cost is: cpu, a busy loop (a simulator: use more runner processes for"
        " more cores), or wait, a sleep (a remote game or robot)",
    )
    step_threads: int = Field(
        0,
        ge=0,
        description="threads stepping the environments whose actions are in, so that their waits overlap;"
        " 0: --n-envs with --stepping async and a wait cost, else 1 (the runner's own thread)",
    )
    trim_replies: bool = Field(True, description="trim the runner's reply stream as actions are read")
    encoding: Literal["msgpack", "json"] = Field("msgpack", description="encoding of the observations")
    block_ms: int = Field(1000, gt=0, le=30_000, description="longest blocking XREAD")
    max_entry_bytes: int = Field(1 << 20, gt=0, description="larger control entries are dead-lettered")
    stream_maxlen: int = Field(100_000, gt=0, description="approximate MAXLEN of the streams written")
    resume_window: float = Field(
        600.0,
        gt=0,
        description="after a restart, commands older than this many seconds are skipped, not obeyed:"
        " their sender has given up (control's --run-timeout)",
    )

    @property
    def threads(self) -> int:
        """The threads that step the environments (``--step-threads``, its default resolved)."""
        if self.step_threads:
            return self.step_threads
        waits = self.stepping == "async" and self.step_cost_kind == "wait" and self.step_cost_ms > 0
        return self.n_envs if waits else 1
