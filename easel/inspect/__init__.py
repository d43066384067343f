"""See inside: capture (read-only hooks on the steps and the cross-attention of a real run) -> figures (tokens,
steps, attention); `easel inspect ...` is in cli.py."""
