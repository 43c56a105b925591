"""Security: certificates for the mesh's identities, TLS settings and the gRPC identity checks
(docs/security.md)."""
