"""The toy world: a tiny SD1-architecture model trained on synthetic shapes, shipped with the project."""
