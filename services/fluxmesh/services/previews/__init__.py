"""Preview math shared by the stages: the latent-to-RGB map."""
