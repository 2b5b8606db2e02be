"""Training and (later) inference engines."""
