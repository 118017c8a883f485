"""Plans: data (model.py), identity of owned sandboxes (identity.py), the engine (planner.py)."""
