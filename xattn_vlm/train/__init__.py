"""Sharded training: mesh and sharding rules, optimizer, stages, Orbax checkpoints, metrics, and
the one trainer loop (``trainer.train``); ``python -m xattn_vlm.train`` runs it."""
