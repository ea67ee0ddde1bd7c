"""An environment in its own process, acting on the models' actions through ``PolicyClient``.

CartPole-v1 stands in for your simulator: keep the loop, replace ``gym.make``. Each episode's
return is printed as it ends.

Next to ``docker compose up redis worker`` (Redis and one model, ``model-1``, no aggregator; Redis
is reachable only inside compose's network, so run the example there, asking the model directly)::

    docker compose run --rm -v "$PWD/examples:/examples:ro" --entrypoint python worker \\
        /examples/own_process.py --mode direct --model model-1

On this machine, against a local Redis::

    python -m worker model --component-id model-1
    python -m worker aggregator          # for the default mode, ensemble
    python examples/own_process.py --episodes 5
"""

from __future__ import annotations

import argparse
import os
import sys

import gymnasium as gym

from worker.client import ActionTimeout, ModelsUnavailable, PolicyClient


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CartPole-v1 in its own process, driven by PolicyClient")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    parser.add_argument("--prefix", default=os.environ.get("STREAM_PREFIX", "rl"))
    parser.add_argument("--mode", choices=("ensemble", "direct", "local"), default="ensemble")
    parser.add_argument("--model", help="the model's COMPONENT_ID (direct and local modes)")
    parser.add_argument("--episodes", type=int, default=5)
    args = parser.parse_args(argv)
    if args.mode != "ensemble" and not args.model:
        parser.error(f"--mode {args.mode} needs --model <the COMPONENT_ID of the model>")

    env = gym.make("CartPole-v1")
    client = PolicyClient(args.redis_url, prefix=args.prefix, timeout=10.0, mode=args.mode, model=args.model)
    # A model keeps one memory per ENV_ID, whichever client sends it: the client's ID (host, process,
    # random) keeps this environment apart from every other one, this example run twice included.
    env_id = f"cartpole-{client.client_id}"
    try:
        with client:
            for episode in range(1, args.episodes + 1):
                obs, _ = env.reset()
                action = client.act(env_id, obs)  # an episode's first observation carries no reward
                total = 0.0
                while True:
                    obs, reward, terminated, truncated, _ = env.step(action)
                    total += float(reward)
                    if terminated or truncated:
                        # Sent with the next episode's first observation: no round trip here.
                        client.end(env_id, obs, reward=reward, terminated=terminated, truncated=truncated)
                        break
                    action = client.act(env_id, obs, reward=reward)
                print(f"episode {episode}: return {total:.0f}", flush=True)
    except (ModelsUnavailable, ActionTimeout) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
