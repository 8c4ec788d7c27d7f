"""Meshes, logical-axis rules, pre-compile checks and sharded state creation.

`mesh` builds the device mesh from `config.mesh`; `rules` maps logical axis names to
mesh axes; `context` lets layers annotate activations with logical names (a no-op
outside `use_mesh_rules`); `checks` refuses unworkable combinations before anything
is compiled; `partition` creates model and optimizer state already sharded.
"""
