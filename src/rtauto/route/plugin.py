"""Built-in routing steps and destination types (filled in by the routing module)."""
