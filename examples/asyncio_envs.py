"""Many environments in one process: one ``AsyncPolicyClient``, one asyncio task per environment.

Each task plays ``--episodes`` episodes of its own CartPole-v1 (standing in for your simulator);
the tasks wait for their actions concurrently, and one reader hands each action to its task. The
mean return over all episodes is printed at the end.

Next to ``docker compose up redis worker`` (Redis and one model, ``model-1``, no aggregator; Redis
is reachable only inside compose's network, so run the example there, asking the model directly)::

    docker compose run --rm -v "$PWD/examples:/examples:ro" --entrypoint python worker \\
        /examples/asyncio_envs.py --mode direct --model model-1

On this machine, against a local Redis::

    python -m worker model --component-id model-1
    python -m worker aggregator          # for the default mode, ensemble
    python examples/asyncio_envs.py --envs 64 --episodes 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

import gymnasium as gym

from worker.client import AsyncPolicyClient


async def play(client: AsyncPolicyClient, env_id: str, episodes: int) -> list[float]:
    """Play ``episodes`` episodes of one environment; their returns."""
    env = gym.make("CartPole-v1")
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        action = await client.act(env_id, obs)  # an episode's first observation carries no reward
        total = 0.0
        while True:
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            if terminated or truncated:
                await client.end(env_id, obs, reward=reward, terminated=terminated, truncated=truncated)
                break
            action = await client.act(env_id, obs, reward=reward)
        returns.append(total)
    return returns


async def main(args: argparse.Namespace) -> None:
    async with AsyncPolicyClient(
        args.redis_url, prefix=args.prefix, timeout=10.0, mode=args.mode, model=args.model
    ) as client:
        # A model keeps one memory per ENV_ID, whichever client sends it: the client's ID keeps
        # these environments apart from every other client's.
        tasks = [play(client, f"cartpole-{client.client_id}-{k}", args.episodes) for k in range(args.envs)]
        played = await asyncio.gather(*tasks)
    returns = [r for env_returns in played for r in env_returns]
    print(f"{len(returns)} episodes on {args.envs} environments: mean return {statistics.fmean(returns):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="CartPole-v1 environments as asyncio tasks, one client")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    parser.add_argument("--prefix", default=os.environ.get("STREAM_PREFIX", "rl"))
    parser.add_argument("--mode", choices=("ensemble", "direct", "local"), default="ensemble")
    parser.add_argument("--model", help="the model's COMPONENT_ID (direct and local modes)")
    parser.add_argument("--envs", type=int, default=64)
    parser.add_argument("--episodes", type=int, default=2, help="episodes per environment")
    args = parser.parse_args()
    if args.mode != "ensemble" and not args.model:
        parser.error(f"--mode {args.mode} needs --model <the COMPONENT_ID of the model>")
    asyncio.run(main(args))
