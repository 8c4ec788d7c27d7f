"""Training: the shared train step; one trainer file per stage."""
