"""Instances that span many devices: the parallel layout, the ranks' process groups, the collectives
the sharded layers use, and the leader/follower processes of one instance (see docs/parallelism.md)."""
