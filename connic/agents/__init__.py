"""connic's built-in agents, each declared as an entry point like any plugin."""
