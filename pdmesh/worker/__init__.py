"""The worker process shared by the prefill, decode and mixed roles.

One process holds the engine and the handlers of every phase so that a role can later flip in place
(as MindIE does); ``services/prefill_worker`` and ``services/decode_worker`` choose the starting role.
"""
