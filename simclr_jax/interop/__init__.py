"""Other formats: official google-research/simclr TF checkpoints in, torchvision out."""
