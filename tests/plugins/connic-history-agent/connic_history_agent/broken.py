"""A plugin module that cannot be imported: its dependency is missing."""

raise ImportError("connic_history_agent.broken needs the 'unobtainium' library, which is not installed")
