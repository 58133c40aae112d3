"""EquiAV: config, dataset index and checks, model, losses, trainer, metrics and retrieval."""
