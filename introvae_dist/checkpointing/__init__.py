"""A run's checkpoints: one owner (:class:`~introvae_dist.checkpointing.checkpointer.Checkpointer`),
the on-disk layout (:mod:`~introvae_dist.checkpointing.layout`), where a run starts
(:mod:`~introvae_dist.checkpointing.resume_plan`), each rank's own state
(:mod:`~introvae_dist.checkpointing.rank_state`), the run folder's lock and the faults the
tests inject into a save. docs/CHECKPOINTS.md describes the guarantees."""
