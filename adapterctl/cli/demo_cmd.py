"""``adapterctl demo`` (filled in with the demo)."""
