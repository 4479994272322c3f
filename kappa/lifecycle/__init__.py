"""Generations over their life: the registry, guards, batch replays, live workers, switch-over, cleanup."""
