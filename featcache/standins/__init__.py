"""Stand-in experts: tiny backbones pre-trained on this machine, so the demo shows the method working."""
