"""connic's built-in transports, each declared as an entry point like any plugin."""
