"""Container runtimes: how a restart message reaches an agent's container."""
