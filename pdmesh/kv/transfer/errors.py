"""The exceptions every transfer backend shares.

``TransferError`` is the one a caller handles: a pull failed and its destination blocks are undefined
(the caller frees them). ``Refused`` is the ``TransferError`` of a server that answered and said no
(metrics count it apart from timeouts). ``ProtocolError`` stays inside the backends: a peer that does
not speak the protocol; ``wire.pull_errors`` turns it into a ``TransferError``.
"""

from __future__ import annotations


class TransferError(Exception):
    """A pull failed; no partial KV may be used."""


class Refused(TransferError):
    """The server answered and refused the pull; the connection is still in step."""


class ProtocolError(Exception):
    """The peer sent something that is not this protocol."""
