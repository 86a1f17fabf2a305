"""Network weight math (pure functions) and the trainable modules built on it."""
