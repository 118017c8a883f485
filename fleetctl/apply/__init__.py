"""Carrying out a plan: the executor, and the events it emits as it goes."""
