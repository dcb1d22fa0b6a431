"""Training recipes: one file per recipe (cosplace, with optional GRL), sharing losses and the loop."""
