"""Preview math shared by the stages: the latent-to-RGB map and preview JPEGs (no protobuf here)."""
