"""Shared state across hosts that use the same keys, on Redis >= 7 or Valkey.

``setup.connect_fleet`` wires it into a daemon; the Redis client (``backend``) is imported
only when ``[state]`` names a server, so a daemon without one never loads it.
"""
