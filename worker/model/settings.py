"""Settings of a model: A2C's hyper-parameters under stable-baselines3's names, and the worker's own."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from worker.common.settings import CommonSettings, ServiceSettings, env_alias
from worker.common.trimming import StreamTrim


class A2CSettings(BaseSettings):
    """A2C hyper-parameters under stable-baselines3's names, with the tutorial's defaults."""

    model_config = CommonSettings.model_config

    gym_env: str | None = Field(
        "CartPole-v1",
        description="gymnasium env id whose spaces the model uses; 'none' to give them explicitly",
    )
    spaces: str | None = Field(
        None,
        description='the spaces as JSON, as models publish them ({"observation": ..., "action": ...},'
        " see docs/protocol.md); overrides --gym-env",
    )
    obs_shape: list[int] | None = Field(None, description="observation shape, when --gym-env is none")
    n_actions: int | None = Field(
        None, gt=1, description="number of discrete actions, when --gym-env is none"
    )
    learning_rate: float = Field(7e-4, gt=0)
    learning_rate_schedule: Literal["constant", "linear"] = Field(
        "constant",
        description="linear: from --learning-rate down to 0 at --total-timesteps transitions (RL-zoo's lin_)",
    )
    total_timesteps: int | None = Field(
        None, gt=0, description="transitions the linear schedule runs over (SB3's total_timesteps)"
    )
    n_steps: int = Field(5, gt=0, description="transitions per environment in one A2C segment")
    segments_per_update: int = Field(
        1,
        gt=0,
        le=4096,
        description="train once this many segments are complete (SB3: n_envs); 1: on every batch's",
    )
    gamma: float = Field(0.99, ge=0, le=1)
    gae_lambda: float = Field(1.0, ge=0, le=1)
    ent_coef: float = Field(0.0, ge=0)
    vf_coef: float = Field(0.5, ge=0)
    max_grad_norm: float = Field(0.5, gt=0)
    normalize_advantage: bool = False
    use_rms_prop: bool = Field(
        False, description="RMSprop as SB3's A2C class; the tutorial's policy uses Adam"
    )
    rms_prop_eps: float = Field(1e-5, gt=0)
    net_arch: dict[str, list[int]] = Field(
        {"pi": [16, 16], "vf": [16, 16]}, description="JSON, as SB3's net_arch"
    )
    activation_fn: Literal["tanh", "relu"] = "tanh"
    ortho_init: bool = True
    policy: Literal["auto", "MlpPolicy", "CnnPolicy", "MultiInputPolicy"] = Field(
        "auto", description="SB3's policy; auto: MultiInputPolicy for Dict, CnnPolicy for images, else Mlp"
    )
    use_sde: bool = Field(False, description="Box actions: generalized state-dependent exploration (gSDE)")
    log_std_init: float = Field(0.0, description="Box actions: initial log standard deviation")
    normalize_obs: bool = Field(
        False, description="normalize observations with running statistics (VecNormalize)"
    )
    normalize_reward: bool = Field(
        False, description="scale rewards by the running std of returns (VecNormalize)"
    )
    seed: int | None = Field(None, description="seed for the initial weights")

    @model_validator(mode="after")
    def _schedule_has_an_end(self) -> A2CSettings:
        if self.learning_rate_schedule == "linear" and self.total_timesteps is None:
            raise ValueError("--learning-rate-schedule linear needs --total-timesteps")
        return self

    def learning_rate_at(self, transitions: int) -> float:
        """The learning rate after ``transitions`` transitions, as SB3's schedule gives it for
        ``progress_remaining = 1 - transitions / total_timesteps``."""
        if self.learning_rate_schedule == "constant" or self.total_timesteps is None:
            return self.learning_rate
        return self.learning_rate * max(0.0, 1.0 - transitions / self.total_timesteps)


class ModelSettings(ServiceSettings, A2CSettings):
    """``python -m worker model``: one model worker."""

    component_id: str | None = Field(
        None, description="this model's ID; it names its state in Redis, so give one to resume after a crash"
    )
    init_from: Path | None = Field(
        None,
        description="a new model (no checkpoint yet) starts from the weights of this stable-baselines3 A2C"
        " zip, read without unpickling; its spaces and network must be this model's. A checkpoint wins",
    )
    consumer: str | None = Field(None, description="consumer name in the group (default host:pid:random)")
    tensorboard_log: Path | None = Field(
        None, description="write SB3's scalars (rollout/, train/, time/) to TensorBoard in DIR/<component ID>"
    )
    batch_size: int = Field(
        256, gt=0, le=4096, description="entries read (and forwarded as one batch) per XREADGROUP"
    )
    min_batch: int = Field(
        1, gt=0, le=4096, description="a batch of fewer entries waits up to --linger-ms for more"
    )
    linger_ms: float = Field(
        0.0,
        ge=0,
        description="longest wait for --min-batch entries (environments that step on their own send"
        " entries one by one); 0: a batch is what one read returns",
    )
    block_ms: int = Field(500, gt=0, le=30_000, description="how long one XREADGROUP blocks for new entries")
    max_entry_bytes: int = Field(4 << 20, gt=0, description="larger entries are dead-lettered unread")
    evolution_timeout: float = Field(60.0, gt=0, description="seconds after a GET until training resumes")
    train_deterministic: bool = Field(False, description="also train on DETERMINISTIC (evaluation) steps")
    memory_ttl: float = Field(
        3600.0,
        gt=0,
        description="forget an environment after this many seconds without an observation, by entry-ID"
        " time; its unfinished rollout is dropped",
    )
    lease_ttl: float = Field(5.0, gt=0, description="seconds a dead worker's lease blocks its successor")
    wait_replicas: int = Field(
        0,
        ge=0,
        description="after each commit, wait until this many replicas hold it (Redis WAIT), so a"
        " failover loses fewer commits; 0: do not wait",
    )
    wait_timeout_ms: int = Field(
        1000,
        gt=0,
        description="the longest --wait-replicas wait; a commit is counted, never undone, when it runs out",
    )
    heartbeat_interval: float = Field(1.0, gt=0, description="seconds between registry heartbeats")
    claim_idle_ms: int = Field(
        10_000, ge=0, description="reclaim entries pending this long on other consumers"
    )
    max_deliveries: int = Field(5, gt=0, description="an entry delivered this often without commit is dead")
    trim: Literal["maxlen", "minid"] = Field(
        "maxlen",
        validation_alias=env_alias("trim", "stream_trim"),
        description="how the streams this worker writes are trimmed: MAXLEN ~ --stream-maxlen,"
        " or MINID ~ (now - --stream-min-age-ms); env STREAM_TRIM",
    )
    stream_maxlen: int = Field(
        100_000, gt=0, description="approximate MAXLEN of the streams this worker writes (--trim maxlen)"
    )
    stream_min_age_ms: int = Field(
        3_600_000, gt=0, description="entries older than this are trimmed from them (--trim minid)"
    )
    publish_weights_every: int = Field(
        1,
        ge=0,
        description="publish the weights for local clients (<prefix>:model:<id>:policy) every this many"
        " updates, and after each SET; 0: never",
    )
    reply_ttl: float = Field(
        3600.0, gt=0, description="seconds a client's reply stream lives after the last action written to it"
    )
    torch_threads: int = Field(1, gt=0, description="torch intra-op threads (small nets run best on one)")

    @model_validator(mode="after")
    def _lingering_fits(self) -> ModelSettings:
        if self.min_batch > self.batch_size:
            raise ValueError(f"--min-batch ({self.min_batch}) cannot exceed --batch-size ({self.batch_size})")
        if self.linger_ms >= self.lease_ttl * 1000 / 3:  # the lease is renewed between batches
            raise ValueError(f"--linger-ms must stay under a third of --lease-ttl ({self.lease_ttl} s)")
        return self

    @property
    def trimming(self) -> StreamTrim:
        """The trimming of every stream this worker writes (logits, weights, dead)."""
        return StreamTrim(self.trim, maxlen=self.stream_maxlen, min_age_ms=self.stream_min_age_ms)
