"""The trainer's components, each small and swappable: the loop, the optimiser and its schedule,
checkpoints, logging, and the torch.distributed helpers (`dist`)."""
