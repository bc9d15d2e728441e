"""conceptseg-edge."""
