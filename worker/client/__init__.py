"""Bring your own environment: ask the models for actions from any process, sync or asyncio.

- :class:`PolicyClient` (redis-py) and :class:`AsyncPolicyClient` (redis.asyncio), the same API;
- :class:`ActionTimeout`: no action in time (naming the environment and the observation);
- :class:`ModelsUnavailable`: no model to ask (none live, or the named one never published).

Three modes: ``ensemble`` (the aggregator combines the live models), ``direct`` (one model answers
itself) and ``local`` (act with a copy of one model's policy; the model learns from the steps).
"""

from worker.client.aio import AsyncPolicyClient
from worker.client.core import Ticket
from worker.client.errors import ActionTimeout, ModelsUnavailable
from worker.client.sync import PolicyClient

__all__ = ["ActionTimeout", "AsyncPolicyClient", "ModelsUnavailable", "PolicyClient", "Ticket"]
