"""Deployment from one cluster file: ``pdmesh up --config``, docker-compose and Kubernetes.

``cluster_file`` is the model (MindIE's user_config.json names where they overlap), ``settings``
turns it into each service's own settings, and ``compose`` / ``k8s`` render manifests from those.
"""
