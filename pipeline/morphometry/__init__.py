"""Nuclear morphometry: nucleus and cell masks, features per cell and atypia scores."""
