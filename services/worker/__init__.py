"""The worker service: one deployable for the prefill, decode and mixed roles.

One process holds the engine and the handlers of every phase so that a role can later flip in place
(as MindIE does). ``python -m services.worker --role R`` (or ``pdmesh worker --role R``) starts it;
``services/{prefill,decode,mixed}_worker`` and ``pdmesh prefill-worker`` etc. are entry points that
fix the starting role.
"""
