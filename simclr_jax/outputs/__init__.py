"""What a person looks at: the run report and the augmentation preview."""
