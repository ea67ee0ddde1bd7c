"""Online reinforcement-learning model workers on Redis Streams."""

__version__ = "0.1.0"
