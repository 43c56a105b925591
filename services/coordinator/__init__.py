"""The coordinator service: OpenAI-compatible HTTP, gRPC Generate, routing over the mesh."""
