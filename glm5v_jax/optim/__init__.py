"""Optimizers: Muon (as composable optax transforms) and its Newton-Schulz orthogonalisation."""
