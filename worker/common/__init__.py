"""Plumbing every component shares: connections, the serve loop and outage handling, Lua helpers,
stream trimming, logs and the common settings."""
