"""Runnable end-to-end programs built on the diffalign library (train, generate, cache, toy world, ...)."""
