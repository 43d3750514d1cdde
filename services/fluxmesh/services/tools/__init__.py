"""Offline tools that serve no request: memory planning, tiny models, full-size shapes."""
