"""Native CPU kernels for the ops around a decoder layer's products (see ``cpu`` and ``build``)."""
