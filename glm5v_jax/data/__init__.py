"""Input pipelines: image preprocessing for the vision tower."""
