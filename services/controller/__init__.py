"""The controller: membership, health and the cluster view (``create_controller``, ``main``)."""
