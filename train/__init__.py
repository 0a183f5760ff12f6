"""train/: distil a draft for a specific target (issue #3: data regeneration, losses, trainer)."""
